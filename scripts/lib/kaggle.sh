# shellcheck shell=bash
# shellcheck disable=SC2034  # it sets variables for the scripts that source it
# Sourced by deploy-gke.sh and scripts/deploy-kind.sh: the --data kaggle:... parser (below) and
# the Kaggle credentials that go into the cluster's Secret.

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

# kaggle_data_parse CHOICE: a --data value kaggle:OWNER/DATASET[/SUB/PATH], checked by the rules
# of deploy-local.sh (the slug) and fedssl_flower.data.kaggle (the sub-path), so a cluster gets
# no value its download would refuse. Sets KAGGLE_DATASET (OWNER/DATASET) and KAGGLE_PATH (the
# sub-path normalised, a//b/ -> a/b; "" = the top of the download); otherwise sets
# KAGGLE_DATA_ERROR to what was wrong and what was expected, and is false.
KAGGLE_HAM10000_DATASET=kmader/skin-cancer-mnist-ham10000
KAGGLE_DATA_EXAMPLES="e.g. kaggle:masoudnickparvar/brain-tumor-mri-dataset/Training or kaggle:paultimothymooney/chest-xray-pneumonia/chest_xray/train"
KAGGLE_DATASET="" KAGGLE_PATH="" KAGGLE_DATA_ERROR=""
kaggle_data_parse() {
  local choice="$1" slug sub="" part parts=() kept=()
  KAGGLE_DATASET="" KAGGLE_PATH="" KAGGLE_DATA_ERROR=""
  slug="${choice#kaggle:}"
  if [[ ! "$slug" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(/.*)?$ ]]; then
    KAGGLE_DATA_ERROR="--data $choice: expected kaggle:OWNER/DATASET[/SUB/PATH] as in the dataset's Kaggle URL, $KAGGLE_DATA_EXAMPLES"
    return 1
  fi
  KAGGLE_DATASET="${slug%%/*}/"; part="${slug#*/}"; KAGGLE_DATASET+="${part%%/*}"
  [[ "$part" == */* ]] && sub="${part#*/}"
  if [[ "$sub" == *\\* ]]; then
    KAGGLE_DATA_ERROR="--data $choice: the sub-path '$sub' holds a backslash; write folders with '/', e.g. chest_xray/train"
    return 1
  fi
  if [[ "$sub" == /* ]]; then
    KAGGLE_DATA_ERROR="--data $choice: the sub-path '$sub' is absolute; expected a folder inside the download, e.g. Training"
    return 1
  fi
  if [[ "$sub" == *[[:cntrl:]]* ]]; then
    KAGGLE_DATA_ERROR="--data $choice: the sub-path holds a control character; expected a folder inside the download, e.g. Training"
    return 1
  fi
  IFS=/ read -r -a parts <<<"$sub"
  for part in ${parts[@]+"${parts[@]}"}; do
    case "$part" in
      ""|.) ;;
      ..|.*) KAGGLE_DATA_ERROR="--data $choice: '$part' is not allowed in the sub-path; expected a folder inside the download, e.g. Training"; return 1 ;;
      *) kept+=("$part") ;;
    esac
  done
  for part in ${kept[@]+"${kept[@]}"}; do KAGGLE_PATH+="${KAGGLE_PATH:+/}$part"; done
  if [ "$KAGGLE_DATASET" = "$KAGGLE_HAM10000_DATASET" ] && [ -n "$KAGGLE_PATH" ]; then
    KAGGLE_DATA_ERROR="--data $choice: HAM10000 is used from the top of its download; drop the sub-path '$KAGGLE_PATH' (or use --data kaggle)"
    return 1
  fi
}
