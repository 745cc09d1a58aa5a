#!/usr/bin/env bash
# fedssl on one machine: a model registry, a Flower SuperLink and one SuperNode per hospital,
# all as local processes; trains across the hospitals, then leaves the registry serving.
#
#   ./deploy-local.sh                      # = up with defaults
#   ./deploy-local.sh up [--preset default|quality|generate] [--hospitals N] [--rounds N] [--finetune-rounds N]
#                        [--image-size PX] [--local-steps N] [--data auto|synthetic|PATH|kaggle:SLUG] [--max-images N]
#                        [--partition SCHEME] [--dirichlet-alpha A] [--label-map MAP] [--class-names a,b,...]
#                        [--round-timeout SECONDS] [--ssl-tasks simclr|rotation|micle[,...]] [--register-local-models]
#                        [--run-config "KEY=VALUE KEY=VALUE ..."]
#     --data PATH is one of (it says which it found, and what each hospital holds, before training):
#       the Kaggle HAM10000 layout     split into --hospitals N by --partition site|lesion|dirichlet;
#       PATH/<hospital>/<class>/*.jpg  one SuperNode per hospital folder, named after it;
#       PATH/<class>/*.jpg             split into --hospitals N by --partition random|dirichlet
#                                      (--dirichlet-alpha A: label skew, smaller = stronger; 0.5).
#     --data kaggle:OWNER/DATASET[/SUB/PATH] downloads a Kaggle dataset once (atomically, into
#       data/kaggle/OWNER/DATASET; HAM10000 into data/ham10000) and uses SUB/PATH inside it as PATH,
#       e.g. kaggle:masoudnickparvar/brain-tumor-mri-dataset/Training
#            kaggle:paultimothymooney/chest-xray-pneumonia/chest_xray/train  (needs Kaggle credentials).
#     Class folders named differently (no_tumor, notumor, No Tumor; glioma_tumor, glioma) are matched
#     and the mapping printed; anything else needs --label-map 'folder=class,hospital:folder=class'
#     (or JSON, or a file). --class-names fixes the class list and its order.
#     --preset default: 3 hospitals, at most 600 images each (8 minutes on 2 CPU cores, 2026-12-04);
#     --preset quality: HAM10000's 4 acquisition sites with all their images, trained by cyclic weight
#                       transfer (run config strategy=cyclic, 16 rounds of 6 local steps: the hospitals
#                       train one after another, the recipe that scored best on the validation split in
#                       docs/benchmarks.md section 1), through the real deployment; the classifier
#                       carries each hospital's BatchNorm statistics (hospital-batchnorm=true).
#     --preset generate: a generative run (run config task=generate): 3 hospitals with all their
#                       images train a class-conditional GAN together at 32 px; the registry then
#                       serves fedssl-generator (POST /v1/models/fedssl-generator:generate).
#                       --rounds N sets its generate-rounds.
#     SSL rounds are opt-in (--rounds N): on top of the ImageNet start they did not help at
#     this budget (docs/benchmarks.md).
#     Rounds, image size and local steps default to the app's run config (pyproject.toml).
#     --register-local-models: each hospital's own (local-only) classifier is registered beside the
#       global one (fedssl-local-<hospital>), and the dashboard's "Try it" scores an image with all of
#       them. Off by default: a hospital's own model is its property.
#     --run-config "KEY=VALUE ...": any run config of the app (pyproject.toml [tool.flwr.app.config],
#       documented in services/fedssl_flower/config.py), passed to fedssl-submit as -c overrides like
#       `flwr run --run-config`; space-separated, repeatable, given last so they win, e.g.
#       --run-config "strategy=fedadam server-eta=0.01"   --run-config "strategy=krum num-malicious-nodes=1"
#   ./deploy-local.sh status
#   ./deploy-local.sh down                 # stops exactly what `up` started
#   ./deploy-local.sh --kind ...           # the same on a kind cluster (scripts/deploy-kind.sh)
#
# Environment: FEDSSL_HOME (state, default ./.fedssl), FEDSSL_SUPERLINK_PORT (default 9460),
# FEDSSL_REGISTRY_PORT (default 8460), FEDSSL_DATA (a HAM10000 copy for --data auto).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ "${1:-}" = "--kind" ]; then
  shift
  if [ ! -x "$ROOT/scripts/deploy-kind.sh" ]; then
    echo "deploy-local.sh: --kind needs scripts/deploy-kind.sh, which this checkout does not have" >&2
    exit 2
  fi
  exec "$ROOT/scripts/deploy-kind.sh" "$@"
