{{/*
Names, labels, the image, paths, and the checks on values that a JSON schema cannot express
(each `fail` names the value it refuses).
*/}}

{{- define "eagle-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "eagle-serve.fullname" -}}
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

{{- define "eagle-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "eagle-serve.labels" -}}
helm.sh/chart: {{ include "eagle-serve.chart" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: eagle-serve
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{ include "eagle-serve.selectorLabels" . }}
{{- end -}}

{{- define "eagle-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "eagle-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "coordinator"). */}}
{{- define "eagle-serve.componentSelector" -}}
{{ include "eagle-serve.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "eagle-serve.componentLabels" -}}
{{ include "eagle-serve.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "eagle-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "eagle-serve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The eagle image: <repository>:<tag or appVersion-device>. */}}
{{- define "eagle-serve.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.device) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* The cluster name in etcd. */}}
{{- define "eagle-serve.clusterName" -}}
{{- .Values.cluster.name | default .Release.Name -}}
{{- end -}}

{{/* "<svc>.<namespace>.svc.<domain>" for a service name. */}}
{{- define "eagle-serve.svcHost" -}}
{{- printf "%s.%s.svc.%s" .name .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{/* A path in the model volume: absolute paths stay, relative ones hang off mountPath. */}}
{{- define "eagle-serve.volumePath" -}}
{{- if hasPrefix "/" .path -}}
{{- .path -}}
{{- else -}}
{{- printf "%s/%s" (.root.Values.modelStorage.mountPath | trimSuffix "/") .path -}}
{{- end -}}
{{- end -}}

{{/* etcd client URLs, comma separated (--etcd). */}}
{{- define "eagle-serve.etcdUrls" -}}
{{- if eq .Values.etcd.mode "external" -}}
{{- join "," .Values.etcd.urls -}}
{{- else -}}
{{- printf "http://%s:%d" (include "eagle-serve.svcHost" (dict "root" . "name" (printf "%s-etcd" (include "eagle-serve.fullname" .)))) (int .Values.etcd.clientPort) -}}
{{- end -}}
{{- end -}}

{{/*
The worker groups, expanded and checked: {"groups": [...]}, each group with every setting
resolved (name, sts, tp, gpusPerPod, pods, perRank, dtype, modelPath, fetch, cacheMb,
resources, nodeSelector, tolerations, affinity, extraArgs, extraEnv). Use with fromJson.
*/}}
{{- define "eagle-serve.groups" -}}
{{- $root := . -}}
{{- $w := .Values.workers -}}
{{- $out := list -}}
{{- $seen := dict -}}
{{- if not $w.groups -}}
{{- fail "workers.groups: at least one worker group is needed" -}}
{{- end -}}
{{- range $i, $g := $w.groups -}}
{{- $where := printf "workers.groups[%d]" $i -}}
{{- if not $g.name -}}
{{- fail (printf "%s.name: every worker group needs a name" $where) -}}
{{- end -}}
{{- if not (regexMatch "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$" (toString $g.name)) -}}
{{- fail (printf "%s.name: %q is not a DNS label (lower-case letters, digits, '-')" $where (toString $g.name)) -}}
{{- end -}}
{{- if not (hasKey $g "tp") -}}
{{- fail (printf "%s.tp: the tensor-parallel degree is required" $where) -}}
{{- end -}}
{{- $tp := int $g.tp -}}
{{- if or (lt $tp 1) (ne (float64 $tp) (float64 $g.tp)) -}}
{{- fail (printf "%s.tp: the tensor-parallel degree must be an integer of at least 1 (got %v)" $where $g.tp) -}}
{{- end -}}
{{- $gpp := $tp -}}
{{- if and (hasKey $g "gpusPerPod") (not (kindIs "invalid" $g.gpusPerPod)) -}}
{{- $gpp = int $g.gpusPerPod -}}
{{- if lt $gpp 1 -}}
{{- fail (printf "%s.gpusPerPod: must be at least 1 (got %v)" $where $g.gpusPerPod) -}}
{{- end -}}
{{- end -}}
{{- if ne (mod $tp $gpp) 0 -}}
{{- fail (printf "%s.gpusPerPod: %d GPUs per pod do not divide the tensor-parallel degree tp=%d" $where $gpp $tp) -}}
{{- end -}}
{{- if and (ne $gpp $tp) (ne $gpp 1) -}}
{{- fail (printf "%s.gpusPerPod: %d ranks per pod with tp=%d is not a layout eagle-worker has: use %d (one pod, rank 0 starts the others) or 1 (one rank per pod)" $where $gpp $tp $tp) -}}
{{- end -}}
{{- $count := 1 -}}
{{- if hasKey $g "count" -}}
{{- $count = int $g.count -}}
{{- if lt $count 1 -}}
{{- fail (printf "%s.count: must be at least 1 (got %v)" $where $g.count) -}}
{{- end -}}
{{- end -}}
{{- $model := $g.model | default dict -}}
{{- $modelPath := $model.path | default $root.Values.model.path -}}
{{- $fetch := $root.Values.model.fetch -}}
{{- if hasKey $model "fetch" -}}
{{- $fetch = $model.fetch -}}
{{- end -}}
{{- if and (eq $root.Values.modelStorage.type "emptyDir") (not $fetch) -}}
{{- fail (printf "%s.model.fetch: an emptyDir model volume starts empty, so the group must fetch its model" $where) -}}
{{- end -}}
{{- range $k := until $count -}}
{{- $name := toString $g.name -}}
{{- if gt $count 1 -}}
{{- $name = printf "%s-%d" $name $k -}}
{{- end -}}
{{- if hasKey $seen $name -}}
{{- fail (printf "%s.name: the worker group name %q is used twice" $where $name) -}}
{{- end -}}
{{- $_ := set $seen $name true -}}
{{- $sts := printf "%s-worker-%s" (include "eagle-serve.fullname" $root) $name -}}
{{- if gt (len $sts) 52 -}}
{{- fail (printf "%s.name: the StatefulSet name %q is longer than 52 characters; shorten the group name or fullnameOverride" $where $sts) -}}
{{- end -}}
{{- $out = append $out (dict
  "name" $name
  "sts" $sts
  "tp" $tp
  "gpusPerPod" $gpp
  "pods" (div $tp $gpp)
  "perRank" (and (eq $gpp 1) (gt $tp 1))
  "dtype" ($g.dtype | default $root.Values.model.dtype)
  "modelPath" $modelPath
  "fetch" $fetch
  "cacheMb" ($g.cacheMb | default $w.cacheMb)
  "resources" ($g.resources | default $w.resources)
  "nodeSelector" ($g.nodeSelector | default $w.nodeSelector)
  "tolerations" ($g.tolerations | default $w.tolerations)
  "affinity" ($g.affinity | default $w.affinity)
  "extraArgs" (concat ($w.extraArgs | default list) ($g.extraArgs | default list))
  "extraEnv" (concat ($w.extraEnv | default list) ($g.extraEnv | default list))
) -}}
{{- end -}}
{{- end -}}
{{- dict "groups" $out | toJson -}}
{{- end -}}

{{/* Checks on the rest of the values; included once, from NOTES.txt and every workload. */}}
{{- define "eagle-serve.validate" -}}
{{- $v := .Values -}}
{{- if not $v.model.path -}}
{{- fail "model.path: the target model is required (a .gguf file or a Hugging Face directory in the model volume)" -}}
{{- end -}}
{{- if not (has $v.device (list "cpu" "cuda")) -}}
{{- fail (printf "device: must be cpu or cuda (got %q)" (toString $v.device)) -}}
{{- end -}}
{{- if and $v.draft.enabled (not $v.draft.head) -}}
{{- fail "draft.head: the draft service needs an EAGLE head directory (or set draft.enabled=false)" -}}
{{- end -}}
{{- if eq $v.etcd.mode "external" -}}
{{- if not $v.etcd.urls -}}
{{- fail "etcd.urls: etcd.mode=external needs at least one etcd client URL" -}}
{{- end -}}
{{- else if eq $v.etcd.mode "bundled" -}}
{{- if not (has (int $v.etcd.replicas) (list 1 3)) -}}
{{- fail (printf "etcd.replicas: the bundled etcd runs 1 or 3 members (got %v)" $v.etcd.replicas) -}}
{{- end -}}
{{- if and (gt (int $v.etcd.replicas) 1) (not $v.etcd.persistence.enabled) -}}
{{- fail "etcd.persistence.enabled: a 3-member etcd needs persistent data (a member that comes back with an empty data directory cannot rejoin its cluster)" -}}
{{- end -}}
{{- else -}}
{{- fail (printf "etcd.mode: must be bundled or external (got %q)" (toString $v.etcd.mode)) -}}
{{- end -}}
{{- $st := $v.modelStorage.type -}}
{{- if not (has $st (list "emptyDir" "pvc" "existingClaim")) -}}
{{- fail (printf "modelStorage.type: must be emptyDir, pvc or existingClaim (got %q)" (toString $st)) -}}
{{- end -}}
{{- if and (eq $st "existingClaim") (not $v.modelStorage.existingClaim) -}}
{{- fail "modelStorage.existingClaim: modelStorage.type=existingClaim needs the claim's name" -}}
{{- end -}}
{{- if and (eq $st "emptyDir") (not $v.model.fetch) -}}
{{- fail "model.fetch: an emptyDir model volume starts empty, so model.fetch must name a model to fetch (or use modelStorage.type=existingClaim)" -}}
{{- end -}}
{{- if and $v.security.tls.enabled (not $v.security.tls.secretName) -}}
{{- fail "security.tls.secretName: security.tls.enabled needs a Secret" -}}
{{- end -}}
{{- if and $v.security.apiKeys.enabled (not $v.security.apiKeys.secretName) -}}
{{- fail "security.apiKeys.secretName: security.apiKeys.enabled needs a Secret" -}}
{{- end -}}
{{- if and $v.metrics.serviceMonitor.enabled (not $v.metrics.enabled) -}}
{{- fail "metrics.serviceMonitor.enabled: needs metrics.enabled (the ServiceMonitor scrapes the `metrics` ports)" -}}
{{- end -}}
{{- if $v.metrics.enabled -}}
{{- $mp := int $v.metrics.port -}}
{{- $taken := dict "coordinator.port" $v.coordinator.port "draft.port" $v.draft.port "workers.port" $v.workers.port "workers.tpPort" $v.workers.tpPort -}}
{{- if $v.coordinator.http.enabled -}}
{{- $_ := set $taken "coordinator.http.port" $v.coordinator.http.port -}}
{{- end -}}
{{- range $name, $port := $taken -}}
{{- if eq (int $port) $mp -}}
{{- fail (printf "metrics.port: %d is also %s; a container cannot listen twice on one port" $mp $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $_ := include "eagle-serve.groups" . | fromJson -}}
{{- end -}}
