#!/usr/bin/env bash
# fedssl on Google Kubernetes Engine, with the Helm chart: creates the Artifact Registry
# repository when it is missing, builds and pushes the three images, gets the cluster's
# credentials, stores the Kaggle credentials in a Secret and installs (or upgrades) the chart
# with charts/fedssl/values-gke.yaml. Safe to re-run: every step is create-if-missing or an
# upgrade; each run starts a new training run. The hospitals train on HAM10000 (values-gke.yaml),
# on any other Kaggle dataset split among them (--data kaggle:OWNER/DATASET[/SUB/PATH]), or on
# synthetic images.
#
#   ./deploy-gke.sh --project P --region R --cluster C [options]
#
# Required (flag or environment):
#   --project ID      Google Cloud project          (FEDSSL_GKE_PROJECT, or GOOGLE_CLOUD_PROJECT)
#   --region REGION   region of the cluster and of the Artifact Registry repository
#                     (FEDSSL_GKE_REGION), e.g. europe-west4
#   --cluster NAME    GKE cluster (FEDSSL_GKE_CLUSTER); a regional cluster in REGION
# Options:
#   --repository NAME Artifact Registry repository (default fedssl; FEDSSL_GKE_REPOSITORY)
#   --release NAME    Helm release (default fedssl)      --namespace NS  (default fedssl)
#   --tag TAG         image tag (default: the git commit, plus a time stamp when the tree has
#                     changes)
#   --data auto|kaggle|synthetic|kaggle:OWNER/DATASET[/SUB/PATH]
#                     the hospitals' data: auto (default) = kaggle = HAM10000 from Kaggle;
#                     kaggle:OWNER/DATASET[/SUB/PATH] = any Kaggle dataset (as in its URL) whose
#                     SUB/PATH holds one folder per class, e.g.
#                     kaggle:masoudnickparvar/brain-tumor-mri-dataset/Training, downloaded by
#                     each hospital in the cluster; synthetic = generated images
#   --synthetic       the same as --data synthetic (no Kaggle credentials needed)
#   --hospitals N     hospitals, one SuperNode each (default: values-gke.yaml's 3)
#   --partition SCHEME how the dataset is split into the hospitals: HAM10000 site, lesion (the
#                     chart's default) or dirichlet; a kaggle:... dataset random (default) or
#                     dirichlet
#   --dirichlet-alpha A label skew of --partition dirichlet, smaller = stronger (default 0.5)
#   --label-map MAP   kaggle:... only: 'folder=class,...' (or a file of such lines) for class
#                     folders named differently; passed to every hospital
#   --class-names a,b,... kaggle:... only: the class list and its order
#   --skip-build      deploy images already pushed with --tag
#   --dry-run         print the commands instead of running them (needs none of the tools)
#
#   e.g. ./deploy-gke.sh --project P --region R --cluster C \
#          --data kaggle:masoudnickparvar/brain-tumor-mri-dataset/Training --partition dirichlet
#
# Kaggle credentials: KAGGLE_USERNAME and KAGGLE_KEY, or ~/.kaggle/kaggle.json. Build
# options: FEDSSL_DOCKER_BUILD_ARGS (more `docker build` arguments), FEDSSL_EXTRA_CA (a CA
# bundle the builds need behind a proxy, passed as a build secret), FEDSSL_PLATFORM (default
# linux/amd64, the GKE nodes' platform).
set -euo pipefail