fi

FEDSSL_HOME="${FEDSSL_HOME:-$ROOT/.fedssl}"
SUPERLINK_PORT="${FEDSSL_SUPERLINK_PORT:-9460}"
REGISTRY_PORT="${FEDSSL_REGISTRY_PORT:-8460}"
VENV="$ROOT/.venv"
PIDS="$FEDSSL_HOME/pids"
LOGS="$FEDSSL_HOME/logs"

say() { printf '\033[1m[fedssl]\033[0m %s\n' "$*"; }
warn() { printf '\033[1;33m[fedssl] WARNING:\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[fedssl] ERROR:\033[0m %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,41p' "$0" | sed 's/^# \{0,1\}//'; }

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

port_busy() { "$VENV/bin/python" -c "import socket,sys; s=socket.socket(); sys.exit(0 if s.connect_ex(('127.0.0.1',$1))==0 else 1)"; }

# start NAME CMD...: run CMD in its own session (so `down` can stop its whole process group).
start() {
  local name="$1"; shift
  if alive "$PIDS/$name.pid"; then
    say "$name already running (pid $(cat "$PIDS/$name.pid"))"
    return
  fi
  setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! >"$PIDS/$name.pid"
}

stop() {
  local pidfile="$1" pid
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

wait_http() {  # URL NAME LOG
  for _ in $(seq 1 240); do
    if "$VENV/bin/python" -c "import urllib.request,sys; urllib.request.urlopen('$1', timeout=2)" 2>/dev/null; then return 0; fi
    sleep 0.5
  done
  tail -n 20 "$3" >&2 || true
  die "$2 did not become ready at $1 (log: $3)"
}

wait_port() {  # PORT NAME LOG PIDFILE
  for _ in $(seq 1 240); do
    port_busy "$1" && return 0
    alive "$4" || { tail -n 20 "$3" >&2; die "$2 exited during start-up (log: $3)"; }
    sleep 0.5
  done
  die "$2 did not listen on port $1 (log: $3)"
}

cmd_down() {
  local any=0
  if [ -d "$PIDS" ]; then
    for f in "$PIDS"/*.pid; do
      [ -e "$f" ] || continue
      say "stopping $(basename "$f" .pid)"
      stop "$f"; any=1
    done
  fi
  [ "$any" = 1 ] || say "nothing to stop"
}

cmd_status() {
  if [ ! -d "$PIDS" ] || [ -z "$(ls -A "$PIDS" 2>/dev/null)" ]; then
    say "nothing running (FEDSSL_HOME=$FEDSSL_HOME)"
    return 0
  fi
  for f in "$PIDS"/*.pid; do
    if alive "$f"; then echo "  running  $(basename "$f" .pid) (pid $(cat "$f"))"; else echo "  stopped  $(basename "$f" .pid)"; fi
  done
  if alive "$PIDS/registry.pid" && [ -f "$FEDSSL_HOME/registry.url" ]; then
    say "registry: $(cat "$FEDSSL_HOME/registry.url")  (dashboard at /, token in $FEDSSL_HOME/registry.token)"
  fi
}

kaggle_credentials() { { [ -n "${KAGGLE_USERNAME:-}" ] && [ -n "${KAGGLE_KEY:-}" ]; } || [ -f "${KAGGLE_CONFIG_DIR:-$HOME/.kaggle}/kaggle.json" ]; }

resolve_data() {  # prints "ham10000<TAB>PATH", "folder<TAB>PATH", "kaggle<TAB>SLUG<TAB>TARGET" or "synthetic"; never picks synthetic images on its own
  local choice="$1"
  case "$choice" in
    synthetic) echo "synthetic"; return ;;
    kaggle:*)  # the full check (and the download) is fedssl_flower.data.kaggle's, once the venv is there
      local slug="${choice#kaggle:}" owner dataset target
      [[ "$slug" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(/.*)?$ ]] \
        || die "--data $choice: expected kaggle:OWNER/DATASET[/SUB/PATH] as in the dataset's Kaggle URL, e.g. kaggle:masoudnickparvar/brain-tumor-mri-dataset/Training or kaggle:paultimothymooney/chest-xray-pneumonia/chest_xray/train"
      owner="${slug%%/*}"; dataset="${slug#*/}"; dataset="${dataset%%/*}"
      if [ "$owner/$dataset" = kmader/skin-cancer-mnist-ham10000 ]; then target="$ROOT/data/ham10000"; else target="$ROOT/data/kaggle/$owner/$dataset"; fi
      if [ ! -f "$target/.fedssl-kaggle-dataset" ] && [ ! -f "$target/HAM10000_metadata.csv" ] && ! kaggle_credentials; then
        die "--data $choice: $owner/$dataset is not in $target and there are no Kaggle credentials to download it: set KAGGLE_USERNAME and KAGGLE_KEY or put kaggle.json in ${KAGGLE_CONFIG_DIR:-$HOME/.kaggle}"
      fi
      printf 'kaggle\t%s\t%s\n' "$slug" "$target"; return ;;
    auto)
      if [ -n "${FEDSSL_DATA:-}" ]; then
        [ -f "$FEDSSL_DATA/HAM10000_metadata.csv" ] || die "FEDSSL_DATA=$FEDSSL_DATA has no HAM10000_metadata.csv (expected the Kaggle HAM10000 layout)"
        printf 'ham10000\t%s\n' "$FEDSSL_DATA"; return
      fi
      local dir
      for dir in "$ROOT/data/ham10000" "$ROOT/../shared/data/ham10000"; do
        if [ -f "$dir/HAM10000_metadata.csv" ]; then printf 'ham10000\t%s\n' "$(cd "$dir" && pwd)"; return; fi
      done
      if kaggle_credentials; then
        printf 'ham10000\t%s\n' "$ROOT/data/ham10000"; return  # downloaded from Kaggle below
      fi
      die "no HAM10000 found: --data auto looked at \$FEDSSL_DATA (unset), $ROOT/data/ham10000, $ROOT/../shared/data/ham10000 and Kaggle credentials (KAGGLE_USERNAME/KAGGLE_KEY or ${KAGGLE_CONFIG_DIR:-$HOME/.kaggle}/kaggle.json, none). Put the Kaggle HAM10000 layout in one of those places, set FEDSSL_DATA or provide Kaggle credentials; or ask for fake images with --data synthetic" ;;
    *)  # which layout it holds is decided by fedssl_flower.data.layout, once the venv is there
      [ -d "$choice" ] || die "--data $choice: no such folder; expected the Kaggle HAM10000 layout, PATH/<hospital>/<class>/<image> or PATH/<class>/<image>"
      printf 'folder\t%s\n' "$(cd "$choice" && pwd)" ;;
  esac
}

# run_config_entries "KEY=VALUE ...": one KEY=VALUE per line, or exit naming the malformed entry
# or the key the app does not have (its [tool.flwr.app.config] in pyproject.toml).
run_config_entries() {
  local keys entry key
  keys="$(awk '/^\[/{on = ($0 == "[tool.flwr.app.config]"); next} on && /^[a-z][a-z0-9-]* *=/{sub(/ *=.*/, ""); print}' "$ROOT/pyproject.toml")"
  for entry in $1; do
    [[ "$entry" =~ ^([a-z][a-z0-9-]*)=(.+)$ ]] || die "--run-config entry '$entry' is not KEY=VALUE with a kebab-case key and a value (e.g. strategy=fedadam); separate entries with spaces"
    key="${BASH_REMATCH[1]}"
    grep -qx "$key" <<<"$keys" || die "--run-config key '$key' is not a run config key of the app (pyproject.toml [tool.flwr.app.config]): $(tr '\n' ' ' <<<"$keys")"
    printf '%s\n' "$entry"
  done
}

