{{/* Pieces every eagle pod shares. */}}

{{/* The environment of every eagle container. */}}
{{- define "eagle-serve.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: EAGLE_HOME
  value: {{ .Values.modelStorage.mountPath | quote }}
- name: EAGLE_LOG
  value: {{ .Values.logLevel | quote }}
- name: HOME
  value: /tmp
{{- end -}}

{{/* Pod-level settings: (dict "root" $ "nodeSelector" .. "tolerations" .. "affinity" ..). */}}
{{- define "eagle-serve.podSpecCommon" -}}
{{- $root := .root -}}
serviceAccountName: {{ include "eagle-serve.serviceAccountName" $root }}
automountServiceAccountToken: {{ $root.Values.serviceAccount.automountToken }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Pod annotations: the user's plus, with metrics on, the prometheus.io/* scrape annotations that
annotation-based scrape configs read (deploy/prometheus/prometheus-kubernetes.yml keys on the
`metrics` port name instead). The services serve at /metrics only.
*/}}
{{- define "eagle-serve.podAnnotations" -}}
{{- $a := dict -}}
{{- if .root.Values.metrics.enabled -}}
{{- $_ := set $a "prometheus.io/scrape" "true" -}}
{{- $_ := set $a "prometheus.io/port" (toString (int .root.Values.metrics.port)) -}}
{{- $_ := set $a "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- $a = merge (deepCopy (.extra | default dict)) $a -}}
{{- with $a }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The model volume, /tmp, and the optional secrets: (dict "root" $ "shm" bool). */}}
{{- define "eagle-serve.volumes" -}}
{{- $v := .root.Values -}}
- name: models
{{- if eq $v.modelStorage.type "emptyDir" }}
  emptyDir:
    sizeLimit: {{ $v.modelStorage.size }}
{{- else if eq $v.modelStorage.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ include "eagle-serve.fullname" .root }}-models
{{- else }}
  persistentVolumeClaim:
    claimName: {{ $v.modelStorage.existingClaim }}
{{- end }}
- name: tmp
  emptyDir: {}
{{- if .shm }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $v.workers.shmSize }}
{{- end }}
{{- if $v.security.tls.enabled }}
- name: tls
  secret:
    secretName: {{ $v.security.tls.secretName }}
{{- end }}
{{- if $v.security.apiKeys.enabled }}
- name: api-keys
  secret:
    secretName: {{ $v.security.apiKeys.secretName }}
{{- end }}
{{- end -}}

{{- define "eagle-serve.volumeMounts" -}}
{{- $v := .root.Values -}}
- name: models
  mountPath: {{ $v.modelStorage.mountPath }}
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .shm }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- if $v.security.tls.enabled }}
- name: tls
  mountPath: {{ $v.security.tls.mountPath }}
  readOnly: true
{{- end }}
{{- if $v.security.apiKeys.enabled }}
- name: api-keys
  mountPath: {{ $v.security.apiKeys.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* The init container that runs `eagle fetch`: (dict "root" $ "fetch" NAME). */}}
{{- define "eagle-serve.fetchInit" -}}
{{- $v := .root.Values -}}
- name: fetch-model
  image: {{ include "eagle-serve.image" .root }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  command:
    {{- include "eagle-serve.flags.fetch" . | nindent 4 }}
  env:
    {{- include "eagle-serve.podEnv" .root | nindent 4 }}
    {{- with $v.fetch.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  resources:
    {{- toYaml $v.fetch.resources | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: {{ $v.modelStorage.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end -}}

{{/*
Native gRPC probes on grpc.health.v1: (dict "port" N "probes" .Values.<component>.probes).
`service` picks the health entry ("" the service itself, "eagle.etcd" its view of etcd).
*/}}
{{- define "eagle-serve.grpcProbes" -}}
{{- $port := int .port -}}
{{- range $kind := list "startup" "readiness" "liveness" }}
{{- $p := index $.probes $kind }}
{{ $kind }}Probe:
  grpc:
    port: {{ $port }}
    service: {{ $p.service | default "" | quote }}
  periodSeconds: {{ $p.periodSeconds | default 10 }}
  failureThreshold: {{ $p.failureThreshold | default 3 }}
  timeoutSeconds: {{ $p.timeoutSeconds | default 2 }}
{{- end }}
{{- end -}}

{{/* The GPU request of a pod on device cuda: (dict "root" $ "resources" .. "gpus" N). */}}
{{- define "eagle-serve.resources" -}}
{{- $r := deepCopy (.resources | default dict) -}}
{{- if and (eq .root.Values.device "cuda") (gt (int .gpus) 0) -}}
{{- $limits := $r.limits | default dict -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $r "limits" $limits -}}
{{- $requests := $r.requests | default dict -}}
{{- $_ := set $requests "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $r "requests" $requests -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}
