{{/* Name of the chart, overridable. */}}
{{- define "voxserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified name: the release name, unless it lacks the chart name. */}}
{{- define "voxserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "voxserve.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "voxserve.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "voxserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "voxserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "voxserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "voxserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The image: tag defaults to "<appVersion>-<profile>", as docker/Dockerfile.<profile> builds it. */}}
{{- define "voxserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-%s" .Chart.AppVersion .Values.profile) .Values.image.tag) -}}
{{- end -}}

{{/* Secret with the API keys: the user's, or the one the chart creates. */}}
{{- define "voxserve.authSecretName" -}}
{{- default (printf "%s-api-keys" (include "voxserve.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "voxserve.resumeSecretName" -}}
{{- default (printf "%s-resume-secret" (include "voxserve.fullname" .)) .Values.sessions.existingSecret -}}
{{- end -}}

{{/* Environment variable the Serve app reads keys from (deployments.auth.AuthConfig.api_keys_env). */}}
{{- define "voxserve.authEnvName" -}}
{{- $auth := get .Values.serve.args "auth" | default dict -}}
{{- if hasKey $auth "api_keys_env" -}}{{ get $auth "api_keys_env" }}{{- else -}}VOXSERVE_API_KEYS{{- end -}}
{{- end -}}

{{/*
The Serve config (serveConfigV2), built from .Values.serve exactly as
deployments.profiles.serve_config_from_options builds it in Python: the tests compare the two.
*/}}
{{- define "voxserve.serveConfig" -}}
{{- $s := .Values.serve -}}
{{- $deps := list -}}
{{- range $name := keys $s.deployments | sortAlpha -}}
{{- $deps = append $deps (merge (dict "name" $name) (get $s.deployments $name)) -}}
{{- end -}}
{{- $app := dict "name" $s.appName "import_path" $s.importPath "args" $s.args "deployments" $deps -}}
{{- $grpc := dict "port" $s.grpcPort "grpc_servicer_functions" $s.grpcServicerFunctions -}}
{{- $http := dict "host" "0.0.0.0" "port" $s.httpPort -}}
{{- toYaml (dict "proxy_location" "EveryNode" "http_options" $http "grpc_options" $grpc "applications" (list $app)) -}}
{{- end -}}

{{/* Longest graceful_shutdown_timeout_s among the deployments (Serve's default is 20 s). */}}
{{- define "voxserve.maxShutdown" -}}
{{- $max := 20.0 -}}
{{- range $name, $opts := .Values.serve.deployments -}}
{{- $t := float64 (dig "graceful_shutdown_timeout_s" 20.0 $opts) -}}
{{- if gt $t $max }}{{ $max = $t }}{{ end -}}
{{- end -}}
{{- $max -}}
{{- end -}}

{{/* Environment shared by every Ray container. */}}
{{- define "voxserve.env" -}}
- name: HF_HOME
  value: {{ printf "%s/hf" .Values.modelCache.mountPath | quote }}
{{- if .Values.modelCache.prepare.enabled }}
- name: VOXSERVE_CACHE
  value: {{ printf "%s/voxserve" .Values.modelCache.mountPath | quote }}
{{- end }}
{{- if .Values.auth.enabled }}
- name: {{ include "voxserve.authEnvName" . }}
  valueFrom:
    secretKeyRef:
      name: {{ include "voxserve.authSecretName" . }}
      key: {{ .Values.auth.secretKey }}
{{- end }}
{{- if or .Values.sessions.existingSecret .Values.sessions.createSecret }}
- name: VOXSERVE_RESUME_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "voxserve.resumeSecretName" . }}
      key: {{ .Values.sessions.secretKey }}
{{- end }}
{{- if .Values.sessions.redisUrlSecret }}
- name: VOXSERVE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.sessions.redisUrlSecret }}
      key: {{ .Values.sessions.redisUrlKey }}
{{- end }}
- name: RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S
  value: {{ .Values.shutdown.proxyDrainSeconds | quote }}
{{- if eq .Values.rayAuth.mode "disabled" }}
- name: RAY_AUTH_MODE
  value: disabled
{{- end }}
{{- if .Values.hfTokenSecret.name }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.hfTokenSecret.name }}
      key: {{ .Values.hfTokenSecret.key }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Container ports of a Ray node; KubeRay builds the serve Service from the head's "serve*" ports. */}}
{{- define "voxserve.servePorts" -}}
- name: serve
  containerPort: {{ .Values.serve.httpPort }}
- name: serve-grpc
  containerPort: {{ .Values.serve.grpcPort }}
- name: metrics
  containerPort: {{ .Values.metrics.port }}
{{- end -}}

{{- define "voxserve.volumes" -}}
- name: model-cache
{{- if .Values.modelCache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.modelCache.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.modelCache.sizeLimit }}
{{- end }}
{{- end -}}

{{- define "voxserve.volumeMounts" -}}
- name: model-cache
  mountPath: {{ .Values.modelCache.mountPath }}
{{- end -}}

{{/* One worker group ($ = root context, .group = values of the group, .name = group name). */}}
{{- define "voxserve.workerGroup" -}}
{{- $root := .root -}}
{{- $g := .group -}}
- groupName: {{ .name }}
  replicas: {{ $g.minReplicas }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  {{- with $g.idleTimeoutSeconds }}
  idleTimeoutSeconds: {{ . }}
  {{- end }}
  rayStartParams:
    metrics-export-port: {{ $root.Values.metrics.port | quote }}
  template:
    metadata:
      labels:
        {{- include "voxserve.selectorLabels" $root | nindent 8 }}
        app.kubernetes.io/component: ray-worker-{{ .name }}
    spec:
      terminationGracePeriodSeconds: {{ $root.Values.shutdown.terminationGracePeriodSeconds }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if $root.Values.modelCache.prepare.enabled }}
      initContainers:
        - name: prepare-models
          image: {{ include "voxserve.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command:
            {{- toYaml $root.Values.modelCache.prepare.command | nindent 12 }}
          env:
            {{- include "voxserve.env" $root | nindent 12 }}
          volumeMounts:
            {{- include "voxserve.volumeMounts" $root | nindent 12 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "voxserve.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          env:
            {{- include "voxserve.env" $root | nindent 12 }}
          ports:
            {{- include "voxserve.servePorts" $root | nindent 12 }}
          resources:
            {{- toYaml $g.resources | nindent 12 }}
          {{- if $root.Values.probes.grpc.enabled }}
          # Ready only when the Serve gRPC proxy on this pod answers grpc.health.v1 for the
          # voxserve service (the Check is routed through Serve to the gateway).
          readinessProbe:
            grpc:
              port: {{ $root.Values.serve.grpcPort }}
              service: {{ $root.Values.probes.grpc.service | quote }}
            initialDelaySeconds: {{ $root.Values.probes.grpc.initialDelaySeconds }}
            periodSeconds: {{ $root.Values.probes.grpc.periodSeconds }}
            timeoutSeconds: {{ $root.Values.probes.grpc.timeoutSeconds }}
            failureThreshold: {{ $root.Values.probes.grpc.failureThreshold }}
          {{- end }}
          lifecycle:
            preStop:
              # Let endpoint removal reach the load balancers before Ray starts draining.
              exec:
                command: ["sleep", {{ $root.Values.shutdown.preStopSleepSeconds | quote }}]
          volumeMounts:
            {{- include "voxserve.volumeMounts" $root | nindent 12 }}
            - name: dshm
              mountPath: /dev/shm
      volumes:
        {{- include "voxserve.volumes" $root | nindent 8 }}
        - name: dshm
          emptyDir:
            medium: Memory
      {{- with $g.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