cmd_up() {
  local partition="" alpha="" label_map="" class_names="" register_local=false run_config=()
  local preset=default ssl_tasks=simclr hospitals="" rounds="" ft_rounds="" image_size="" local_steps="" data=auto max_images="" round_timeout=1800
  while [ $# -gt 0 ]; do
    case "$1" in
      --preset) preset="${2:?--preset needs default, quality or generate}"; shift 2 ;;
      --ssl-tasks) ssl_tasks="${2:?--ssl-tasks needs a comma list of simclr, rotation and micle}"; shift 2 ;;
      --local-steps) local_steps="${2:?--local-steps needs a number}"; shift 2 ;;
      --hospitals) hospitals="${2:?--hospitals needs a number}"; shift 2 ;;
      --rounds) rounds="${2:?--rounds needs a number}"; shift 2 ;;
      --finetune-rounds) ft_rounds="${2:?--finetune-rounds needs a number}"; shift 2 ;;
      --image-size) image_size="${2:?--image-size needs pixels}"; shift 2 ;;
      --data) data="${2:?--data needs auto, synthetic, a path or kaggle:OWNER/DATASET[/SUB/PATH]}"; shift 2 ;;
      --max-images) max_images="${2:?--max-images needs a number (0 = all)}"; shift 2 ;;
      --round-timeout) round_timeout="${2:?--round-timeout needs seconds}"; shift 2 ;;
      --partition) partition="${2:?--partition needs site, lesion, dirichlet or random}"; shift 2 ;;
      --dirichlet-alpha) alpha="${2:?--dirichlet-alpha needs a number > 0}"; shift 2 ;;
      --label-map) label_map="${2:?--label-map needs folder=class entries, JSON or a file}"; shift 2 ;;
      --class-names) class_names="${2:?--class-names needs a comma list of classes}"; shift 2 ;;
      --register-local-models) register_local=true; shift ;;
      --run-config)
        local entries
        entries="$(run_config_entries "${2:?--run-config needs \"KEY=VALUE KEY=VALUE ...\"}")"
        [ -n "$entries" ] || die "--run-config needs at least one KEY=VALUE"
        while IFS= read -r e; do run_config+=(-c "$e"); done <<<"$entries"
        shift 2 ;;
      -h|--help) usage; exit 0 ;;
      *) usage >&2; die "unknown option '$1'" ;;
    esac
  done
  local default_hospitals
  case "$preset" in
    default) default_hospitals=3 max_images="${max_images:-600}" ;;
    quality) default_hospitals=4 max_images="${max_images:-0}" ;;
    generate) default_hospitals=3 max_images="${max_images:-0}" ;;
    *) die "--preset must be default, quality or generate, got '$preset'" ;;
  esac
  if [ "$preset" = generate ]; then
    [ -z "$ft_rounds$local_steps" ] || die "--finetune-rounds and --local-steps apply to diagnosis runs, not to --preset generate (its steps per round: --run-config gan-steps=N)"
    [ -z "$image_size" ] || [ "$image_size" = 32 ] || [ "$image_size" = 64 ] || die "--preset generate: --image-size must be 32 or 64 (the generator's sizes), got '$image_size'"
  fi
  [ -z "$hospitals" ] || { is_int "$hospitals" && [ "$hospitals" -ge 1 ]; } || die "--hospitals must be a whole number >= 1, got '$hospitals'"
  [ -z "$alpha" ] || [[ "$alpha" =~ ^[0-9]*\.?[0-9]+$ ]] || die "--dirichlet-alpha must be a number > 0, got '$alpha'"
  [ -z "$alpha" ] || [ "$partition" = dirichlet ] || die "--dirichlet-alpha needs --partition dirichlet"
  [ -z "$rounds" ] || is_int "$rounds" || die "--rounds must be a whole number, got '$rounds'"
  [ -z "$ft_rounds" ] || is_int "$ft_rounds" || die "--finetune-rounds must be a whole number, got '$ft_rounds'"
  [ -z "$image_size" ] || { is_int "$image_size" && [ "$image_size" -ge 16 ]; } || die "--image-size must be a whole number >= 16, got '$image_size'"
  [ -z "$local_steps" ] || { is_int "$local_steps" && [ "$local_steps" -ge 1 ]; } || die "--local-steps must be a whole number >= 1, got '$local_steps'"
  is_int "$max_images" || die "--max-images must be a whole number (0 = all), got '$max_images'"
  local TASKS t
  IFS=, read -r -a TASKS <<<"$ssl_tasks"
  [ "${#TASKS[@]}" -ge 1 ] || die "--ssl-tasks needs at least one of simclr, rotation, micle"
  for t in "${TASKS[@]}"; do
    case "$t" in simclr|rotation|micle) ;; *) die "--ssl-tasks: unknown SSL task '$t' (expected simclr, rotation or micle, comma-separated; hospitals take them in turn)" ;; esac
  done
  { is_int "$round_timeout" && [ "$round_timeout" -ge 1 ]; } || die "--round-timeout must be a whole number of seconds >= 1, got '$round_timeout'"

  local source path="" warning="" resolved kaggle_target=""
  resolved="$(resolve_data "$data")" || exit 1  # before installing anything: a missing dataset stops here
  IFS=$'\t' read -r source path kaggle_target <<<"$resolved"
  if [ "$source" = synthetic ]; then
    [ -z "$partition$label_map$class_names" ] || die "--partition, --label-map and --class-names apply to real data (--data PATH or auto), not to --data synthetic"
    warning="SYNTHETIC DATA (--data synthetic): this model says nothing about real patients"
    warn "$warning"
  fi

  command -v python3 >/dev/null || die "python3 (>= 3.11) is required and was not found"
  "$ROOT/scripts/bootstrap.sh"
  export PATH="$VENV/bin:$PATH" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
  mkdir -p "$PIDS" "$LOGS" "$FEDSSL_HOME/runs" "$FEDSSL_HOME/cache"

  if [ "$source" = ham10000 ] && [ ! -f "$path/HAM10000_metadata.csv" ]; then
    say "downloading HAM10000 from Kaggle into $path (once; the hospitals share this copy)"
    "$VENV/bin/python" -m fedssl_flower.data.kaggle "$path" || die "the Kaggle download failed (see above)"
  fi
  if [ "$source" = kaggle ]; then  # path is the slug: download once, then its sub-path is the data folder
    say "Kaggle dataset $path: into $kaggle_target (once; a no-op when it is there)"
    path="$("$VENV/bin/python" -m fedssl_flower.data.kaggle "$kaggle_target" --dataset "$path" --print-path)" \
      || die "--data $data: the Kaggle download or its sub-path failed (see above)"
    source=folder
    say "using $path"
  fi

  # Which layout the data has and what each hospital gets: one line per hospital, NAME<TAB>node config.
  local plan="$FEDSSL_HOME/hospitals.tsv" layout_args=(--default-hospitals "$default_hospitals" --max-images "$max_images")
  if [ "$source" = synthetic ]; then
    local i
    : >"$plan"
    for i in $(seq 0 $((${hospitals:-$default_hospitals} - 1))); do
      printf 'hospital-%d\tdata-source="synthetic" partition-id=%d num-partitions=%d\n' $((i + 1)) "$i" "${hospitals:-$default_hospitals}" >>"$plan"
    done
  else
    [ -n "$hospitals" ] && layout_args+=(--hospitals "$hospitals")
    [ -n "$partition" ] && layout_args+=(--partition "$partition")
    [ -n "$alpha" ] && layout_args+=(--dirichlet-alpha "$alpha")
    [ -n "$label_map" ] && layout_args+=(--label-map "$label_map")
    [ -n "$class_names" ] && layout_args+=(--class-names "$class_names")
    "$VENV/bin/python" -m fedssl_flower.data.layout "$path" "${layout_args[@]}" \
      --write-json "$FEDSSL_HOME/layout.json" --node-configs "$plan" || die "--data $path cannot be federated as it is (see the error above)"
    source="$("$VENV/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["kind"])' "$FEDSSL_HOME/layout.json")"
  fi
  local names=() data_configs=() name data_config
  while IFS=$'\t' read -r name data_config; do names+=("$name"); data_configs+=("$data_config"); done <"$plan"
  hospitals="${#names[@]}"

  # Registry (with a token generated once and kept private).
  local token_file="$FEDSSL_HOME/registry.token"
  if [ ! -s "$token_file" ]; then
    (umask 077; "$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$token_file")
  fi
  chmod 600 "$token_file"
  local token registry_url="http://127.0.0.1:$REGISTRY_PORT"
  token="$(cat "$token_file")"
  if ! alive "$PIDS/registry.pid"; then
    port_busy "$REGISTRY_PORT" && die "port $REGISTRY_PORT is taken by another program; set FEDSSL_REGISTRY_PORT to a free port"
    say "starting the registry on $registry_url"
    FEDSSL_REGISTRY_TOKEN="$token" FEDSSL_REGISTRY_PORT="$REGISTRY_PORT" FEDSSL_REGISTRY_DATA_DIR="$FEDSSL_HOME/registry" \
      start registry "$VENV/bin/fedssl-registry"
  fi
  wait_http "$registry_url/v2/health/ready" registry "$LOGS/registry.log"
  echo "$registry_url" >"$FEDSSL_HOME/registry.url"

  # SuperLink, its state in SQLite so SuperNodes survive a restart.
  if ! alive "$PIDS/superlink.pid"; then
    port_busy "$SUPERLINK_PORT" && die "port $SUPERLINK_PORT is taken by another program; set FEDSSL_SUPERLINK_PORT to a free port"
    say "starting the Flower SuperLink on 127.0.0.1:$SUPERLINK_PORT"
    FLWR_HOME="$FEDSSL_HOME/flwr-superlink" FEDSSL_REGISTRY_URL="$registry_url" FEDSSL_REGISTRY_TOKEN="$token" \
      FEDSSL_RUNS_DIR="$FEDSSL_HOME/runs" \
      start superlink fedssl-superlink --insecure --host 127.0.0.1 --port "$SUPERLINK_PORT" \
        --database "$FEDSSL_HOME/superlink.db" --disable-runtime-dependency-installation
  fi
  wait_port "$SUPERLINK_PORT" SuperLink "$LOGS/superlink.log" "$PIDS/superlink.pid"

  # One SuperNode per hospital: alternating SSL tasks, its data as planned above.
  # The hospitals share this machine's cores: one torch thread each, or cores / hospitals.
  # Left to itself each ClientApp takes every core, and 3 hospitals on 2 cores ran 5x slower.
  local cores threads
  cores="$(nproc 2>/dev/null || echo 1)"
  threads=$(( cores / hospitals )); [ "$threads" -ge 1 ] || threads=1
  local i task node_config
  for i in "${!names[@]}"; do
    name="${names[$i]}"
    task="${TASKS[$((i % ${#TASKS[@]}))]}"
    node_config="hospital=\"$name\" ssl-task=\"$task\" ${data_configs[$i]}"
    node_config+=" max-images=$max_images cache-dir=\"$FEDSSL_HOME/cache\" threads=$threads"
    if ! alive "$PIDS/$name.pid"; then
      say "starting SuperNode $name$([ "$preset" = generate ] || echo " (ssl-task=$task)")"
      FLWR_HOME="$FEDSSL_HOME/flwr-$name" start "$name" fedssl-supernode --insecure --superlink "127.0.0.1:$SUPERLINK_PORT" \
        --port "$(free_port)" --node-config "$node_config"
    fi
  done

  local min_hospitals=$(( hospitals < 2 ? hospitals : 2 ))
  local overrides=() gen_rounds="" gen_size=""
  if [ "$preset" = generate ]; then
    overrides+=(-c "task=generate" -c "image-size=${image_size:-32}")
    [ -n "$rounds" ] && overrides+=(-c "generate-rounds=$rounds")
    gen_rounds="$rounds" gen_size="${image_size:-32}" rounds="" image_size=""
  fi
  if [ "$preset" = quality ]; then  # the same run config as charts/fedssl/values-quality.yaml
    overrides+=(-c 'strategy="cyclic"' -c "hospital-batchnorm=true")
    ft_rounds="${ft_rounds:-16}" local_steps="${local_steps:-6}"
  fi
  [ -n "$rounds" ] && overrides+=(-c "ssl-rounds=$rounds")
  [ -n "$ft_rounds" ] && overrides+=(-c "finetune-rounds=$ft_rounds")
  [ -n "$image_size" ] && overrides+=(-c "image-size=$image_size")
  [ -n "$local_steps" ] && overrides+=(-c "local-steps=$local_steps")
  [ "$register_local" = true ] && overrides+=(-c "register-local-models=true")
  local d_rounds d_ft d_size d_steps d_gen d_gan  # the app's defaults (pyproject.toml [tool.flwr.app.config]) for what was not given
  read -r d_rounds d_ft d_size d_steps d_gen d_gan <<<"$("$VENV/bin/python" -c 'import sys, tomllib
