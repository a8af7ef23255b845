{{/* Names and labels. */}}
{{- define "kvstore.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvstore.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kvstore.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvstore.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kvstore.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 }}
{{ include "kvstore.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .Values.mode }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kvstore.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvstore.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Bytes of a size string: "8GiB" -> 8589934592. Whole numbers with an optional unit only
(the schema enforces the same pattern); units as kvstore reads them.
*/}}
{{- define "kvstore.bytes" -}}
{{- $s := toString . | trim -}}
{{- if not (regexMatch "^[0-9]+ *([A-Za-z]+)?$" $s) -}}
{{- fail (printf "kvstore: cannot read %q as a size; write e.g. 512MiB or 64GiB" $s) -}}
{{- end -}}
{{- $n := regexReplaceAll "^([0-9]+) *([A-Za-z]*)$" $s "${1}" | int64 -}}
{{- $unit := regexReplaceAll "^([0-9]+) *([A-Za-z]*)$" $s "${2}" | lower -}}
{{- $units := dict "" 1 "b" 1 "kb" 1000 "mb" 1000000 "gb" 1000000000 "tb" 1000000000000 "kib" 1024 "mib" 1048576 "gib" 1073741824 "tib" 1099511627776 -}}
{{- if not (hasKey $units $unit) -}}
{{- fail (printf "kvstore: unknown unit in size %q; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB" $s) -}}
{{- end -}}
{{- mul $n (index $units $unit) -}}
{{- end -}}

{{/* A byte count as a Kubernetes quantity in whole MiB, rounded up: "9216Mi". */}}
{{- define "kvstore.mebibytes" -}}
{{- printf "%dMi" (div (add (int64 .) 1048575) 1048576) -}}
{{- end -}}

{{/*
Memory request and limit of the kvstore container: cpuBytes + memoryOverhead.
The arena's pages (a tmpfs file) are charged to kvstore's memory cgroup, which touches
them first; the process needs memoryOverhead besides (PROCESS_OVERHEAD_BYTES in
kvstore/preflight.py, what `kvstore-server --check-config` checks the limit against).
*/}}
{{- define "kvstore.memoryLimit" -}}
{{- $arena := include "kvstore.bytes" .Values.kvstore.cpuBytes | int64 -}}
{{- $overhead := include "kvstore.bytes" .Values.kvstore.memoryOverhead | int64 -}}
{{- include "kvstore.mebibytes" (add $arena $overhead) -}}
{{- end -}}

{{/* sizeLimit of the memory-backed /dev/shm emptyDir: cpuBytes + shmHeadroom. */}}
{{- define "kvstore.shmSizeLimit" -}}
{{- $arena := include "kvstore.bytes" .Values.kvstore.cpuBytes | int64 -}}
{{- $room := include "kvstore.bytes" .Values.kvstore.shmHeadroom | int64 -}}
{{- include "kvstore.mebibytes" (add $arena $room) -}}
{{- end -}}

{{/* Default size of the ssd volume: ssdBytes plus a quarter. */}}
{{- define "kvstore.ssdVolumeSize" -}}
{{- $ssd := include "kvstore.bytes" .Values.kvstore.ssdBytes | int64 -}}
{{- include "kvstore.mebibytes" (add $ssd (div $ssd 4)) -}}
{{- end -}}

{{- define "kvstore.ssdType" -}}
{{- if .Values.ssd.type -}}
{{- .Values.ssd.type -}}
{{- else if eq .Values.mode "daemonset" -}}
hostPath
{{- else -}}
pvc
{{- end -}}
{{- end -}}

{{- define "kvstore.tiers" -}}
{{- if .Values.gpuTier.enabled -}}gpu,cpu,ssd{{- else -}}cpu,ssd{{- end -}}
{{- if .Values.remote.enabled -}},remote{{- end -}}
{{- end -}}

{{- define "kvstore.socketPath" -}}
{{- printf "%s/kvstore.sock" (trimSuffix "/" .Values.kvstore.socketDir) -}}
{{- end -}}

{{- define "kvstore.image" -}}
{{- $tag := ternary .Values.image.gpuTag .Values.image.tag .Values.gpuTier.enabled -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* Checks of value combinations that the schema cannot express. */}}
{{- define "kvstore.validate" -}}
{{- $ssd := include "kvstore.ssdType" . -}}
{{- if and (eq .Values.mode "sidecar") (eq $ssd "hostPath") -}}
{{- fail "kvstore: ssd.type hostPath is for mode daemonset; in sidecar mode use pvc or emptyDir" -}}
{{- end -}}
{{- if and (eq .Values.mode "daemonset") (eq $ssd "pvc") -}}
{{- fail "kvstore: a DaemonSet cannot give each node its own claim; in daemonset mode use ssd.type hostPath (a local disk) or emptyDir" -}}
{{- end -}}
{{- if and (eq .Values.mode "sidecar") (eq $ssd "pvc") (gt (int .Values.sidecar.replicas) 1) -}}
{{- fail "kvstore: ssd.type pvc is one ReadWriteOnce claim, for one replica; use one release per replica or ssd.type emptyDir" -}}
{{- end -}}
{{- if and .Values.remote.enabled (not .Values.remote.urls) -}}
{{- fail "kvstore: remote.enabled needs remote.urls, the seed nodes of the Redis/Valkey Cluster" -}}
{{- end -}}
{{- if and .Values.gpuTier.enabled (eq .Values.mode "daemonset") -}}
{{- fail "kvstore: gpuTier.enabled needs mode sidecar: CUDA IPC handles cannot cross the PID namespaces of separate pods" -}}
{{- end -}}
{{- if and .Values.gpuTier.enabled (semverCompare "<1.34.0-0" .Capabilities.KubeVersion.Version) -}}
{{- fail (printf "kvstore: gpuTier.enabled needs Dynamic Resource Allocation (resource.k8s.io/v1, Kubernetes >= 1.34); this cluster is %s" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- $grace := ternary .Values.sidecar.terminationGracePeriodSeconds .Values.daemonset.terminationGracePeriodSeconds (eq .Values.mode "sidecar") -}}
{{- if le (float64 $grace) (float64 .Values.kvstore.graceSeconds) -}}
{{- fail (printf "kvstore: terminationGracePeriodSeconds (%v) must exceed kvstore.graceSeconds (%v), or kubelet kills kvstore mid-drain" $grace .Values.kvstore.graceSeconds) -}}
{{- end -}}
{{- end -}}

{{/* Pod annotations: config checksum, Prometheus scrape, extras. */}}
{{- define "kvstore.podAnnotations" -}}
checksum/config: {{ include "kvstore.toml" . | sha256sum }}
{{- if .Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.kvstore.metricsPort | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* kvstore.toml, the server's configuration file. */}}
{{- define "kvstore.toml" -}}
# kvstore-server settings, rendered by the kvstore Helm chart from its values.
[server]
tiers = {{ splitList "," (include "kvstore.tiers" .) | toJson }}
data-dir = {{ .Values.kvstore.dataDir | toJson }}
socket = {{ include "kvstore.socketPath" . | toJson }}
{{- if .Values.gpuTier.enabled }}
gpu-bytes = {{ .Values.kvstore.gpuBytes | toString | toJson }}
{{- end }}
cpu-bytes = {{ .Values.kvstore.cpuBytes | toString | toJson }}
ssd-bytes = {{ .Values.kvstore.ssdBytes | toString | toJson }}
eviction = {{ .Values.kvstore.eviction | toJson }}
{{- with .Values.kvstore.codec }}
codec = {{ toJson . }}
{{- end }}
health-listen = {{ printf "0.0.0.0:%d" (int .Values.kvstore.healthPort) | toJson }}
metrics-listen = {{ printf "0.0.0.0:%d" (int .Values.kvstore.metricsPort) | toJson }}
log-level = {{ .Values.kvstore.logLevel | toJson }}
log-format = {{ .Values.kvstore.logFormat | toJson }}
grace-seconds = {{ .Values.kvstore.graceSeconds }}
{{- with .Values.remote }}
{{- if .enabled }}
remote = {{ toJson .urls }}
remote-write = {{ .write | toJson }}
remote-timeout = {{ .timeoutSeconds }}
{{- end }}
{{- end }}
{{- with .Values.kvstore.auth }}
{{- if .tokensSecret }}
auth-tokens = "/etc/kvstore-auth/tokens.toml"
trust-socket = {{ .trustSocket }}
{{- end }}
{{- end }}
{{- range $key, $value := .Values.kvstore.extraConfig }}
{{ $key }} = {{ toJson $value }}
{{- end }}
{{- end -}}

{{/* The kvstore container's securityContext. */}}
{{- define "kvstore.securityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .Values.kvstore.uid }}
runAsGroup: {{ int .Values.kvstore.gid }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
  add:
    - IPC_LOCK
{{- end -}}

{{/* The kvstore container (sidecar or daemonset), without the restartPolicy. */}}
{{- define "kvstore.container" -}}
name: kvstore
image: {{ include "kvstore.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
env:
  - name: KVSTORE_CONFIG
    value: /etc/kvstore/kvstore.toml
  - name: KVSTORE_SOCKET
    value: {{ include "kvstore.socketPath" . | quote }}
  - name: NUMBA_CACHE_DIR
    value: /tmp/numba-cache
{{- if and .Values.remote.enabled .Values.remote.passwordSecret.name }}
  - name: KVSTORE_REMOTE_PASSWORD
    valueFrom:
      secretKeyRef:
        name: {{ .Values.remote.passwordSecret.name | quote }}
        key: {{ .Values.remote.passwordSecret.key | quote }}
{{- end }}
{{- with .Values.kvstore.extraEnv }}
{{ toYaml . }}
{{- end }}
ports:
  - name: metrics
    containerPort: {{ int .Values.kvstore.metricsPort }}
    protocol: TCP
  - name: grpc-health
    containerPort: {{ int .Values.kvstore.healthPort }}
    protocol: TCP
startupProbe:
  grpc:
    port: {{ int .Values.kvstore.healthPort }}
    service: kvstore.v1.KVStore
  {{- toYaml .Values.kvstore.probes.startup | nindent 2 }}
readinessProbe:
  grpc:
    port: {{ int .Values.kvstore.healthPort }}
    service: kvstore.v1.KVStore
  {{- toYaml .Values.kvstore.probes.readiness | nindent 2 }}
livenessProbe:
  grpc:
    port: {{ int .Values.kvstore.healthPort }}
  {{- toYaml .Values.kvstore.probes.liveness | nindent 2 }}
{{- $memory := include "kvstore.memoryLimit" . }}
resources:
  requests:
    {{- with .Values.kvstore.resources.requests }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    memory: {{ $memory }}
  limits:
    {{- with .Values.kvstore.resources.limits }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    memory: {{ $memory }}
  {{- if .Values.gpuTier.enabled }}
  claims:
    - name: gpu
  {{- end }}
securityContext:
  {{- include "kvstore.securityContext" . | nindent 2 }}
volumeMounts:
  - name: socket
    mountPath: {{ .Values.kvstore.socketDir }}
  - name: shm
    mountPath: /dev/shm
  - name: data
    mountPath: {{ .Values.kvstore.dataDir }}
  - name: config
    mountPath: /etc/kvstore
    readOnly: true
  {{- if .Values.kvstore.auth.tokensSecret }}
  - name: auth
    mountPath: /etc/kvstore-auth
    readOnly: true
  {{- end }}
  - name: tmp
    mountPath: /tmp
{{- end -}}

{{/* Pod-level settings shared by both modes. */}}
{{- define "kvstore.podCommon" -}}
serviceAccountName: {{ include "kvstore.serviceAccountName" . }}
automountServiceAccountToken: false
securityContext:
  fsGroup: {{ int .Values.kvstore.gid }}
  fsGroupChangePolicy: OnRootMismatch
  seccompProfile:
    type: RuntimeDefault
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The ssd volume ("data"). */}}
{{- define "kvstore.dataVolume" -}}
{{- $type := include "kvstore.ssdType" . -}}
- name: data
{{- if eq $type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-ssd" (include "kvstore.fullname" .)) .Values.ssd.pvc.existingClaim }}
{{- else if eq $type "hostPath" }}
  hostPath:
    path: {{ .Values.ssd.hostPath }}
    type: DirectoryOrCreate
{{- else }}
  emptyDir:
    sizeLimit: {{ default (include "kvstore.ssdVolumeSize" .) .Values.ssd.emptyDir.sizeLimit }}
{{- end }}
{{- end -}}

{{/* Volumes of the kvstore container besides socket, shm and data. */}}
{{- define "kvstore.commonVolumes" -}}
- name: config
  configMap:
    name: {{ include "kvstore.fullname" . }}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- if .Values.kvstore.auth.tokensSecret }}
- name: auth
  secret:
    secretName: {{ .Values.kvstore.auth.tokensSecret }}
    defaultMode: 0400
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}
