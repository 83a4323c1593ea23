{{/*
The Shardwright gRPC server container, second in the Ray head pod (KubeRay requires Ray's own
container first). It shares /tmp/ray with the Ray head container so that it can join the cluster as
a driver on the head node (RAY_ADDRESS points at the head's GCS on localhost). Its root filesystem
is read-only: it writes only to /tmp, /tmp/ray and the state directory.
*/}}
{{- define "shardwright.serverContainer" -}}
{{- $port := .Values.server.port | int }}
{{- $healthPort := include "shardwright.healthPort" . | int }}
{{- $probe := dict "port" $healthPort "service" .Values.server.probes.healthService }}
name: shardwright-server
image: {{ include "shardwright.image" (dict "image" .Values.image "root" .) | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
command:
  {{- toYaml .Values.server.command | nindent 2 }}
args:
  - --host
  - {{ include "shardwright.serverHost" . }}
  - --port
  - {{ $port | quote }}
  {{- if include "shardwright.separateHealthPort" . }}
  - --health-port
  - {{ $healthPort | quote }}
  - --health-host
  - 0.0.0.0
  {{- end }}
  {{- if and .Values.insecure .Values.auth.enabled (not .Values.tls.enabled) }}
  - --insecure
  {{- end }}
  {{- if .Values.metrics.enabled }}
  - --metrics-port
  - {{ .Values.metrics.port | int | quote }}
  - --metrics-host
  - 0.0.0.0
  {{- end }}
  {{- range .Values.server.extraArgs }}
  - {{ . | quote }}
  {{- end }}
ports:
  - name: grpc
    containerPort: {{ $port }}
    protocol: TCP
  {{- if include "shardwright.separateHealthPort" . }}
  - name: health
    containerPort: {{ $healthPort }}
    protocol: TCP
  {{- end }}
  {{- if .Values.metrics.enabled }}
  - name: metrics
    containerPort: {{ .Values.metrics.port | int }}
    protocol: TCP
  {{- end }}
{{- include "shardwright.containerSecurityContext" (dict "root" . "readOnly" true) | nindent 0 }}
env:
  {{- include "shardwright.stateEnv" . | nindent 2 }}
  - name: RAY_ADDRESS
    value: {{ printf "127.0.0.1:%s" (include "shardwright.rayGcsPort" .) | quote }}
  {{- include "shardwright.redisUrlEnv" . | nindent 2 }}
  {{- if .Values.auth.enabled }}
  - name: SHARDWRIGHT_TOKENS_FILE
    value: /etc/shardwright/auth/tokens.yaml
  {{- end }}
  {{- if .Values.tls.enabled }}
  - name: SHARDWRIGHT_TLS_CERT
    value: /etc/shardwright/tls/tls.crt
  - name: SHARDWRIGHT_TLS_KEY
    value: /etc/shardwright/tls/tls.key
  {{- end }}
  {{- if .Values.tls.clientCA.enabled }}
  - name: SHARDWRIGHT_TLS_CLIENT_CA
    value: /etc/shardwright/client-ca/ca.crt
  {{- end }}
  {{- with .Values.server.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
resources:
  {{- toYaml .Values.server.resources | nindent 2 }}
startupProbe:
  {{- include "shardwright.grpcProbe" (set (deepCopy $probe) "probe" .Values.server.probes.startup) | nindent 2 }}
readinessProbe:
  {{- include "shardwright.grpcProbe" (set (deepCopy $probe) "probe" .Values.server.probes.readiness) | nindent 2 }}
livenessProbe:
  {{- include "shardwright.grpcProbe" (set (deepCopy $probe) "probe" .Values.server.probes.liveness) | nindent 2 }}
volumeMounts:
  - name: tmp
    mountPath: /tmp
  - name: ray-tmp
    mountPath: /tmp/ray
  {{- include "shardwright.sharedMounts" . | nindent 2 }}
  {{- if .Values.auth.enabled }}
  - name: auth-tokens
    mountPath: /etc/shardwright/auth
    readOnly: true
  {{- end }}
  {{- if .Values.tls.enabled }}
  - name: tls
    mountPath: /etc/shardwright/tls
    readOnly: true
  {{- end }}
  {{- if .Values.tls.clientCA.enabled }}
  - name: client-ca
    mountPath: /etc/shardwright/client-ca
    readOnly: true
  {{- end }}
{{- end }}

{{/* The head pod's volumes for the server: /tmp, the shared /tmp/ray and the secrets it mounts. */}}
{{- define "shardwright.serverVolumes" -}}
- name: tmp
  emptyDir: {}
- name: ray-tmp
  emptyDir: {}
{{- if .Values.auth.enabled }}
- name: auth-tokens
  secret:
    secretName: {{ include "shardwright.authSecretName" . }}
    items:
      - key: {{ .Values.auth.secretKey }}
        path: tokens.yaml
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "shardwright.tlsSecretName" . }}
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- if .Values.tls.clientCA.enabled }}
- name: client-ca
  secret:
    secretName: {{ include "shardwright.clientCASecretName" . }}
    items:
      - key: {{ .Values.tls.clientCA.secretKey }}
        path: ca.crt
{{- end }}
{{- end }}
