# shellcheck shell=bash
# shellcheck disable=SC2034  # it sets variables for the scripts that source it
# Sourced by deploy-gke.sh and scripts/deploy-kind.sh, after lib/kaggle.sh: the hospitals' data
# options, checked together before anything runs, and the chart values they become.
#   --data auto|kaggle|synthetic|kaggle:OWNER/DATASET[/SUB/PATH]
#   --partition SCHEME  --dirichlet-alpha A  --label-map MAP  --class-names a,b,...
# auto and kaggle are HAM10000 (the chart's `kaggle.dataset`); kaggle:OWNER/DATASET[/SUB/PATH]
# is any Kaggle dataset, its sub-path one folder per class, split into the hospitals by
# --partition random|dirichlet (the rules of deploy-local.sh and fedssl_flower.data.layout).

# json_string S: S as a JSON string literal.
json_string() {
  local s="$1"
  s="${s//\\/\\\\}"; s="${s//\"/\\\"}"; s="${s//$'\n'/\\n}"; s="${s//$'\r'/\\r}"; s="${s//$'\t'/\\t}"
  printf '"%s"' "$s"
}

# data_plan DATA HOSPITALS PARTITION ALPHA LABEL_MAP CLASS_NAMES (empty = not given); sets
#   DATA_SOURCE     kaggle or synthetic (the chart's hospitals[].data.source)
#   DATA_KIND       ham10000, imagefolder or synthetic
#   DATA_WHAT       what the hospitals train on, in words
#   DATA_HOSPITALS  the chart's `hospitals`, as JSON for --set-json: hospital-1..N, SSL tasks
#                   simclr and rotation in turn, partition i each, the data, the label options
#   DATA_PARTITION  the partition scheme ("" = the chart's default, lesion)
#   DATA_SETS       --set arguments for the chart's `federation` (the partition scheme)
# or sets DATA_ERROR to what was wrong and what was expected, and is false.
DATA_SOURCE="" DATA_KIND="" DATA_WHAT="" DATA_HOSPITALS="" DATA_PARTITION="" DATA_ERROR="" DATA_SETS=()
data_plan() {
  local data="$1" hospitals="$2" partition="$3" alpha="$4" label_map="$5" class_names="$6"
  local schemes data_json node_json="" i tasks=(simclr rotation)
  DATA_SOURCE="" DATA_KIND="" DATA_WHAT="" DATA_HOSPITALS="" DATA_PARTITION="" DATA_ERROR="" DATA_SETS=()
  case "$data" in
    auto|kaggle) DATA_SOURCE=kaggle DATA_KIND=ham10000 DATA_WHAT="HAM10000" ;;
    synthetic) DATA_SOURCE=synthetic DATA_KIND=synthetic DATA_WHAT="synthetic images" ;;
    kaggle:*)
      kaggle_data_parse "$data" || { DATA_ERROR="$KAGGLE_DATA_ERROR"; return 1; }
      DATA_SOURCE=kaggle
      if [ "$KAGGLE_DATASET" = "$KAGGLE_HAM10000_DATASET" ]; then
        DATA_KIND=ham10000 DATA_WHAT="HAM10000"  # its own layout, as plain --data kaggle
      else
        DATA_KIND=imagefolder DATA_WHAT="$KAGGLE_DATASET${KAGGLE_PATH:+/$KAGGLE_PATH}"
      fi ;;
    *) DATA_ERROR="--data must be auto, kaggle (both HAM10000), synthetic or kaggle:OWNER/DATASET[/SUB/PATH], got '$data'"; return 1 ;;
  esac
  { [[ "$hospitals" =~ ^[0-9]+$ ]] && [ "$hospitals" -ge 1 ]; } \
    || { DATA_ERROR="--hospitals must be a whole number >= 1, got '$hospitals'"; return 1; }

  # How one dataset is cut into the hospitals.
  if [ "$DATA_KIND" = synthetic ]; then
    if [ -n "$partition$alpha$label_map$class_names" ]; then
      DATA_ERROR="--partition, --dirichlet-alpha, --label-map and --class-names apply to real data (--data auto, kaggle or kaggle:OWNER/DATASET[/SUB/PATH]), not to --data synthetic"
      return 1
    fi
  fi
  if [ -n "$alpha" ]; then
    [[ "$alpha" == .* ]] && alpha="0$alpha"  # .5 = 0.5; the chart takes it as a JSON number
    { [[ "$alpha" =~ ^(0|[1-9][0-9]*)(\.[0-9]+)?$ ]] && [[ ! "$alpha" =~ ^[0.]*$ ]]; } \
      || { DATA_ERROR="--dirichlet-alpha must be a number > 0, got '$4'"; return 1; }
    [ "$partition" = dirichlet ] || { DATA_ERROR="--dirichlet-alpha needs --partition dirichlet"; return 1; }
  fi
  if [ "$DATA_KIND" = ham10000 ]; then schemes="site lesion dirichlet"; else schemes="random dirichlet"; fi
  if [ "$DATA_KIND" = imagefolder ] && [ -z "$partition" ]; then partition=random; fi
  if [ -n "$partition" ]; then
    case "$partition" in
      site|lesion|dirichlet|random) ;;
      *) DATA_ERROR="--partition $partition: expected site, lesion or dirichlet for HAM10000, random or dirichlet for a class-per-folder Kaggle dataset (--data kaggle:OWNER/DATASET[/SUB/PATH])"; return 1 ;;
    esac
    if [[ " $schemes " != *" $partition "* ]]; then
      if [ "$DATA_KIND" = ham10000 ]; then
        DATA_ERROR="--partition $partition: HAM10000 splits by site, lesion or dirichlet ('random' is for class-per-folder datasets)"
      else
        DATA_ERROR="--partition $partition: --data $data is a class-per-folder tree, which has no lesion ids or acquisition sites (those are HAM10000's); split it by random or dirichlet"
      fi
      return 1
    fi
    if [ "$partition" = site ] && [ "$hospitals" -gt 4 ]; then
      DATA_ERROR="--partition site: HAM10000 has 4 acquisition sites, so at most 4 hospitals; got --hospitals $hospitals"
      return 1
    fi
    DATA_PARTITION="$partition"
    DATA_SETS+=(--set "federation.partitionBy=$partition")
    [ -z "$alpha" ] || DATA_SETS+=(--set-json "federation.dirichletAlpha=$alpha")
  fi

  # Which folder is which class: passed to every hospital's node config as it is.
  if [ -n "$label_map$class_names" ] && [ "$DATA_KIND" != imagefolder ]; then
    DATA_ERROR="--label-map/--class-names: HAM10000's 7 classes come from its metadata (dx column); they apply to class-per-folder data (--data kaggle:OWNER/DATASET[/SUB/PATH]) only"
    return 1
  fi
  if [ -n "$label_map" ]; then
    _data_label_map "$label_map" || return 1
    node_json+="${node_json:+,}\"label-map\":$(json_string "$label_map")"
  fi
  if [ -n "$class_names" ]; then
    if [[ "$class_names" == *\"* || "$class_names" == *[[:cntrl:]]* ]]; then
      DATA_ERROR="--class-names '$class_names': a class name cannot hold '\"' or a control character here (the chart passes the list inside a double-quoted node config value)"
      return 1
    fi
    if [[ ",$class_names," == *,,* || "$class_names" =~ ^[[:space:],]*$ ]]; then
      DATA_ERROR="--class-names '$class_names': expected a comma list of class names with none empty, e.g. glioma,meningioma,notumor,pituitary"
      return 1
    fi
    node_json+="${node_json:+,}\"class-names\":$(json_string "$class_names")"
  fi

  # The hospitals.
  case "$DATA_KIND" in
    synthetic|ham10000) data_json="{\"source\":\"$DATA_SOURCE\"}" ;;
    imagefolder)
      data_json="{\"source\":\"kaggle\",\"kaggle\":{\"dataset\":$(json_string "$KAGGLE_DATASET")"
      [ -z "$KAGGLE_PATH" ] || data_json+=",\"path\":$(json_string "$KAGGLE_PATH")"
      data_json+="}}" ;;
  esac
  DATA_HOSPITALS=""
  for ((i = 0; i < hospitals; i++)); do
    DATA_HOSPITALS+="${DATA_HOSPITALS:+,}{\"name\":\"hospital-$((i + 1))\",\"sslTask\":\"${tasks[$((i % ${#tasks[@]}))]}\",\"partition\":$i,\"data\":$data_json"
    [ -z "$node_json" ] || DATA_HOSPITALS+=",\"nodeConfig\":{$node_json}"
    DATA_HOSPITALS+="}"
  done
  DATA_HOSPITALS="[$DATA_HOSPITALS]"
}

