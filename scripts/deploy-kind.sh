#!/usr/bin/env bash
# fedssl on a local kind cluster, with the Helm chart: creates the cluster when it is missing,
# builds the three images and loads them into it, installs the chart, waits for the training
# run and leaves the registry port-forwarded with a curl that classifies an image.
#
#   ./deploy-local.sh --kind [options]          (the same as scripts/deploy-kind.sh [options])
#   ./deploy-local.sh --kind down               stop the port-forward and uninstall the release
#
# Options:
#   --data auto|kaggle|synthetic|kaggle:OWNER/DATASET[/SUB/PATH]
#                                  the hospitals' data; auto (default) = kaggle = HAM10000 from Kaggle;
#                                  kaggle:OWNER/DATASET[/SUB/PATH] = any Kaggle dataset (as in its URL),
#                                  SUB/PATH holding one folder per class, e.g.
#                                  kaggle:masoudnickparvar/brain-tumor-mri-dataset/Training; both need
#                                  KAGGLE_USERNAME/KAGGLE_KEY or ~/.kaggle/kaggle.json (each hospital
#                                  downloads it in the cluster); synthetic only when asked
#   --hospitals N                  hospitals, one SuperNode each (default 3)
#   --partition SCHEME             how the dataset is split into the hospitals: HAM10000 site, lesion
#                                  (the chart's default) or dirichlet; a kaggle:... dataset random
#                                  (default) or dirichlet
#   --dirichlet-alpha A            label skew of --partition dirichlet, smaller = stronger (default 0.5)
#   --label-map MAP                kaggle:... only: 'folder=class,...' (or a file of such lines) for
#                                  class folders named differently; passed to every hospital
#   --class-names a,b,...          kaggle:... only: the class list and its order
#   --rounds N                     self-supervised rounds (default 3)
#   --finetune-rounds N            fine-tuning rounds (default 2)
#   --image-size PX                image side (default 64)
#   --tag TAG                      image tag (default: dev-<git commit>, plus a time stamp when
#                                  the tree has changes)
#   --no-build                     use fedssl-*:TAG images already built
#   --port PORT                    local port of the registry port-forward (default 8480)
#   --timeout SECONDS              longest wait for the run (default 7200)
#   --dry-run                      print the commands instead of running them
#
#   e.g. ./deploy-local.sh --kind --data kaggle:masoudnickparvar/brain-tumor-mri-dataset/Training \
#          --hospitals 3 --partition dirichlet --dirichlet-alpha 0.3
#
# Environment: FEDSSL_KIND_CLUSTER (cluster name), FEDSSL_NAMESPACE, FEDSSL_RELEASE,
# FEDSSL_HOME (state, default ./.fedssl), FEDSSL_DOCKER_BUILD_ARGS (more `docker build`
# arguments, e.g. "--build-arg BASE_IMAGE=local/python:3.11"), FEDSSL_EXTRA_CA (a CA bundle
# the image builds need behind a TLS-intercepting proxy; passed as a build secret, never
# stored in an image).
set -euo pipefail