c = tomllib.load(open(sys.argv[1], "rb"))["tool"]["flwr"]["app"]["config"]
print(c["ssl-rounds"], c["finetune-rounds"], c["image-size"], c["local-steps"], c["generate-rounds"], c["gan-steps"])' "$ROOT/pyproject.toml")"
  local held
  held="$([ "$max_images" = 0 ] && echo "all their images" || echo "at most $max_images images each")"
  if [ "$preset" = generate ]; then
    say "submitting the run (preset generate): a class-conditional GAN at $gen_size px, ${gen_rounds:-$d_gen} rounds of $d_gan steps on $hospitals hospitals ($source data, $held)"
  else
    say "submitting the run (preset $preset): ${rounds:-$d_rounds} SSL + ${ft_rounds:-$d_ft} fine-tune rounds of ${local_steps:-$d_steps} local steps at ${image_size:-$d_size} px on $hospitals hospitals ($source data, $held)$([ "$preset" = quality ] && echo ", cyclic weight transfer")"
  fi
  local rc=0
  fedssl-submit --superlink "127.0.0.1:$SUPERLINK_PORT" --app "$ROOT" --flwr-home "$FEDSSL_HOME/flwr-cli" \
    "${overrides[@]}" -c "min-hospitals=$min_hospitals" -c "wait-for-hospitals=600.0" -c "round-timeout=$round_timeout.0" -c "data-warning=\"$warning\"" \
    ${run_config[@]+"${run_config[@]}"} || rc=$?

  # Training is over either way: free the CPU, keep the registry serving.
  for f in "$PIDS"/*.pid; do [ "$f" = "$PIDS/registry.pid" ] || stop "$f"; done
  if [ "$rc" -ne 0 ]; then
    die "the federated run failed (see above; logs in $LOGS). The registry is still up: ./deploy-local.sh down stops it"
  fi

  local sample="$FEDSSL_HOME/sample.png"
  if [ "$source" = ham10000 ] && [ -d "$path/HAM10000_images_part_1" ]; then
    sample="$(find "$path/HAM10000_images_part_1" -name '*.jpg' -print -quit)"
  elif [ "$source" != synthetic ]; then
    sample="$(find "$path" \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) -print -quit)"
  else
    "$VENV/bin/python" -c "from PIL import Image; Image.new('RGB', (64, 64), (180, 120, 90)).save('$sample')"
  fi
  say "done. The registry keeps serving at $registry_url (dashboard: $registry_url/)"
  if [ "$preset" = generate ]; then
    say "draw synthetic images of one class (PNG, base64 in JSON; \"format\": \"zip\" for a zip):"
    echo
    echo "  curl -s -H \"Authorization: Bearer \$(cat $token_file)\" -H 'Content-Type: application/json' -d '{\"class\": 0, \"count\": 8, \"seed\": 1}' $registry_url/v1/models/fedssl-generator:generate"
    echo
  else
    say "classify an image (KServe-style REST):"
    echo
    echo "  curl -s -H \"Authorization: Bearer \$(cat $token_file)\" -F \"file=@$sample\" $registry_url/v1/models/fedssl-classifier:predict"
    echo
  fi
  if [ "$register_local" = true ]; then
    say "each hospital's own model is registered as fedssl-local-<hospital>; compare them on one image: $registry_url/dashboard/try"
  fi
  say "models: curl -s $registry_url/v1/models | python3 -m json.tool ; stop everything: ./deploy-local.sh down"
}

main() {
  local cmd="${1:-up}"
  case "$cmd" in
    up) [ $# -gt 0 ] && shift; cmd_up "$@" ;;
    status) cmd_status ;;
    down) cmd_down ;;
    -h|--help|help) usage ;;
    --*) cmd_up "$@" ;;
    *) usage >&2; die "unknown command '$cmd' (expected up, status, down or --kind)" ;;
  esac
}

main "$@"
