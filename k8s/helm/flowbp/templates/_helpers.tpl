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

{{- define "flowbp.rewardUrl" -}}
{{- printf "http://%s-serve-svc.%s.svc:8000%s" (include "flowbp.rewardServiceName" .) .Release.Namespace .Values.rewardService.routePrefix -}}
{{- end -}}

{{/* Environment shared by the controller and every Ray container: Ray auth, paths, offline-safe defaults. */}}
{{- define "flowbp.commonEnv" -}}
- name: RAY_AUTH_MODE
  value: {{ .Values.auth.rayAuthMode | quote }}
{{- if eq .Values.auth.rayAuthMode "token" }}
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "flowbp.secretName" . }}
      key: ray-token
{{- end }}
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
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "flowbp.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/*
A Ray pod template (head or worker), shared by the RayCluster and the RayService.
Call with (dict "root" $ "role" "head|rollout|learner|reward" "head" true|false "spec" <group values>).
*/}}
{{- define "flowbp.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $spec := .spec -}}
{{- $gpus := int (default 0 $spec.gpus) -}}
metadata:
  labels:
    {{- include "flowbp.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ printf "ray-%s" .role }}
    flowbp.io/ray-pod: "true"
spec:
  securityContext:
    {{- include "flowbp.podSecurityContext" $root | nindent 4 }}
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
      ports:
        {{- if .head }}
        - {containerPort: 6379, name: gcs-server}
        - {containerPort: 8265, name: dashboard}
        - {containerPort: 10001, name: client}
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
    # Ray's object store lives in shared memory; the container default (64 MiB) would push it to disk.
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ default $spec.memory $spec.objectStoreMemory | quote }}
    - name: runs
      persistentVolumeClaim:
        claimName: {{ include "flowbp.runsClaimName" $root }}
  {{- with $spec.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
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
resources: {{ printf "{\"flowbp_%s\": 1}" .role | quote | squote }}
{{- end }}
{{- end -}}
