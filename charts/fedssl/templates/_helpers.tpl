{{/*
Names, labels and the few computed values every template shares. Every object name and
label comes from here, so the NetworkPolicies, Services and tests can rely on them.
*/}}

{{- define "fedssl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name prefix of every object. Kept to 40 characters so that every derived name that must
be a DNS label (Services `<fullname>-superlink`, Deployments `<fullname>-<hospital>` with
hospital names up to 20 characters, the Job `<fullname>-run-<revision>`) stays within 63.
*/}}
{{- define "fedssl.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fedssl.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "superlink") */}}
{{- define "fedssl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedssl.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of one component's objects: (dict "root" $ "component" "superlink") */}}
{{- define "fedssl.labels" -}}
helm.sh/chart: {{ include "fedssl.chart" .root }}
{{ include "fedssl.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: fedssl
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Image of one component: (dict "root" $ "component" "superlink") */}}
{{- define "fedssl.image" -}}
{{- $img := .root.Values.image -}}
{{- $name := printf "%s%s" $img.repositoryPrefix .component -}}
{{- $tag := default .root.Chart.AppVersion $img.tag -}}
{{- if $img.registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $img.registry) $name $tag -}}
{{- else -}}
{{- printf "%s:%s" $name $tag -}}
{{- end -}}
{{- end -}}

{{- define "fedssl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fedssl.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The fields every pod spec shares (service account, security context, pull secrets). */}}
{{- define "fedssl.podCommon" -}}
serviceAccountName: {{ include "fedssl.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* nodeSelector/tolerations/affinity of a pod: (dict "root" $ "own" .Values.superlink [ "more" hospital ]) */}}
{{- define "fedssl.scheduling" -}}
{{- $more := .more | default dict -}}
{{- $nodeSelector := merge (deepCopy ($more.nodeSelector | default dict)) (deepCopy (.own.nodeSelector | default dict)) (deepCopy (.root.Values.nodeSelector | default dict)) -}}
{{- $tolerations := concat (.root.Values.tolerations | default list) (.own.tolerations | default list) ($more.tolerations | default list) -}}
{{- $affinity := $more.affinity | default .own.affinity -}}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Environment every fedssl process gets, whatever its image sets. */}}
{{- define "fedssl.baseEnv" -}}
- name: HOME
  value: /var/lib/fedssl
- name: FLWR_HOME
  value: /var/lib/fedssl/flwr
- name: FLWR_TELEMETRY_ENABLED
  value: "0"
- name: FLWR_DISABLE_UPDATE_CHECK
  value: "1"
- name: PYTHONUNBUFFERED
  value: "1"
{{- end -}}

{{/*
Torch threads for a container: its CPU limit rounded up (torch would otherwise start one
thread per CPU of the node and be throttled). Empty when there is no CPU limit.
*/}}
{{- define "fedssl.threads" -}}
{{- $cpu := "" -}}
{{- if and . .limits -}}{{- if hasKey .limits "cpu" -}}{{- $cpu = toString .limits.cpu -}}{{- end -}}{{- end -}}
{{- if $cpu -}}
{{- if hasSuffix "m" $cpu -}}
{{- max 1 (div (add (trimSuffix "m" $cpu | atoi) 999) 1000) -}}
{{- else -}}
{{- max 1 (ceil (float64 $cpu) | int) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A number as the processes read it: integers without a fraction or exponent. */}}
{{- define "fedssl.number" -}}
{{- if and (kindIs "float64" .) (eq (float64 .) (floor .)) -}}
{{- printf "%d" (int64 .) -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------ SuperLink */}}

{{- define "fedssl.superlink.name" -}}
{{- printf "%s-superlink" (include "fedssl.fullname" .) -}}
{{- end -}}

{{/* The Service's DNS name, as SuperNodes and the run Job dial it (and the certificate names it). */}}
{{- define "fedssl.superlink.host" -}}
{{- printf "%s.%s.svc" (include "fedssl.superlink.name" .) .Release.Namespace -}}
{{- end -}}

{{- define "fedssl.superlink.address" -}}
{{- printf "%s:%d" (include "fedssl.superlink.host" .) (int .Values.superlink.port) -}}
{{- end -}}

{{- define "fedssl.superlink.tlsSecretName" -}}
{{- .Values.superlink.tls.existingSecret | default (printf "%s-tls" (include "fedssl.superlink.name" .)) -}}
{{- end -}}

{{/* Where every pod that dials the SuperLink finds its CA certificate. */}}
{{- define "fedssl.superlink.caDir" -}}/etc/fedssl/superlink-ca{{- end -}}

{{/* Volume with the CA certificate only (never the key) of the SuperLink's TLS Secret. */}}
{{- define "fedssl.superlink.caVolume" -}}
- name: superlink-ca
  secret:
    secretName: {{ include "fedssl.superlink.tlsSecretName" . }}
    defaultMode: 0444
    items:
      - key: ca.crt
        path: ca.crt
{{- end -}}

{{/* ------------------------------------------------------------------ Registry */}}

{{- define "fedssl.registry.name" -}}
{{- printf "%s-registry" (include "fedssl.fullname" .) -}}
{{- end -}}

{{- define "fedssl.registry.url" -}}
{{- printf "%s://%s.%s.svc:%d" (ternary "https" "http" .Values.registry.tls.enabled) (include "fedssl.registry.name" .) .Release.Namespace (int .Values.registry.port) -}}
{{- end -}}

{{- define "fedssl.registry.tokenSecretName" -}}
{{- .Values.registry.auth.existingSecret | default (printf "%s-token" (include "fedssl.registry.name" .)) -}}
{{- end -}}

{{- define "fedssl.registry.tlsSecretName" -}}
{{- .Values.registry.tls.existingSecret | default (printf "%s-tls" (include "fedssl.registry.name" .)) -}}
{{- end -}}

{{/* The write token as a file, never an environment variable: env FEDSSL_REGISTRY_TOKEN_FILE. */}}
{{- define "fedssl.registry.tokenDir" -}}/etc/fedssl/registry-token{{- end -}}
{{- define "fedssl.registry.caDir" -}}/etc/fedssl/registry-ca{{- end -}}

{{/* What a client of the registry mounts: the token (`token`: true/false) and, with TLS, its CA. */}}
{{- define "fedssl.registry.clientMounts" -}}
{{- if .token }}
- name: registry-token
  mountPath: {{ include "fedssl.registry.tokenDir" .root }}
  readOnly: true
{{- end }}
{{- if .root.Values.registry.tls.enabled }}
- name: registry-ca
  mountPath: {{ include "fedssl.registry.caDir" .root }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "fedssl.registry.clientVolumes" -}}
{{- if .token }}
- name: registry-token
  secret:
    secretName: {{ include "fedssl.registry.tokenSecretName" .root }}
    defaultMode: 0440
    items:
      - key: token
        path: token
{{- end }}
{{- if .root.Values.registry.tls.enabled }}
- name: registry-ca
  secret:
    secretName: {{ include "fedssl.registry.tlsSecretName" .root }}
    defaultMode: 0444
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- end -}}

{{- define "fedssl.registry.clientEnv" -}}
- name: FEDSSL_REGISTRY_URL
  value: {{ include "fedssl.registry.url" .root | quote }}
{{- if .token }}
- name: FEDSSL_REGISTRY_TOKEN_FILE
  value: {{ printf "%s/token" (include "fedssl.registry.tokenDir" .root) | quote }}
{{- end }}
{{- if .root.Values.registry.tls.enabled }}
- name: FEDSSL_REGISTRY_CA
  value: {{ printf "%s/ca.crt" (include "fedssl.registry.caDir" .root) | quote }}
{{- end }}
{{- end -}}

{{/* The token (base64) once per render, shared by the Secret and the checksums: the stored
one (`lookup`; an existingSecret's too, so rotating it and upgrading rolls the pods), else a
new one for a generated Secret, else "" (`helm template` of an existingSecret). */}}
{{- define "fedssl.registry.token" -}}
{{- $auth := .Values.registry.auth -}}
{{- if not (hasKey $auth "_token") -}}
{{- $old := lookup "v1" "Secret" .Release.Namespace (include "fedssl.registry.tokenSecretName" .) -}}
{{- $token := dig "data" "token" "" $old -}}
{{- if and (not $token) (not $auth.existingSecret) -}}
{{- $token = randAlphaNum 48 | b64enc -}}
{{- end -}}
{{- $_ := set $auth "_token" $token -}}
{{- end -}}
{{- $auth._token -}}
{{- end -}}

{{/* Pods that hold the token roll when it changes. */}}
{{- define "fedssl.registry.tokenChecksum" -}}
checksum/registry-token: {{ include "fedssl.registry.token" . | sha256sum }}
{{- end -}}

{{/* ------------------------------------------------------------------ Hospitals */}}

{{- define "fedssl.supernode.name" -}}
{{- printf "%s-%s" (include "fedssl.fullname" .root) .hospital.name -}}
{{- end -}}

{{- define "fedssl.kaggle.secretName" -}}
{{- .Values.kaggle.existingSecret | default (printf "%s-kaggle" (include "fedssl.fullname" .)) -}}
{{- end -}}

{{/* true when any hospital's data.source is `source`: (dict "root" $ "source" "kaggle") */}}
{{- define "fedssl.anySource" -}}
{{- $found := false -}}
{{- range .root.Values.hospitals -}}{{- if eq .data.source $.source -}}{{- $found = true -}}{{- end -}}{{- end -}}
{{- if $found -}}true{{- end -}}
{{- end -}}

{{/* The node data-source and data-path of a hospital: "ham10000 /data/ham10000" or "synthetic". */}}
{{- define "fedssl.hospital.dataMount" -}}
{{- $d := .data -}}
{{- if eq $d.source "synthetic" -}}
{{- else if eq $d.source "kaggle" -}}/data
{{- else if eq (default "ham10000" $d.format) "imagefolder" -}}/data/imagefolder
{{- else -}}/data/ham10000
{{- end -}}
{{- end -}}

{{/*
Where a kaggle hospital's download goes and where its images are: (dict "target" DIR "data" DIR).
HAM10000 (no data.kaggle.dataset) stays at /data/ham10000; another dataset goes to
/data/kaggle/OWNER/DATASET (fedssl_flower.data.kaggle.KaggleDataset.target_in) and its images
are at data.kaggle.path inside it.
*/}}
{{- define "fedssl.hospital.kaggleDirs" -}}
{{- $k := .data.kaggle | default dict -}}
{{- if $k.dataset -}}
{{- $target := printf "/data/kaggle/%s" $k.dataset -}}
{{- $sub := trimSuffix "/" ($k.path | default "") -}}
{{- dict "target" $target "data" (ternary (printf "%s/%s" $target $sub) $target (ne $sub "")) "path" $sub | toJson -}}
{{- else -}}
{{- dict "target" "/data/ham10000" "data" "/data/ham10000" "path" "" | toJson -}}
{{- end -}}
{{- end -}}

{{/*
A string as a --node-config value. Flower cuts --node-config at quotes and knows no escapes
(flwr.common.config.parse_config_args), then reads each value as TOML: '...' (a literal) unless
the value holds a ', else "..." when it holds no " or \. (dict "value" STRING "what" "hospital h: data.x")
*/}}
{{- define "fedssl.tomlString" -}}
{{- $s := .value -}}
{{- if contains "\n" $s -}}
{{- fail (printf "%s: %q holds a line break; expected a single line" .what $s) -}}
{{- else if not (contains "'" $s) -}}
{{- printf "'%s'" $s -}}
{{- else if not (or (contains "\"" $s) (contains "\\" $s)) -}}
{{- printf "\"%s\"" $s -}}
{{- else -}}
{{- fail (printf "%s: %q holds both ' and \" (or \\), which a --node-config value cannot; rename the folder or class" .what $s) -}}
{{- end -}}
{{- end -}}

{{/*
A hospital's data.labelMap as its node config `label-map`: compact JSON {"folder":"class"}
(fedssl_flower.data.labels.parse_label_map), every ' written as \u0027 so that it fits a '...'
value whatever the folder names hold (as fedssl_flower.data.layout writes it).
*/}}
{{- define "fedssl.hospital.labelMapValue" -}}
{{- printf "'%s'" (toJson . | replace "'" "\\u0027") -}}
{{- end -}}

{{/*
A hospital's --node-config (docs/architecture.md section 4): (dict "root" $ "hospital" .).
`partition: null` gives the hospital all of its data (one partition of one).
*/}}
{{- define "fedssl.hospital.nodeConfig" -}}
{{- $root := .root -}}
{{- $h := .hospital -}}
{{- $fed := $root.Values.federation -}}
{{- $cfg := list (printf "hospital=%s" ($h.name | quote)) (printf "ssl-task=%s" ($h.sslTask | quote)) -}}
{{- if eq $h.data.source "synthetic" -}}
{{- $cfg = append $cfg "data-source=\"synthetic\"" -}}
{{- else -}}
{{- $format := default "ham10000" $h.data.format -}}
{{- $path := include "fedssl.hospital.dataMount" $h -}}
{{- if eq $h.data.source "kaggle" -}}
{{- /* A Kaggle dataset other than HAM10000 is a class-per-folder tree at its sub-path. */ -}}
{{- $format = ternary "imagefolder" "ham10000" (not (empty ($h.data.kaggle | default dict).dataset)) -}}
{{- $path = (include "fedssl.hospital.kaggleDirs" $h | fromJson).data -}}
{{- end -}}
{{- $cfg = append $cfg (printf "data-source=%s" ($format | quote)) -}}
{{- $cfg = append $cfg (printf "data-path=%s" ($path | quote)) -}}
{{- /* Class-per-folder data: its folder -> class map and class list (fedssl.validate allows them only there). */ -}}
{{- with $h.data.labelMap -}}
{{- $cfg = append $cfg (printf "label-map=%s" (include "fedssl.hospital.labelMapValue" .)) -}}
{{- end -}}
{{- with $h.data.classNames -}}
{{- $cfg = append $cfg (printf "class-names=%s" (include "fedssl.tomlString" (dict "value" (join "," .) "what" (printf "hospital %s: data.classNames" $h.name)))) -}}
{{- end -}}
{{- end -}}
{{- $withPartition := list -}}
{{- range $root.Values.hospitals -}}{{- if not (kindIs "invalid" .partition) -}}{{- $withPartition = append $withPartition .name -}}{{- end -}}{{- end -}}
{{- if kindIs "invalid" $h.partition -}}
{{- $cfg = append $cfg "partition-id=0 num-partitions=1" -}}
{{- else -}}
{{- $n := int ($fed.numPartitions | default (len $withPartition)) -}}
{{- $cfg = append $cfg (printf "partition-id=%d num-partitions=%d" (int $h.partition) $n) -}}
{{- $cfg = append $cfg (printf "partition-by=%s" ($fed.partitionBy | quote)) -}}
{{- if eq $fed.partitionBy "dirichlet" -}}
{{- $cfg = append $cfg (printf "dirichlet-alpha=%s" (include "fedssl.number" $fed.dirichletAlpha)) -}}
{{- end -}}
{{- end -}}
{{- $maxImages := $fed.maxImages -}}
{{- if hasKey $h "maxImages" -}}{{- $maxImages = $h.maxImages -}}{{- end -}}
{{- $cfg = append $cfg (printf "max-images=%d" (int $maxImages)) -}}
{{- $cfg = append $cfg "cache-dir=\"/var/lib/fedssl/cache\"" -}}
{{- /* The hospital's private models between rounds (never sent anywhere). */ -}}
{{- $cfg = append $cfg "state-dir=\"/var/lib/fedssl/state\"" -}}
{{- /* The download is the init container's job; the SuperNode itself has no credentials. */ -}}
{{- $cfg = append $cfg "download=false" -}}
{{- $threads := include "fedssl.threads" ($h.resources | default $root.Values.supernode.resources) -}}
{{- if $threads -}}{{- $cfg = append $cfg (printf "threads=%s" $threads) -}}{{- end -}}
{{- range $k, $v := $h.nodeConfig -}}
{{- if kindIs "string" $v -}}
{{- $cfg = append $cfg (printf "%s=%s" $k (include "fedssl.tomlString" (dict "value" $v "what" (printf "hospital %s: nodeConfig.%s" $h.name $k)))) -}}
{{- else if kindIs "bool" $v -}}
{{- $cfg = append $cfg (printf "%s=%t" $k $v) -}}
{{- else -}}
{{- $cfg = append $cfg (printf "%s=%s" $k (include "fedssl.number" $v)) -}}
{{- end -}}
{{- end -}}
{{- join " " $cfg -}}
{{- end -}}

{{/* ------------------------------------------------------------------ Checks */}}

{{/* Combinations the schema cannot express; fails the render with what to change. */}}
{{- define "fedssl.validate" -}}
{{- $v := .Values -}}
{{- if and $v.superlink.supernodeAuth.enabled (not $v.superlink.tls.enabled) -}}
{{- fail "superlink.supernodeAuth.enabled needs superlink.tls.enabled=true (Flower refuses node authentication without TLS)" -}}
{{- end -}}
{{- $names := dict -}}
{{- $withPartition := 0 -}}
{{- range $v.hospitals -}}
{{- if hasKey $names .name -}}
{{- fail (printf "hospitals: the name %q appears twice; each hospital needs its own name" .name) -}}
{{- end -}}
{{- $_ := set $names .name true -}}
{{- if not (kindIs "invalid" .partition) -}}{{- $withPartition = add1 $withPartition -}}{{- end -}}
{{- if and (eq .data.source "pvc") (not .data.claimName) -}}
{{- fail (printf "hospital %s: data.source=pvc needs data.claimName" .name) -}}
{{- end -}}
{{- if and (eq .data.source "hostPath") (not .data.path) -}}
{{- fail (printf "hospital %s: data.source=hostPath needs data.path (a directory on the node)" .name) -}}
{{- end -}}
{{- $h := . -}}
{{- $imagefolder := or (and (has .data.source (list "pvc" "hostPath")) (eq (default "ham10000" .data.format) "imagefolder")) (and (eq .data.source "kaggle") (not (empty (.data.kaggle | default dict).dataset))) -}}
{{- $what := ternary "synthetic images" (printf "%s with format %s" .data.source (default "ham10000" .data.format)) (eq .data.source "synthetic") -}}
{{- if eq .data.source "kaggle" -}}{{- $what = "kaggle HAM10000 (no data.kaggle.dataset)" -}}{{- end -}}
{{- range $field := list "labelMap" "classNames" -}}
{{- if and (not $imagefolder) (not (empty (get $h.data $field))) -}}
{{- fail (printf "hospital %s: data.%s is for class-per-folder data (data.format: imagefolder on pvc/hostPath, or data.kaggle.dataset on kaggle); its data is %s, whose classes are fixed" $h.name $field $what) -}}
{{- end -}}
{{- end -}}
{{- range $key, $field := dict "label-map" "labelMap" "class-names" "classNames" -}}
{{- if and (not (empty (get $h.data $field))) (hasKey ($h.nodeConfig | default dict) $key) -}}
{{- fail (printf "hospital %s: both data.%s and nodeConfig.%s are set; keep data.%s only" $h.name $field $key $field) -}}
{{- end -}}
{{- end -}}
{{- if and .data.labelMap .data.classNames -}}
{{- $stray := list -}}
{{- range $folder, $class := .data.labelMap -}}{{- if not (has (trim $class) $h.data.classNames) -}}{{- $stray = append $stray (trim $class) -}}{{- end -}}{{- end -}}
{{- with $stray -}}
{{- fail (printf "hospital %s: data.labelMap maps to %s, which data.classNames (%s) does not list; add it there or fix the map" $h.name (join ", " (uniq .)) (join ", " $h.data.classNames)) -}}
{{- end -}}
{{- end -}}
{{- if and (eq .data.source "kaggle") (not $v.kaggle.existingSecret) (not (and $v.kaggle.username $v.kaggle.key)) -}}
{{- fail (printf "hospital %s downloads its data from Kaggle: set kaggle.existingSecret (a Secret with username and key) or kaggle.username and kaggle.key" .name) -}}
{{- end -}}
{{- end -}}
{{- $n := int ($v.federation.numPartitions | default $withPartition) -}}
{{- range $v.hospitals -}}
{{- if and (not (kindIs "invalid" .partition)) (ge (int .partition) $n) -}}
{{- fail (printf "hospital %s: partition %d is out of range; there are %d partitions (federation.numPartitions)" .name (int .partition) $n) -}}
{{- end -}}
{{- end -}}
{{- if and (eq $v.federation.partitionBy "site") (gt $n 4) -}}
{{- fail "federation.partitionBy=site has at most 4 partitions (HAM10000's acquisition sites)" -}}
{{- end -}}
{{- end -}}
