{{/* Names: every object is "<release>-flowbp-<part>" unless fullnameOverride says otherwise. */}}
{{- define "flowbp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "flowbp.fullname" -}}
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

{{- define "flowbp.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "flowbp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flowbp
{{- end -}}

{{/* Labels of Ray pods: no chart or app version, since KubeRay hashes the pod template and a chart bump alone
must not recreate the cluster (or, for the RayService, build a second one). */}}
{{- define "flowbp.rayPodLabels" -}}
app.kubernetes.io/name: {{ include "flowbp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flowbp
{{- end -}}

{{/* Selector labels; call with (dict "root" $ "component" "controller"). */}}
{{- define "flowbp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flowbp.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "flowbp.rayClusterName" -}}
{{- printf "%s-ray" (include "flowbp.fullname" .) -}}
{{- end -}}

{{- define "flowbp.rewardServiceName" -}}
{{- printf "%s-reward" (include "flowbp.fullname" .) -}}
{{- end -}}

{{- define "flowbp.secretName" -}}
{{- default (printf "%s-tokens" (include "flowbp.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "flowbp.redisName" -}}
{{- printf "%s-redis" (include "flowbp.fullname" .) -}}
{{- end -}}

{{- define "flowbp.runsClaimName" -}}
{{- default (printf "%s-runs" (include "flowbp.fullname" .)) .Values.storage.existingClaim -}}
{{- end -}}

{{/* KubeRay names the head service of a RayCluster "<cluster>-head-svc"; the job API is its dashboard port. */}}
{{- define "flowbp.rayDashboardUrl" -}}
{{- printf "http://%s-head-svc.%s.svc:8265" (include "flowbp.rayClusterName" .) .Release.Namespace -}}
{{- end -}}

{{/* Where the GCS keeps its state: the chart's Redis unless ray.gcsFaultTolerance.redisAddress names another. */}}
{{- define "flowbp.gcsRedisAddress" -}}
{{- .Values.ray.gcsFaultTolerance.redisAddress | default (printf "%s.%s.svc:6379" (include "flowbp.redisName" .) .Release.Namespace) -}}
{{- end -}}

{{- define "flowbp.rewardUrl" -}}
{{- printf "http://%s-serve-svc.%s.svc:8000%s" (include "flowbp.rewardServiceName" .) .Release.Namespace .Values.rewardService.routePrefix -}}
{{- end -}}

{{/* Ray's token authentication for a client outside Ray (the controller); KubeRay sets it in Ray pods from
spec.authOptions, reading the same Secret. */}}
{{- define "flowbp.rayAuthEnv" -}}
- name: RAY_AUTH_MODE
  value: {{ .Values.auth.rayAuthMode | quote }}
{{- if eq .Values.auth.rayAuthMode "token" }}
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "flowbp.secretName" . }}
      key: auth_token
{{- end }}
{{- end -}}

{{/* spec.authOptions of every RayCluster the operator drives: the operator then sends the token on its own calls
(job API, Serve API) and injects RAY_AUTH_MODE/RAY_AUTH_TOKEN into every Ray container (KubeRay >= 1.6.0 for
secretName; key auth_token). */}}
{{- define "flowbp.rayAuthOptions" -}}
authOptions:
  mode: {{ .Values.auth.rayAuthMode }}
  {{- if eq .Values.auth.rayAuthMode "token" }}
  secretName: {{ include "flowbp.secretName" . }}
  {{- end }}
{{- end -}}

{{/*
The tokens, computed once per render and memoized in .Values (every template sees the same map): given in
values, else read back from the live Secret, else generated. With auth.existingSecret only the live values are
read (for the checksums). An upgrade that cannot read the live Secret (helm template, client dry-run, GitOps) would
rotate every token, so it fails instead.
*/}}
{{- define "flowbp.tokens" -}}
{{- if not (hasKey .Values "flowbpTokensMemo") -}}
{{- $live := lookup "v1" "Secret" .Release.Namespace (include "flowbp.secretName" .) | default dict -}}
{{- $data := dig "data" (dict) $live -}}
{{- $liveApi := get $data "api-token" | default "" | b64dec -}}
{{- $liveRay := get $data "auth_token" | default "" | b64dec -}}
{{- $liveRedis := get $data "redis-password" | default "" | b64dec -}}
{{- $t := dict "api" $liveApi "ray" $liveRay "redis" $liveRedis -}}
{{- if not .Values.auth.existingSecret -}}
{{- $given := and .Values.auth.apiToken .Values.auth.rayToken .Values.auth.redisPassword -}}
{{- if and .Release.IsUpgrade (not $live) (not $given) -}}
{{- fail "auth: the token Secret cannot be read on this upgrade (helm template, --dry-run or a GitOps render?); generated tokens would change. Create the Secret yourself and set auth.existingSecret" -}}
{{- end -}}
{{- $_ := set $t "api" (.Values.auth.apiToken | default $liveApi | default (randAlphaNum 48)) -}}
{{- $_ := set $t "ray" (.Values.auth.rayToken | default $liveRay | default (randAlphaNum 48)) -}}
{{- $_ := set $t "redis" (.Values.auth.redisPassword | default $liveRedis | default (randAlphaNum 32)) -}}
{{- end -}}
{{- $_ := set .Values "flowbpTokensMemo" $t -}}
{{- end -}}
{{- toYaml .Values.flowbpTokensMemo -}}
{{- end -}}

{{/* Environment shared by the controller and every Ray container: paths, offline-safe defaults. */}}
{{- define "flowbp.commonEnv" -}}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: TOKENIZERS_PARALLELISM
  value: "false"
- name: FLOWBP_RUNS_DIR
  value: {{ printf "%s/runs" .Values.storage.mountPath | quote }}
- name: HF_HOME
  value: {{ printf "%s/hf-cache" .Values.storage.mountPath | quote }}
{{- end -}}

{{- define "flowbp.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
# chown the shared volume only when its root does not match yet, not on every pod start
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "flowbp.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* A container in a Ray pod that the chart does not template itself (the autoscaler sidecar): restricted Pod
Security checks each container, so it states everything. */}}
{{- define "flowbp.sidecarSecurityContext" -}}
{{- include "flowbp.containerSecurityContext" . }}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
A Ray pod template (head or worker), shared by the RayCluster and the RayService.
Call with (dict "root" $ "role" "head|rollout|learner|reward" "head" true|false "spec" <group values>).
*/}}
{{- define "flowbp.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $spec := .spec -}}
{{- $gpus := int (default 0 $spec.gpus) -}}
{{- $tokens := include "flowbp.tokens" $root | fromYaml -}}
{{- $disruption := $root.Values.ray.disruption -}}
{{- $nodeSelector := $spec.nodeSelector | default dict -}}
{{- if gt $gpus 0 }}{{ $nodeSelector = merge (deepCopy $nodeSelector) $root.Values.ray.gpuNodeSelector }}{{ end -}}
metadata:
  labels:
    {{- include "flowbp.rayPodLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ printf "ray-%s" .role }}
    flowbp.io/ray-pod: "true"
  annotations:
    # a new Ray token recreates the pods (the upgrade strategy sees the template change)
    flowbp.io/ray-token-checksum: {{ $tokens.ray | sha256sum | quote }}
    {{- if $disruption.doNotEvict }}
    # node drains, consolidation and scale-down leave a running Ray pod alone: it holds jobs or their actors
    cluster-autoscaler.kubernetes.io/safe-to-evict: "false"
    karpenter.sh/do-not-disrupt: "true"
    {{- end }}
spec:
  securityContext:
    {{- include "flowbp.podSecurityContext" $root | nindent 4 }}
  {{- if and .head $disruption.priorityClassName }}
  priorityClassName: {{ $disruption.priorityClassName }}
  {{- end }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" .head }}
      image: {{ printf "%s:%s" $root.Values.ray.image.repository $root.Values.ray.image.tag | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- include "flowbp.containerSecurityContext" $root | nindent 8 }}
      env:
        {{- include "flowbp.commonEnv" $root | nindent 8 }}
        - name: FLOWBP_RAY_ROLE
          value: {{ .role | quote }}
        {{- if eq $gpus 0 }}
        # the GPU image's default (all) would show every GPU of the node to a pod that reserved none
        - name: NVIDIA_VISIBLE_DEVICES
          value: void
        {{- end }}
      ports:
        {{- if .head }}
        - {containerPort: 6379, name: gcs-server}
        - {containerPort: 8265, name: dashboard}
        - {containerPort: 10001, name: client}
        - {containerPort: 44217, name: as-metrics}
        - {containerPort: 44227, name: dash-metrics}
        {{- end }}
        - {containerPort: 8000, name: serve}
        - {containerPort: 8080, name: metrics}
      resources:
        requests:
          cpu: {{ $spec.cpu | quote }}
          memory: {{ $spec.memory | quote }}
          {{- if gt $gpus 0 }}
          nvidia.com/gpu: {{ $gpus }}
          {{- end }}
        limits:
          cpu: {{ $spec.cpu | quote }}
          memory: {{ $spec.memory | quote }}
          {{- if gt $gpus 0 }}
          nvidia.com/gpu: {{ $gpus }}
          {{- end }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        - name: runs
          mountPath: {{ $root.Values.storage.mountPath }}
  volumes:
    # Ray's object store lives in shared memory (the container default, 64 MiB, would push it to disk); the
    # headroom is for the other users of /dev/shm (NCCL, torch's data loader workers).
    - name: dshm
      emptyDir:
        medium: Memory
        {{- if $spec.objectStoreMemory }}
        sizeLimit: {{ div (mul (int64 $spec.objectStoreMemory) (add 100 $root.Values.ray.shmHeadroomPercent)) 100 | quote }}
        {{- else }}
        sizeLimit: {{ $spec.memory | quote }}
        {{- end }}
    - name: runs
      persistentVolumeClaim:
        claimName: {{ include "flowbp.runsClaimName" $root }}
  {{- with $nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* Fields shared by the RayCluster and the RayService's cluster: version, auth, autoscaler. */}}
{{- define "flowbp.rayClusterCommon" -}}
rayVersion: {{ .Values.ray.version | quote }}
{{ include "flowbp.rayAuthOptions" . }}
enableInTreeAutoscaling: {{ .Values.ray.autoscaling.enabled }}
{{- if .Values.ray.autoscaling.enabled }}
autoscalerOptions:
  version: {{ .Values.ray.autoscaling.version }}
  upscalingMode: {{ .Values.ray.autoscaling.upscalingMode }}
  idleTimeoutSeconds: {{ .Values.ray.autoscaling.idleTimeoutSeconds }}
  securityContext:
    {{- include "flowbp.sidecarSecurityContext" . | nindent 4 }}
  env:
    {{- include "flowbp.commonEnv" . | nindent 4 }}
{{- end }}
{{- end -}}

{{/* Ray start parameters: metrics on :8080 for the PodMonitor, a custom resource per worker role. */}}
{{- define "flowbp.rayStartParams" -}}
metrics-export-port: "8080"
{{- if .spec.objectStoreMemory }}
object-store-memory: {{ .spec.objectStoreMemory | quote }}
{{- end }}
{{- if .head }}
dashboard-host: "0.0.0.0"
{{- /* The head schedules no work: actors land on the role groups. */}}
num-cpus: "0"
{{- else }}
resources: {{ include "flowbp.groupResources" (dict "role" .role "spec" .spec) | quote | squote }}
{{- end }}
{{- end -}}

{{/* The roles a worker group's pods host (`hosts`, role -> processes a pod; its own role alone when unset). */}}
{{- define "flowbp.groupHosts" -}}
{{- toJson (.spec.hosts | default (dict .role 1)) -}}
{{- end -}}

{{/* A worker pod's custom resources: one unit of flowbp_<role> for each role it hosts, as JSON. */}}
{{- define "flowbp.groupResources" -}}
{{- $res := dict -}}
{{- range $role, $_ := include "flowbp.groupHosts" . | fromJson }}{{ $_ := set $res (printf "flowbp_%s" $role) 1 }}{{ end -}}
{{- toJson $res -}}
{{- end -}}

{{/*
Each enabled worker group's pods have the GPUs their hosted processes take (processes x ray.jobRuntime.roleGpus)
and, while jobs request role resources, every role has a group: else an actor waits forever for a pod that
cannot come.
*/}}
{{- define "flowbp.checkPlacement" -}}
{{- $shares := .Values.ray.jobRuntime.roleGpus -}}
{{- $hosted := dict -}}
{{- range $group := list "rollout" "learner" "reward" -}}
{{- $g := get $.Values.ray.workerGroups $group -}}
{{- if $g.enabled -}}
{{- $hosts := include "flowbp.groupHosts" (dict "role" $group "spec" $g) | fromJson -}}
{{- $need := 0.0 -}}
{{- range $role, $n := $hosts -}}
{{- $_ := set $hosted $role true -}}
{{- $need = addf $need (mulf $n (get $shares $role)) -}}
{{- end -}}
{{- /* the tolerance absorbs float rounding (0.1 x 3 is not 0.3) */ -}}
{{- if gt $need (addf $g.gpus 0.000001) -}}
{{- fail (printf "ray.workerGroups.%s.gpus: %v, but its pods host %s processes that take %v GPUs (ray.jobRuntime.roleGpus %s); allowed: at least %v, or fewer hosts or smaller roleGpus" $group $g.gpus (toJson $hosts) $need (toJson $shares) (ceil $need)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if .Values.ray.jobRuntime.roleResources -}}
{{- range $role := list "rollout" "learner" "reward" -}}
{{- if not (hasKey $hosted $role) -}}
{{- fail (printf "ray.workerGroups: no enabled group hosts %s, but ray.jobRuntime.roleResources is on, so its actors would wait forever; allowed: %s in the hosts of an enabled group" $role $role) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The run overrides every job on this cluster gets (ray.jobRuntime), as `--section.field=value` words: the
GPUs each role's process asks for are the shares the worker groups were sized for (flowbp.checkPlacement). */}}
{{- define "flowbp.jobRuntimeArgs" -}}
{{- $j := .Values.ray.jobRuntime -}}
{{- $g := $j.roleGpus -}}
--runtime.role_resources={{ $j.roleResources }} --runtime.hello_timeout_s={{ $j.helloTimeoutSeconds }}
{{- printf " --runtime.rollout_gpus=%v --runtime.learner_gpus=%v --reward.served.num_gpus=%v" $g.rollout $g.learner $g.reward }}
{{- end -}}
