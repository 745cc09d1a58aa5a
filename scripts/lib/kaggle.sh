# shellcheck shell=bash
# Sourced by deploy-gke.sh and scripts/deploy-kind.sh: the Kaggle credentials that go into the
# cluster's Secret.

# kaggle_credentials: sets KAGGLE_USER and KAGGLE_SECRET_KEY from $KAGGLE_USERNAME/$KAGGLE_KEY
# or kaggle.json ($KAGGLE_CONFIG_DIR, else ~/.kaggle); false when there are none.
KAGGLE_USER="" KAGGLE_SECRET_KEY=""
kaggle_credentials() {
  if [ -n "${KAGGLE_USERNAME:-}" ] && [ -n "${KAGGLE_KEY:-}" ]; then
    KAGGLE_USER="$KAGGLE_USERNAME"; KAGGLE_SECRET_KEY="$KAGGLE_KEY"; return 0
  fi
  local file="${KAGGLE_CONFIG_DIR:-$HOME/.kaggle}/kaggle.json"
  [ -f "$file" ] || return 1
  KAGGLE_USER="$(sed -n 's/.*"username"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' "$file" | head -n 1)"
  KAGGLE_SECRET_KEY="$(sed -n 's/.*"key"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' "$file" | head -n 1)"
  [ -n "$KAGGLE_USER" ] && [ -n "$KAGGLE_SECRET_KEY" ]
}