# No dirname: the tool check below must work even with an empty PATH.
SELF="${BASH_SOURCE[0]}"; [[ "$SELF" == */* ]] || SELF="./$SELF"
ROOT="$(cd "${SELF%/*}" && pwd)"
COMPONENTS=(superlink supernode registry)
KAGGLE_SECRET=fedssl-kaggle

say() { printf '\033[1m[fedssl-gke]\033[0m %s\n' "$*"; }
warn() { printf '\033[1;33m[fedssl-gke] WARNING:\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[fedssl-gke] ERROR:\033[0m %s\n' "$1" >&2; exit "${2:-1}"; }
usage() { sed -n '2,46p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
# shellcheck source=SCRIPTDIR/scripts/lib/dry-run.sh
source "$ROOT/scripts/lib/dry-run.sh"

PROJECT="${FEDSSL_GKE_PROJECT:-${GOOGLE_CLOUD_PROJECT:-}}"
REGION="${FEDSSL_GKE_REGION:-}"
CLUSTER="${FEDSSL_GKE_CLUSTER:-}"
REPOSITORY="${FEDSSL_GKE_REPOSITORY:-fedssl}"
RELEASE=fedssl
NAMESPACE=fedssl
TAG=""
DATA=auto
HOSPITALS=""
PARTITION="" ALPHA="" LABEL_MAP="" CLASS_NAMES=""
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --project) PROJECT="${2:?--project needs a project id}"; shift 2 ;;
    --region) REGION="${2:?--region needs a region}"; shift 2 ;;
    --cluster) CLUSTER="${2:?--cluster needs a cluster name}"; shift 2 ;;
    --repository) REPOSITORY="${2:?--repository needs a name}"; shift 2 ;;
    --release) RELEASE="${2:?--release needs a name}"; shift 2 ;;
    --namespace) NAMESPACE="${2:?--namespace needs a name}"; shift 2 ;;
    --tag) TAG="${2:?--tag needs a tag}"; shift 2 ;;
    --data) DATA="${2:?--data needs auto, kaggle, synthetic or kaggle:OWNER/DATASET[/SUB/PATH]}"; shift 2 ;;
    --synthetic) DATA=synthetic; shift ;;
    --hospitals) HOSPITALS="${2:?--hospitals needs a number}"; shift 2 ;;
    --partition) PARTITION="${2:?--partition needs site, lesion or dirichlet (HAM10000), random or dirichlet (kaggle:...)}"; shift 2 ;;
    --dirichlet-alpha) ALPHA="${2:?--dirichlet-alpha needs a number > 0}"; shift 2 ;;
    --label-map) LABEL_MAP="${2:?--label-map needs folder=class entries or a file of them}"; shift 2 ;;
    --class-names) CLASS_NAMES="${2:?--class-names needs a comma list of classes}"; shift 2 ;;
    --skip-build) BUILD=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option '$1'" 2 ;;
  esac
done
[ -n "$PROJECT" ] || die "--project is required (or set FEDSSL_GKE_PROJECT): the Google Cloud project to deploy to" 2
[ -n "$REGION" ] || die "--region is required (or set FEDSSL_GKE_REGION): the region of the cluster, e.g. europe-west4" 2
[ -n "$CLUSTER" ] || die "--cluster is required (or set FEDSSL_GKE_CLUSTER): the name of the GKE cluster" 2
[[ "$PROJECT" =~ ^[a-z][a-z0-9-]{4,28}[a-z0-9]$ ]] || die "--project '$PROJECT' is not a Google Cloud project id" 2
[[ "$REGION" =~ ^[a-z]+-[a-z]+[0-9]+$ ]] || die "--region '$REGION' is not a region (e.g. europe-west4; zones such as europe-west4-a are not regions)" 2
# The data, its partition and labels, checked together (scripts/lib/data.sh) before anything runs;
# 3 hospitals as in values-gke.yaml unless --hospitals says otherwise.
# shellcheck source=SCRIPTDIR/scripts/lib/kaggle.sh
source "$ROOT/scripts/lib/kaggle.sh"
# shellcheck source=SCRIPTDIR/scripts/lib/data.sh
source "$ROOT/scripts/lib/data.sh"
data_plan "$DATA" "${HOSPITALS:-3}" "$PARTITION" "$ALPHA" "$LABEL_MAP" "$CLASS_NAMES" || die "$DATA_ERROR" 2

# --- tools -------------------------------------------------------------------------------
HELM=helm
command -v helm >/dev/null || { [ -x "$ROOT/.tools/bin/helm" ] && HELM="$ROOT/.tools/bin/helm"; }
missing=()
command -v gcloud >/dev/null || missing+=("gcloud (https://cloud.google.com/sdk/docs/install)")
[ "$BUILD" = 0 ] || command -v docker >/dev/null || missing+=("docker (https://docs.docker.com/engine/install/)")
command -v kubectl >/dev/null || missing+=("kubectl (gcloud components install kubectl)")
command -v "$HELM" >/dev/null || missing+=("helm (https://helm.sh/docs/intro/install/)")
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$DRY_RUN" = 1 ]; then
    warn "missing ${missing[*]} (printing the commands anyway)"
  else
    printf '\033[1;31m[fedssl-gke] ERROR:\033[0m missing tools:\n' >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 1
  fi
fi

if [ -z "$TAG" ]; then
  if commit="$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null)"; then
    TAG="$commit"
    [ -z "$(git -C "$ROOT" status --porcelain -- services docker pyproject.toml 2>/dev/null)" ] || TAG="$commit-$(date +%Y%m%d%H%M%S)"
  else
    TAG="build-$(date +%Y%m%d%H%M%S)"
  fi
fi
HOST="$REGION-docker.pkg.dev"
IMAGES="$HOST/$PROJECT/$REPOSITORY"
CONTEXT="gke_${PROJECT}_${REGION}_${CLUSTER}"

# --- Kaggle credentials (before anything changes in the cloud) -----------------------------
if [ "$DATA_SOURCE" = kaggle ] && ! kaggle_credentials; then
  die "the hospitals download $DATA_WHAT from Kaggle: set KAGGLE_USERNAME and KAGGLE_KEY or put kaggle.json in ~/.kaggle (https://www.kaggle.com/settings, 'Create New Token'), or pass --synthetic (= --data synthetic)"
fi

# --- 1. Artifact Registry repository ---------------------------------------------------------
say "Artifact Registry repository $REPOSITORY in $REGION (created if missing)"
if [ "$DRY_RUN" = 1 ]; then
  show gcloud artifacts repositories describe "$REPOSITORY" --project "$PROJECT" --location "$REGION"
  echo "  # only when it does not exist yet:"
fi
if [ "$DRY_RUN" = 1 ] || ! gcloud artifacts repositories describe "$REPOSITORY" --project "$PROJECT" --location "$REGION" >/dev/null 2>&1; then
  run gcloud artifacts repositories create "$REPOSITORY" --project "$PROJECT" --location "$REGION" \
    --repository-format docker --description "fedssl images (federated self-supervised learning)"
fi
run gcloud auth configure-docker "$HOST" --quiet

# --- 2. images -------------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  extra=()
  # Word splitting is the point: FEDSSL_DOCKER_BUILD_ARGS holds several arguments.
  # shellcheck disable=SC2206
  [ -n "${FEDSSL_DOCKER_BUILD_ARGS:-}" ] && extra=(${FEDSSL_DOCKER_BUILD_ARGS})
  [ -n "${FEDSSL_EXTRA_CA:-}" ] && extra+=(--secret "id=extra_ca,src=$FEDSSL_EXTRA_CA")
  for c in "${COMPONENTS[@]}"; do
    say "building and pushing $IMAGES/fedssl-$c:$TAG"
    run env DOCKER_BUILDKIT=1 docker build --platform "${FEDSSL_PLATFORM:-linux/amd64}" -f "$ROOT/docker/$c.Dockerfile" \
      -t "$IMAGES/fedssl-$c:$TAG" ${extra[@]+"${extra[@]}"} "$ROOT"
    run docker push "$IMAGES/fedssl-$c:$TAG"
  done
fi

# --- 3. cluster credentials, namespace, Kaggle Secret ----------------------------------------
say "credentials for cluster $CLUSTER"
run gcloud container clusters get-credentials "$CLUSTER" --region "$REGION" --project "$PROJECT"
k=(kubectl --context "$CONTEXT")
if [ "$DRY_RUN" = 1 ]; then
  echo "+ ${k[*]} create namespace $NAMESPACE --dry-run=client -o yaml | ${k[*]} apply -f -"
else
  "${k[@]}" create namespace "$NAMESPACE" --dry-run=client -o yaml | "${k[@]}" apply -f - >/dev/null
fi
run "${k[@]}" label namespace "$NAMESPACE" --overwrite \
  pod-security.kubernetes.io/enforce=restricted pod-security.kubernetes.io/warn=restricted
if [ "$DATA_SOURCE" = kaggle ]; then
  say "Kaggle credentials into secret/$KAGGLE_SECRET (only the hospitals' download step reads it)"
  if [ "$DRY_RUN" = 1 ]; then
    echo "+ ${k[*]} -n $NAMESPACE create secret generic $KAGGLE_SECRET --from-file=username=<kaggle username> --from-file=key=<kaggle key> --dry-run=client -o yaml | ${k[*]} apply -f -"
  else
    dir="$(mktemp -d)"
    trap 'rm -rf "$dir"' EXIT
    (umask 077; printf '%s' "$KAGGLE_USER" >"$dir/username"; printf '%s' "$KAGGLE_SECRET_KEY" >"$dir/key")
    "${k[@]}" -n "$NAMESPACE" create secret generic "$KAGGLE_SECRET" --from-file=username="$dir/username" \
      --from-file=key="$dir/key" --dry-run=client -o yaml | "${k[@]}" apply -f - >/dev/null
    rm -rf "$dir"
  fi
fi

# --- 4. the chart ----------------------------------------------------------------------------
helm_args=(upgrade --install "$RELEASE" "$ROOT/charts/fedssl" --namespace "$NAMESPACE" --kube-context "$CONTEXT"
  -f "$ROOT/charts/fedssl/values-gke.yaml" --set "image.registry=$IMAGES" --set "image.tag=$TAG")
# values-gke.yaml's hospitals train on HAM10000; any other data, or another number of hospitals,
# replaces them (hospital-1..N, SSL tasks in turn, partition i each).
if [ "$DATA_KIND" != ham10000 ] || [ -n "$HOSPITALS" ]; then
  helm_args+=(--set-json "hospitals=$DATA_HOSPITALS")
fi
helm_args+=(${DATA_SETS[@]+"${DATA_SETS[@]}"})
say "installing release $RELEASE in namespace $NAMESPACE: $DATA_WHAT${DATA_PARTITION:+ split by $DATA_PARTITION}"
run "$HELM" "${helm_args[@]}"

fullname="$RELEASE"; [[ "$RELEASE" == *fedssl* ]] || fullname="$RELEASE-fedssl"
revision="<revision>"
if [ "$DRY_RUN" = 0 ]; then
  revision="$("$HELM" list -n "$NAMESPACE" --kube-context "$CONTEXT" --filter "^$RELEASE\$" -o json \
    | sed -n 's/.*"revision":"\{0,1\}\([0-9][0-9]*\).*/\1/p')"
fi
say "done. Next:"
cat <<EOF
  ${k[*]} -n $NAMESPACE get pods
  ${k[*]} -n $NAMESPACE logs -f --pod-running-timeout=30m job/$fullname-run-$revision
  ${k[*]} -n $NAMESPACE port-forward svc/$fullname-registry 8080:8080
  $HELM test $RELEASE -n $NAMESPACE --kube-context $CONTEXT
EOF
