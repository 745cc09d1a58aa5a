{{/*
Names for the SuperLink's two listeners (fedssl-superlink-proxy, an nginx sidecar) and the
secrets they need. Kept apart from _helpers.tpl: the listener split of issue 17 item 1.

  fleet    `<fullname>-superlink`, port superlink.port: the Fleet API, for hospitals
  control  `<fullname>-superlink-control`, port superlink.controlPort: the Control API with a
           bearer token, for the run Job and operators
  the SuperLink itself listens on 127.0.0.1:superlink.internalPort inside its pod
*/}}

{{- define "fedssl.superlink.controlName" -}}
{{- printf "%s-superlink-control" (include "fedssl.fullname" .) -}}
{{- end -}}

{{- define "fedssl.superlink.controlHost" -}}
{{- printf "%s.%s.svc" (include "fedssl.superlink.controlName" .) .Release.Namespace -}}
{{- end -}}

{{/* Where the run Job (and operators, through a port-forward) dial the Control API. */}}
{{- define "fedssl.superlink.controlAddress" -}}
{{- printf "%s:%d" (include "fedssl.superlink.controlHost" .) (int .Values.superlink.controlPort) -}}
{{- end -}}

{{- define "fedssl.superlink.controlTokenSecretName" -}}
{{- .Values.superlink.control.existingSecret | default (printf "%s-control-token" (include "fedssl.fullname" .)) -}}
{{- end -}}

{{/* Where every pod that holds the control token finds it (a file, never an env var). */}}
{{- define "fedssl.superlink.controlTokenDir" -}}/etc/fedssl/control-token{{- end -}}

{{- define "fedssl.superlink.controlTokenVolume" -}}
- name: control-token
  secret:
    secretName: {{ include "fedssl.superlink.controlTokenSecretName" . }}
    defaultMode: 0440
    items:
      - key: token
        path: token
{{- end -}}

{{/*
A hospital's SuperNode key Secret: its own `authSecret`, else the chart's generated one, named
like the hospital's Deployment (a suffix would pass 63 characters with the longest names).
*/}}
{{- define "fedssl.hospital.authSecretName" -}}
{{- .hospital.authSecret | default (include "fedssl.supernode.name" .) -}}
{{- end -}}