# No dirname: the tool check below must work even with an empty PATH.
SELF="${BASH_SOURCE[0]}"; [[ "$SELF" == */* ]] || SELF="./$SELF"
ROOT="$(cd "${SELF%/*}/.." && pwd)"
CLUSTER="${FEDSSL_KIND_CLUSTER:-fedssl}"
NAMESPACE="${FEDSSL_NAMESPACE:-fedssl}"
RELEASE="${FEDSSL_RELEASE:-fedssl}"
FEDSSL_HOME="${FEDSSL_HOME:-$ROOT/.fedssl}"
CONTEXT="kind-$CLUSTER"
KAGGLE_SECRET=fedssl-kaggle
COMPONENTS=(superlink supernode registry)

say() { printf '\033[1m[fedssl-kind]\033[0m %s\n' "$*"; }
warn() { printf '\033[1;33m[fedssl-kind] WARNING:\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[fedssl-kind] ERROR:\033[0m %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,42p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

DRY_RUN=0
# shellcheck source=SCRIPTDIR/lib/dry-run.sh
source "$ROOT/scripts/lib/dry-run.sh"

HELM=""
find_helm() {
  if command -v helm >/dev/null; then HELM=helm
  elif [ -x "$ROOT/.tools/bin/helm" ]; then HELM="$ROOT/.tools/bin/helm"
  fi
}

# Every tool this script needs, with where to get the missing ones; exits when any is missing.
check_tools() {
  find_helm
  local missing=() hints=()
  command -v docker >/dev/null || { missing+=(docker); hints+=("docker: https://docs.docker.com/engine/install/ (Debian: apt-get install docker.io)"); }
  command -v kind >/dev/null || { missing+=(kind); hints+=("kind: https://kind.sigs.k8s.io/docs/user/quick-start/#installation (go install sigs.k8s.io/kind@latest)"); }
  [ -n "$HELM" ] || { missing+=(helm); hints+=("helm: scripts/bootstrap.sh --with-test-tools puts it in .tools/bin, or https://helm.sh/docs/intro/install/"); }
  command -v kubectl >/dev/null || { missing+=(kubectl); hints+=("kubectl: https://kubernetes.io/docs/tasks/tools/"); }
  [ "${#missing[@]}" -eq 0 ] && return 0
  local list
  list="$(IFS=,; echo "${missing[*]}")"
  if [ "$DRY_RUN" = 1 ]; then
    warn "missing ${list//,/, } (printing the commands anyway)"
    HELM="${HELM:-helm}"
    return 0
  fi
  printf '\033[1;31m[fedssl-kind] ERROR:\033[0m missing tools: %s\n' "${list//,/, }" >&2
  printf '  %s\n' "${hints[@]}" >&2
  exit 1
}

# shellcheck source=SCRIPTDIR/lib/kaggle.sh
source "$ROOT/scripts/lib/kaggle.sh"
# shellcheck source=SCRIPTDIR/lib/data.sh
source "$ROOT/scripts/lib/data.sh"

# The Kaggle Secret from the credentials, through files (never on a command line).
create_kaggle_secret() {
  if [ "$DRY_RUN" = 1 ]; then
    echo "+ kubectl --context $CONTEXT -n $NAMESPACE create secret generic $KAGGLE_SECRET --from-file=username=<kaggle username> --from-file=key=<kaggle key> --dry-run=client -o yaml | kubectl --context $CONTEXT apply -f -"
    return
  fi
  local dir
  dir="$(mktemp -d)"
  (umask 077; printf '%s' "$KAGGLE_USER" >"$dir/username"; printf '%s' "$KAGGLE_SECRET_KEY" >"$dir/key")
  kubectl --context "$CONTEXT" -n "$NAMESPACE" create secret generic "$KAGGLE_SECRET" \
    --from-file=username="$dir/username" --from-file=key="$dir/key" --dry-run=client -o yaml \
    | kubectl --context "$CONTEXT" apply -f - >/dev/null
  rm -rf "$dir"
}

default_tag() {
  local commit
  if commit="$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null)"; then
    if [ -n "$(git -C "$ROOT" status --porcelain -- services docker pyproject.toml 2>/dev/null)" ]; then
      echo "dev-$commit-$(date +%Y%m%d%H%M%S)"
    else
      echo "dev-$commit"
    fi
  else
    echo "dev-$(date +%Y%m%d%H%M%S)"
  fi
}

build_images() {  # TAG
  local extra=() c
  # Word splitting is the point: FEDSSL_DOCKER_BUILD_ARGS holds several arguments.
  # shellcheck disable=SC2206
  [ -n "${FEDSSL_DOCKER_BUILD_ARGS:-}" ] && extra=(${FEDSSL_DOCKER_BUILD_ARGS})
  [ -n "${FEDSSL_EXTRA_CA:-}" ] && extra+=(--secret "id=extra_ca,src=$FEDSSL_EXTRA_CA")
  for c in "${COMPONENTS[@]}"; do
    say "building fedssl-$c:$1"
    run env DOCKER_BUILDKIT=1 docker build -f "$ROOT/docker/$c.Dockerfile" -t "fedssl-$c:$1" ${extra[@]+"${extra[@]}"} "$ROOT"
  done
}

port_forward_pidfile() { echo "$FEDSSL_HOME/kind-port-forward.pid"; }

stop_port_forward() {
  local pidfile pid
  pidfile="$(port_forward_pidfile)"
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null && ps -o args= -p "$pid" 2>/dev/null | grep -q "port-forward"; then
    kill "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

cmd_down() {
  check_tools
  stop_port_forward
  run "$HELM" uninstall "$RELEASE" --namespace "$NAMESPACE" --kube-context "$CONTEXT" --ignore-not-found
  say "the release is gone; the cluster stays: kind delete cluster --name $CLUSTER removes it"
}

# An 8x8 PNG (a dark spot on skin tone), small enough to inline: the registry resizes every image to the model's input.
SAMPLE_PNG_B64="iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAJklEQVR42mPcUhHFgA0wMeAAOCVY4Kxlu85BGFFuRhQaBTGBsA4ApUYFbAhnmbEAAAAASUVORK5CYII="

cmd_up() {
  local data=auto hospitals=3 rounds=3 ft_rounds=2 image_size=64 tag="" build=1 port=8480 timeout=7200
  local partition="" alpha="" label_map="" class_names=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --data) data="${2:?--data needs auto, kaggle, synthetic or kaggle:OWNER/DATASET[/SUB/PATH]}"; shift 2 ;;
      --hospitals) hospitals="${2:?--hospitals needs a number}"; shift 2 ;;
      --partition) partition="${2:?--partition needs site, lesion or dirichlet (HAM10000), random or dirichlet (kaggle:...)}"; shift 2 ;;
      --dirichlet-alpha) alpha="${2:?--dirichlet-alpha needs a number > 0}"; shift 2 ;;
      --label-map) label_map="${2:?--label-map needs folder=class entries or a file of them}"; shift 2 ;;
      --class-names) class_names="${2:?--class-names needs a comma list of classes}"; shift 2 ;;
      --rounds) rounds="${2:?--rounds needs a number}"; shift 2 ;;
      --finetune-rounds) ft_rounds="${2:?--finetune-rounds needs a number}"; shift 2 ;;
      --image-size) image_size="${2:?--image-size needs pixels}"; shift 2 ;;
      --tag) tag="${2:?--tag needs a tag}"; shift 2 ;;
      --no-build) build=0; shift ;;
      --port) port="${2:?--port needs a port number}"; shift 2 ;;
      --timeout) timeout="${2:?--timeout needs seconds}"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage; exit 0 ;;
      *) usage >&2; die "unknown option '$1'" ;;
    esac
  done
  { is_int "$hospitals" && [ "$hospitals" -ge 1 ]; } || die "--hospitals must be a whole number >= 1, got '$hospitals'"
  # The data, its partition and labels, checked together (scripts/lib/data.sh) before anything runs.
  data_plan "$data" "$hospitals" "$partition" "$alpha" "$label_map" "$class_names" || die "$DATA_ERROR"
  is_int "$rounds" || die "--rounds must be a whole number, got '$rounds'"
  is_int "$ft_rounds" || die "--finetune-rounds must be a whole number, got '$ft_rounds'"
  { is_int "$image_size" && [ "$image_size" -ge 16 ]; } || die "--image-size must be a whole number >= 16, got '$image_size'"
  is_int "$port" || die "--port must be a port number, got '$port'"
  is_int "$timeout" || die "--timeout must be a whole number of seconds, got '$timeout'"

  check_tools
  [ -n "$tag" ] || tag="$(default_tag)"

  if [ "$DRY_RUN" = 0 ]; then
    docker info >/dev/null 2>&1 || die "docker is installed but its daemon does not answer (start it, or check that you may use it)"
  fi

  # Data: from Kaggle (HAM10000 or the dataset named); synthetic images only when asked for, never as a fallback.
  local source="$DATA_SOURCE"
  if [ "$source" = kaggle ]; then
    kaggle_credentials || die "--data $data needs Kaggle credentials (KAGGLE_USERNAME and KAGGLE_KEY, or ~/.kaggle/kaggle.json): the hospitals download $DATA_WHAT from Kaggle; or ask for fake images with --data synthetic"
  fi
  [ "$source" = synthetic ] && warn "SYNTHETIC DATA (--data synthetic): the models will say nothing about real patients"

  # The cluster.
  if [ "$DRY_RUN" = 1 ] || ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    say "creating the kind cluster $CLUSTER"
    run kind create cluster --name "$CLUSTER" --config "$ROOT/k8s/kind-cluster.yaml" --wait 180s
  else
    say "kind cluster $CLUSTER is there"
  fi

  # The images, built here and loaded into the cluster's node (no registry involved).
  if [ "$build" = 1 ]; then build_images "$tag"; fi
  local c
  for c in "${COMPONENTS[@]}"; do
    say "loading fedssl-$c:$tag into $CLUSTER"
    run kind load docker-image "fedssl-$c:$tag" --name "$CLUSTER"
  done

  if [ "$DRY_RUN" = 1 ]; then
    echo "+ kubectl --context $CONTEXT create namespace $NAMESPACE --dry-run=client -o yaml | kubectl --context $CONTEXT apply -f -"
  else
    kubectl --context "$CONTEXT" create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl --context "$CONTEXT" apply -f - >/dev/null
  fi
  # The chart's pods meet the restricted Pod Security Standard; have the cluster hold it to that.
  run kubectl --context "$CONTEXT" label namespace "$NAMESPACE" --overwrite \
    pod-security.kubernetes.io/enforce=restricted pod-security.kubernetes.io/warn=restricted
  if [ "$source" = kaggle ]; then
    say "storing the Kaggle credentials in secret/$KAGGLE_SECRET (only the hospitals' download step reads it)"
    create_kaggle_secret
  fi

  # The hospitals: alternating SSL tasks, one partition of the shared dataset each (DATA_HOSPITALS).
  local helm_args=(upgrade --install "$RELEASE" "$ROOT/charts/fedssl" --namespace "$NAMESPACE" --kube-context "$CONTEXT"
    -f "$ROOT/charts/fedssl/values-kind.yaml" --set "image.tag=$tag" --set-json "hospitals=$DATA_HOSPITALS"
    --set "run.config.ssl-rounds=$rounds" --set "run.config.finetune-rounds=$ft_rounds"
    --set "run.config.image-size=$image_size" ${DATA_SETS[@]+"${DATA_SETS[@]}"})
  [ "$source" = kaggle ] && helm_args+=(--set "kaggle.existingSecret=$KAGGLE_SECRET")
  say "installing the chart (release $RELEASE in namespace $NAMESPACE): $hospitals hospitals, $DATA_WHAT${DATA_PARTITION:+ split by $DATA_PARTITION}"
  run "$HELM" "${helm_args[@]}"

  local k=(kubectl --context "$CONTEXT" -n "$NAMESPACE")
  local selector="app.kubernetes.io/instance=$RELEASE"
  if [ "$DRY_RUN" = 1 ]; then
    echo "+ ${k[*]} logs -f --pod-running-timeout=30m job/<$RELEASE-run-REVISION>   # until the Job completes or fails"
    echo "+ ${k[*]} port-forward svc/<registry service> $port:8080"
    return 0
  fi

  # Follow the run Job to its end.
  local job=""
  for _ in $(seq 1 60); do
    job="$("${k[@]}" get jobs -l "$selector,app.kubernetes.io/component=run" --sort-by=.metadata.creationTimestamp \
      -o jsonpath='{.items[-1:].metadata.name}' 2>/dev/null || true)"
    [ -n "$job" ] && break
    sleep 2
  done
  [ -n "$job" ] || die "the chart installed no run Job (${k[*]} get jobs)"
  say "following job/$job (hospitals may still be pulling images or downloading $DATA_WHAT)"
  "${k[@]}" logs -f --pod-running-timeout=30m "job/$job" &
  local logs_pid=$! state="" waited=0
  while [ "$waited" -lt "$timeout" ]; do
    state="$("${k[@]}" get job "$job" -o jsonpath='{range .status.conditions[?(@.status=="True")]}{.type}{" "}{end}' 2>/dev/null || true)"
    case "$state" in *Complete*|*Failed*) break ;; esac
    sleep 5; waited=$((waited + 5))
  done
  sleep 2; kill "$logs_pid" 2>/dev/null || true; wait "$logs_pid" 2>/dev/null || true
  case "$state" in
    *Complete*) say "the run completed" ;;
    *Failed*) die "the run failed; see ${k[*]} logs job/$job and ${k[*]} get pods" ;;
    *) die "the run did not finish within ${timeout}s; it goes on: ${k[*]} logs -f job/$job" ;;
  esac

  # The registry on localhost, kept forwarded after this script ends.
  local svc token url="http://127.0.0.1:$port"
  svc="$("${k[@]}" get svc -l "$selector,app.kubernetes.io/component=registry" -o jsonpath='{.items[0].metadata.name}')"
  token="$("${k[@]}" get secret -l "$selector,app.kubernetes.io/component=registry" -o jsonpath='{.items[0].data.token}' | base64 -d)"
  mkdir -p "$FEDSSL_HOME"
  stop_port_forward
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is taken by another program; pass --port with a free one"
  fi
  nohup kubectl --context "$CONTEXT" -n "$NAMESPACE" port-forward "svc/$svc" "$port:8080" \
    >"$FEDSSL_HOME/kind-port-forward.log" 2>&1 </dev/null &
  echo $! >"$(port_forward_pidfile)"
  for _ in $(seq 1 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.2
  done
  local sample="$FEDSSL_HOME/sample.png"
  printf '%s' "$SAMPLE_PNG_B64" | base64 -d >"$sample"
  (umask 077; printf '%s' "$token" >"$FEDSSL_HOME/kind-registry.token")
  local curl_cmd="curl -s -H \"Authorization: Bearer \$(cat $FEDSSL_HOME/kind-registry.token)\" -F \"file=@$sample\" $url/v1/models/fedssl-classifier:predict"
  say "the registry is forwarded to $url (dashboard: $url/; stop: ./deploy-local.sh --kind down)"
  if command -v curl >/dev/null; then
    say "classifying a sample image:"
    curl -s -H "Authorization: Bearer $token" -F "file=@$sample" "$url/v1/models/fedssl-classifier:predict" || true
    echo
  fi
  say "classify your own image (KServe-style REST):"
  echo
  echo "  $curl_cmd"
  echo
  say "more: ${k[*]} get pods ; $HELM test $RELEASE -n $NAMESPACE --kube-context $CONTEXT"
}

main() {
  case "${1:-}" in
    down) shift; cmd_down "$@" ;;
    -h|--help|help) usage ;;
    *) cmd_up "$@" ;;
  esac
}

main "$@"
