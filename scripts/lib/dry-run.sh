# shellcheck shell=bash
# Sourced by deploy-gke.sh and scripts/deploy-kind.sh: run commands, or only print them when
# DRY_RUN=1 (set by the caller's --dry-run).

# show CMD...: the command as one line a shell would run (arguments quoted only when needed).
show() {
  local out="+" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=" $a"; else out+=" ${a@Q}"; fi
  done
  printf '%s\n' "$out"
}
# run CMD...: run it, or print it with --dry-run.
run() { if [ "${DRY_RUN:-0}" = 1 ]; then show "$@"; else "$@"; fi; }
