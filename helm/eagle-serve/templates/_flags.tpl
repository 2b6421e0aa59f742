{{/*
Every binary's command line, built from values in this one file. Each definition returns a
YAML list. `$(POD_IP)` and `$(POD_NAME)` are expanded by the kubelet from the container's
environment (the downward API, see eagle-serve.podEnv).

The flags are those of eagle-coordinator, eagle-draft and eagle-worker (`--help` on each, or
the clap definitions in each service's src/main.rs) and of etcd 3.4/3.5; the chart's tests start
the rendered commands as real processes, so a flag that a binary does not know fails them.
*/}}

{{/* --etcd, --cluster, --etcd-ttl-s: every eagle service. */}}
{{- define "eagle-serve.flags.etcd" -}}
{{- list "--etcd" (include "eagle-serve.etcdUrls" .) "--cluster" (include "eagle-serve.clusterName" .) "--etcd-ttl-s" (toString (int .Values.cluster.leaseTtlSeconds)) | toJson -}}
{{- end -}}

{{/*
--metrics-addr: every eagle service, with metrics.enabled: /metrics (OpenMetrics, docs/metrics.md)
on all interfaces of the pod at metrics.port, the container port named `metrics`. An empty list
when metrics are off.
*/}}
{{- define "eagle-serve.flags.metrics" -}}
{{- if .Values.metrics.enabled -}}
{{- list "--metrics-addr" (printf "0.0.0.0:%d" (int .Values.metrics.port)) | toJson -}}
{{- else -}}
{{- list | toJson -}}
{{- end -}}
{{- end -}}

{{/* The device flag of a pod: cpu, or cuda when it holds GPUs. */}}
{{- define "eagle-serve.flags.device" -}}
{{- if and (eq .root.Values.device "cuda") (gt (int .gpus) 0) -}}cuda{{- else -}}cpu{{- end -}}
{{- end -}}

{{- define "eagle-serve.flags.coordinator" -}}
{{- $v := .Values -}}
{{- $c := $v.coordinator -}}
{{- $args := list
  "--model" (include "eagle-serve.volumePath" (dict "root" . "path" $v.model.path))
  "--model-name" (toString $v.model.servedName)
  "--listen" (printf "0.0.0.0:%d" (int $c.port))
  "--max-running" (toString (int $c.maxRunning))
  "--max-waiting" (toString (int $c.maxWaiting))
  "--worker-timeout-ms" (toString (int64 $c.workerTimeoutMs))
  "--draft-timeout-ms" (toString (int64 $c.draftTimeoutMs))
  "--draft-retry-ms" (toString (int64 $c.draftRetryMs))
  "--startup-wait-s" (toString (int64 $c.startupWaitSeconds))
  "--route-wait-ms" (toString (int64 $c.routeWaitMs))
  "--session-ttl-s" (toString (int64 $c.sessionTtlSeconds))
-}}
{{- $args = concat $args (include "eagle-serve.flags.etcd" . | fromJsonArray) -}}
{{- $args = concat $args (include "eagle-serve.flags.metrics" . | fromJsonArray) -}}
{{- if $v.model.chatTemplate -}}
{{- $args = concat $args (list "--chat-template" (toString $v.model.chatTemplate)) -}}
{{- end -}}
{{- if $c.http.enabled -}}
{{- $args = concat $args (list "--http-addr" (printf "0.0.0.0:%d" (int $c.http.port))) -}}
{{- end -}}
{{- concat $args ($c.extraArgs | default list) | toYaml -}}
{{- end -}}

{{- define "eagle-serve.flags.draft" -}}
{{- $v := .Values -}}
{{- $d := $v.draft -}}
{{- $args := list
  "--model" (include "eagle-serve.volumePath" (dict "root" . "path" $v.model.path))
  "--head" (include "eagle-serve.volumePath" (dict "root" . "path" $d.head))
  "--model-name" (toString $v.model.servedName)
  "--listen" (printf "0.0.0.0:%d" (int $d.port))
  "--advertise" (printf "$(POD_IP):%d" (int $d.port))
  "--dtype" ($d.dtype | default $v.model.dtype)
  "--device" (include "eagle-serve.flags.device" (dict "root" . "gpus" $d.gpus))
  "--cache-mb" (toString (int64 $d.cacheMb))
  "--idle-timeout-s" (toString $d.idleTimeoutSeconds)
-}}
{{- $args = concat $args (include "eagle-serve.flags.etcd" . | fromJsonArray) -}}
{{- $args = concat $args (include "eagle-serve.flags.metrics" . | fromJsonArray) -}}
{{- concat $args ($d.extraArgs | default list) | toYaml -}}
{{- end -}}