# _data_label_map MAP: checks a --label-map for the cluster; a file is read here (the hospitals
# cannot see it) and its entries joined with ','. Sets label_map (data_plan's) or DATA_ERROR.
_data_label_map() {
  local value="$1" text line item folder entries=()
  text="$value"
  if [[ "$value" != [\{\[]* && "$value" != *=* ]]; then
    if [ ! -f "$value" ]; then
      DATA_ERROR="--label-map '$value' is neither a file nor 'folder=class' entries; expected 'folder=class,...' (e.g. 'no_tumor=notumor,glioma_tumor=glioma') or a file of such lines"
      return 1
    fi
    text=""
    while IFS= read -r line || [ -n "$line" ]; do
      line="${line%$'\r'}"
      [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
      text+="${text:+,}$line"
    done <"$value"
    [ -n "$text" ] || { DATA_ERROR="--label-map $value: the file holds no 'folder=class' entries"; return 1; }
  fi
  if [[ "$text" == *\"* ]]; then
    DATA_ERROR="--label-map: JSON (or any '\"') cannot go into a hospital's node config through the chart, which quotes the value with '\"'; write it as 'folder=class,...' entries (deploy-local.sh takes JSON too)"
    return 1
  fi
  if [[ "$text" == *[[:cntrl:]]* ]]; then
    DATA_ERROR="--label-map holds a control character; expected 'folder=class,...' entries"
    return 1
  fi
  IFS=, read -r -a entries <<<"$text"
  for item in ${entries[@]+"${entries[@]}"}; do
    [[ "$item" =~ ^[[:space:]]*(#|$) ]] && continue
    folder="${item%=*}"
    if [[ "$item" != *=* || "$folder" =~ ^[[:space:]]*$ || "${item##*=}" =~ ^[[:space:]]*$ ]]; then
      DATA_ERROR="--label-map entry '$item' is not 'folder=class'; expected 'folder=class,...', e.g. 'no_tumor=notumor,glioma_tumor=glioma'"
      return 1
    fi
    if [[ "$folder" == *:* ]]; then
      DATA_ERROR="--label-map entry '$item' names a hospital: --data kaggle:... is one class-per-folder tree split among the hospitals, so they share one label map; write 'folder=class'"
      return 1
    fi
  done
  label_map="$text"
}
