#!/usr/bin/env bash
# The run Job: wait for the SuperLink and the registry, register the hospitals' public keys
# (SuperNode authentication), stop runs still going, then submit a new run with
# `fedssl-submit` and follow it to its end. The exit code is the run's: 0 only when Flower
# reports it completed.
#
# Arguments: run config overrides for fedssl-submit (`-c key=value ...`).
# Environment (set by the chart): FEDSSL_SUPERLINK (host:port of the SuperLink's control
# listener), FEDSSL_CONTROL_TOKEN_FILE (its bearer token), FEDSSL_SUPERLINK_CA (CA file,
# empty = insecure), FEDSSL_REGISTRY_URL, FEDSSL_REGISTRY_CA (CA file of an HTTPS registry,
# empty = plain HTTP), FEDSSL_APP_DIR, FEDSSL_WAIT_SECONDS,
# FEDSSL_STOP_RUNNING (true|false), FEDSSL_TIMEOUT_SECONDS, FEDSSL_SUPERNODE_KEYS (a folder of
# <hospital>.pub files, empty = no SuperNode authentication).
set -euo pipefail

log() { printf '[fedssl] %s\n' "$*"; }

flwr_home="${TMPDIR:-/tmp}/flwr-cli"
mkdir -p "$flwr_home"
export FLWR_HOME="$flwr_home"

# wait_for NAME URL [CA]: until URL answers 2xx, at most FEDSSL_WAIT_SECONDS.
wait_for() {
  log "waiting for the $1 at $2"
  python - "$2" "${3:-}" "${FEDSSL_WAIT_SECONDS:-900}" <<'PY'
import ssl, sys, time, urllib.request
url, ca, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
ctx = ssl.create_default_context(cafile=ca) if ca else None
deadline, last = time.monotonic() + limit, ""
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=5, context=ctx):
            sys.exit(0)
    except Exception as exc:  # not up yet: DNS, refused, TLS handshake, 5xx
        last = f"{type(exc).__name__}: {exc}"
    time.sleep(max(0.1, min(3.0, deadline - time.monotonic())))
sys.exit(f"[fedssl] {url} did not answer within {limit:.0f}s (last error: {last})")
PY
}

scheme=http
[ -n "${FEDSSL_SUPERLINK_CA:-}" ] && scheme=https
wait_for SuperLink "$scheme://$FEDSSL_SUPERLINK/health" "${FEDSSL_SUPERLINK_CA:-}"
wait_for registry "$FEDSSL_REGISTRY_URL/v2/health/ready" "${FEDSSL_REGISTRY_CA:-}"

# The flwr CLI's connection `fedssl`, written by the same code fedssl-submit uses.
# FEDSSL_SUPERLINK is the control listener; the token (a mounted Secret) goes into the CLI's
# credential store, so every flwr command below sends it.
python -c 'import sys; from pathlib import Path; from fedssl_flower.submit import read_token_file, write_cli_config; write_cli_config(Path(sys.argv[1]), sys.argv[2], sys.argv[3] or None, read_token_file(sys.argv[4] or None))' \
  "$flwr_home" "$FEDSSL_SUPERLINK" "${FEDSSL_SUPERLINK_CA:-}" "${FEDSSL_CONTROL_TOKEN_FILE:-}"

if [ -n "${FEDSSL_SUPERNODE_KEYS:-}" ]; then
  for key in "$FEDSSL_SUPERNODE_KEYS"/*.pub; do
    [ -e "$key" ] || continue
    hospital="$(basename "$key" .pub)"
    # OpenSSH, PEM or (the chart's generated keys) a certificate: Flower reads OpenSSH only.
    openssh="$flwr_home/$hospital.pub"
    python -m fedssl_flower.node_keys public "$key" "$openssh"
    if out="$(flwr supernode register "$openssh" fedssl --name "$hospital" 2>&1)"; then
      log "registered the public key of $hospital"
    elif grep -qi "already in use" <<<"$out"; then
      log "the public key of $hospital is already registered"
    else
      printf '%s\n' "$out" >&2
      log "ERROR: registering the public key of $hospital failed"
      exit 1
    fi
  done
fi

if [ "${FEDSSL_STOP_RUNNING:-true}" = true ]; then
  running="$(flwr ls fedssl --format json 2>/dev/null | python -c '
import json, sys
text = sys.stdin.read()
try:
    runs = json.loads(text[text.find("{"):]).get("runs", [])
except ValueError:
    runs = []
print(" ".join(str(r["run-id"]) for r in runs if not str(r.get("status", "")).startswith("finished")))
' || true)"
  for run_id in $running; do
    log "stopping run $run_id, still going on the SuperLink (a new run replaces it)"
    flwr stop "$run_id" fedssl >/dev/null || log "could not stop run $run_id; it goes on"
  done
fi

submit=(fedssl-submit --superlink "$FEDSSL_SUPERLINK" --app "${FEDSSL_APP_DIR:-/opt/fedssl/app}" --flwr-home "$flwr_home"
        --timeout "${FEDSSL_TIMEOUT_SECONDS:-0}")
[ -n "${FEDSSL_SUPERLINK_CA:-}" ] && submit+=(--root-certificates "$FEDSSL_SUPERLINK_CA")
log "submitting: ${submit[*]} $*"
exec "${submit[@]}" "$@"