{{/*
A worker group's eagle-worker flags: (dict "root" $ "group" $group). In the pod-per-rank
layout every pod gets the same flags and the container's command appends
`--tp-rank <pod ordinal>` (see templates/workers.yaml); rank 0 then waits for the others
(--tp-no-spawn), which find it through etcd (--group), and ranks above 0 ignore the
rank-0-only flags.
*/}}
{{- define "eagle-serve.flags.worker" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $w := $v.workers -}}
{{- $g := .group -}}
{{- $args := list
  "--model" (include "eagle-serve.volumePath" (dict "root" $root "path" $g.modelPath))
  "--model-name" (toString $v.model.servedName)
  "--listen" (printf "0.0.0.0:%d" (int $w.port))
  "--advertise" (printf "$(POD_IP):%d" (int $w.port))
  "--dtype" $g.dtype
  "--device" (include "eagle-serve.flags.device" (dict "root" $root "gpus" $g.gpusPerPod))
  "--wire-dtype" (toString $w.wireDtype)
  "--draft-features" (toString $v.draft.headFeatures)
  "--cache-mb" (toString (int64 $g.cacheMb))
  "--prefix-cache-mb" (toString (int64 $w.prefixCacheMb))
  "--idle-timeout-s" (toString $w.idleTimeoutSeconds)
  "--tp" (toString (int $g.tp))
  "--tp-timeout-s" (toString $w.tpTimeoutSeconds)
  "--group" $g.name
-}}
{{- $args = concat $args (include "eagle-serve.flags.etcd" $root | fromJsonArray) -}}
{{- $args = concat $args (include "eagle-serve.flags.metrics" $root | fromJsonArray) -}}
{{- if $g.perRank -}}
{{- $args = concat $args (list
  "--tp-no-spawn"
  "--tp-listen" (printf "0.0.0.0:%d" (int $w.tpPort))
  "--tp-advertise" (printf "$(POD_IP):%d" (int $w.tpPort))
) -}}
{{- end -}}
{{- concat $args ($g.extraArgs | default list) | toYaml -}}
{{- end -}}

{{/* The fetch init container's command: one `eagle fetch` at a time per volume. */}}
{{- define "eagle-serve.flags.fetch" -}}
{{- $lock := printf "%s/.fetch.lock" (.root.Values.modelStorage.mountPath | trimSuffix "/") -}}
{{- list "flock" $lock "eagle" "fetch" (toString .fetch) | toYaml -}}
{{- end -}}

{{/* The bundled etcd's flags (one member; $(POD_NAME) is the member's name). */}}
{{- define "eagle-serve.flags.etcdServer" -}}
{{- $v := .Values -}}
{{- $e := $v.etcd -}}
{{- $full := include "eagle-serve.fullname" . -}}
{{- $headless := printf "%s-etcd-headless" $full -}}
{{- $peerHost := printf "%s.%s.svc.%s" $headless .Release.Namespace $v.clusterDomain -}}
{{- $members := list -}}
{{- range $i := until (int $e.replicas) -}}
{{- $members = append $members (printf "%s-etcd-%d=http://%s-etcd-%d.%s:%d" $full $i $full $i $peerHost (int $e.peerPort)) -}}
{{- end -}}
{{- $args := list
  "--name" "$(POD_NAME)"
  "--data-dir" "/var/run/etcd/data"
  "--listen-client-urls" (printf "http://0.0.0.0:%d" (int $e.clientPort))
  "--advertise-client-urls" (printf "http://$(POD_NAME).%s:%d" $peerHost (int $e.clientPort))
  "--listen-peer-urls" (printf "http://0.0.0.0:%d" (int $e.peerPort))
  "--initial-advertise-peer-urls" (printf "http://$(POD_NAME).%s:%d" $peerHost (int $e.peerPort))
  "--initial-cluster" (join "," $members)
  "--initial-cluster-state" "new"
  "--initial-cluster-token" (printf "%s-etcd" $full)
  "--auto-compaction-mode" "periodic"
  "--auto-compaction-retention" "1h"
-}}
{{- concat $args ($e.extraArgs | default list) | toYaml -}}
{{- end -}}
