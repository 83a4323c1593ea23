{{/*
Names, labels, images and the values checks that JSON Schema cannot express. Every template
includes "shardwright.validate" first, so an inconsistent values file fails with one message
that names the values and says what to change.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "shardwright.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: fullnameOverride, or RELEASE-NAME (RELEASE alone when it already
contains the chart name). Cut to 40 characters because KubeRay derives longer names from the
RayCluster's (e.g. NAME-head-svc, NAME-GROUP-worker-XXXXX) and those must stay within 63.
*/}}
{{- define "shardwright.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The helm.sh/chart label: NAME-VERSION. */}}
{{- define "shardwright.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select this release's pods; a component label narrows them to one part. */}}
{{- define "shardwright.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shardwright.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels for every resource: commonLabels, then the standard ones (which win on a clash). */}}
{{- define "shardwright.labels" -}}
{{- $labels := include "shardwright.selectorLabels" . | fromYaml }}
{{- $_ := set $labels "helm.sh/chart" (include "shardwright.chart" .) }}
{{- $_ := set $labels "app.kubernetes.io/version" (.Chart.AppVersion | toString) }}
{{- $_ := set $labels "app.kubernetes.io/managed-by" .Release.Service }}
{{- toYaml (mergeOverwrite (deepCopy .Values.commonLabels) $labels) }}
{{- end }}

{{/*
Labels for one component's resources and pods. Takes (dict "root" $ "component" NAME "extra" MAP):
the extra (user) labels first, then the chart's, so a user label cannot break a selector.
*/}}
{{- define "shardwright.componentLabels" -}}
{{- $labels := include "shardwright.labels" .root | fromYaml }}
{{- $_ := set $labels "app.kubernetes.io/component" .component }}
{{- toYaml (mergeOverwrite (deepCopy (.extra | default dict)) $labels) }}
{{- end }}

{{/* The selector of one component's pods. Takes (dict "root" $ "component" NAME). */}}
{{- define "shardwright.componentSelectorLabels" -}}
{{ include "shardwright.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* REPOSITORY:TAG of an image value; an empty tag means the chart's appVersion. Takes (dict "image" IMG "root" $). */}}
{{- define "shardwright.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion) }}
{{- end }}

{{/* Resource names. */}}
{{- define "shardwright.serverServiceName" -}}
{{- include "shardwright.fullname" . }}
{{- end }}

{{- define "shardwright.redisName" -}}
{{- printf "%s-redis" (include "shardwright.fullname" .) }}
{{- end }}

{{- define "shardwright.authSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "shardwright.fullname" .)) }}
{{- end }}

{{- define "shardwright.tlsSecretName" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "shardwright.fullname" .)) }}
{{- end }}

{{- define "shardwright.clientCASecretName" -}}
{{- .Values.tls.clientCA.existingSecret | default (printf "%s-client-ca" (include "shardwright.fullname" .)) }}
{{- end }}

{{/*
The plaintext port that serves grpc.health.v1 to the kubelet's probes: server.healthPort when set,
else the gRPC port itself, or port + 1 when TLS is on (gRPC probes cannot speak TLS) or auth is
off (the gRPC port then listens on loopback only; see shardwright.serverHost).
*/}}
{{- define "shardwright.healthPort" -}}
{{- if not (kindIs "invalid" .Values.server.healthPort) }}
{{- .Values.server.healthPort | int }}
{{- else if or .Values.tls.enabled (not .Values.auth.enabled) }}
{{- add .Values.server.port 1 }}
{{- else }}
{{- .Values.server.port | int }}
{{- end }}
{{- end }}

{{/*
Where the gRPC port listens: every interface with auth on; loopback with auth off, because the
server refuses unauthenticated calls from other hosts (reach it with kubectl port-forward).
*/}}
{{- define "shardwright.serverHost" -}}
{{- ternary "0.0.0.0" "127.0.0.1" .Values.auth.enabled }}
{{- end }}

{{/* "true" when the health port is a port of its own; empty otherwise. */}}
{{- define "shardwright.separateHealthPort" -}}
{{- if ne (include "shardwright.healthPort" . | int) (.Values.server.port | int) }}true{{ end }}
{{- end }}

{{/* The Ray GCS port on the head: rayStartParams.port, else Ray's default 6379. */}}
{{- define "shardwright.rayGcsPort" -}}
{{- index .Values.ray.head.rayStartParams "port" | default "6379" }}
{{- end }}

{{/* Values for `ray start`, all as strings (the CRD's rayStartParams is map[string]string). */}}
{{- define "shardwright.rayStartParams" -}}
{{- $params := dict }}
{{- range $key, $value := . }}
{{- $_ := set $params $key (toString $value) }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/*
Redis. The chart creates a Secret for the URL whenever the URL carries a password: always for the
bundled Redis (its password is given or generated), and for an external URL with user info (an "@")
and no existingSecret.
*/}}
{{- define "shardwright.redisSecretNeeded" -}}
{{- if eq .Values.redis.mode "bundled" }}true
{{- else if and (not .Values.redis.external.existingSecret.name) (contains "@" .Values.redis.external.url) }}true
{{- end }}
{{- end }}

{{/*
The bundled Redis's password: redis.bundled.password, else the one in the release's Secret (so that
an upgrade keeps it), else 32 random characters. Only redis-secret.yaml calls it: everything else
reads the Secret.
*/}}
{{- define "shardwright.redisPassword" -}}
{{- if .Values.redis.bundled.password }}
{{- .Values.redis.bundled.password }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "shardwright.redisName" .) }}
{{- if and $existing $existing.data (hasKey $existing.data "password") }}
{{- index $existing.data "password" | b64dec }}
{{- else }}
{{- randAlphaNum 32 }}
{{- end }}
{{- end }}
{{- end }}

{{/* The server's Redis URL. Takes (dict "root" $ "password" PASSWORD) for the bundled Redis. */}}
{{- define "shardwright.redisUrl" -}}
{{- if eq .root.Values.redis.mode "bundled" }}
{{- printf "redis://:%s@%s:6379/0" .password (include "shardwright.redisName" .root) }}
{{- else }}
{{- .root.Values.redis.external.url }}
{{- end }}
{{- end }}

{{/* The server's SHARDWRIGHT_REDIS_URL EnvVar: from a Secret when the URL carries a password. */}}
{{- define "shardwright.redisUrlEnv" -}}
- name: SHARDWRIGHT_REDIS_URL
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.existingSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret.name }}
      key: {{ .Values.redis.external.existingSecret.key }}
{{- else if include "shardwright.redisSecretNeeded" . }}
  valueFrom:
    secretKeyRef:
      name: {{ include "shardwright.redisName" . }}
      key: url
{{- else }}
  value: {{ .Values.redis.external.url | quote }}
{{- end }}
{{- end }}

{{/* A native gRPC probe. Takes (dict "port" PORT "service" NAME "probe" TIMINGS). */}}
{{- define "shardwright.grpcProbe" -}}
grpc:
  port: {{ .port }}
  {{- with .service }}
  service: {{ . | quote }}
  {{- end }}
{{ toYaml .probe }}
{{- end }}

{{/* Checks across values that values.schema.json cannot state; each failure says what to change. */}}
{{- define "shardwright.validate" -}}
{{- $names := dict }}
{{- range .Values.ray.workerGroups }}
{{- if hasKey $names .name }}
{{- fail (printf "ray.workerGroups: the name %q is used twice; give each group its own name" .name) }}
{{- end }}
{{- $_ := set $names .name true }}
{{- if or (lt (int .replicas) (int .minReplicas)) (gt (int .replicas) (int .maxReplicas)) }}
{{- fail (printf "ray.workerGroups[%s]: replicas=%d must lie within minReplicas=%d and maxReplicas=%d" .name (int .replicas) (int .minReplicas) (int .maxReplicas)) }}
{{- end }}
{{- end }}
{{- if and (eq .Values.redis.mode "external") (not .Values.redis.external.url) (not .Values.redis.external.existingSecret.name) }}
{{- fail "redis.mode=external needs redis.external.url (redis://HOST:6379/0) or redis.external.existingSecret.name" }}
{{- end }}
{{- if and .Values.ray.gcsFaultTolerance.enabled (eq .Values.redis.mode "external") (not .Values.ray.gcsFaultTolerance.redisAddress) }}
{{- fail "ray.gcsFaultTolerance.enabled=true with redis.mode=external needs ray.gcsFaultTolerance.redisAddress (HOST:PORT of that Redis, and redisPasswordSecret if it has a password), or ray.gcsFaultTolerance.enabled=false" }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.tokens) (not .Values.auth.tenants) (not .Values.auth.existingSecret) }}
{{- fail "auth.enabled=true needs auth.tenants ({NAME: {tokens: [SECRET], roots: [...]}}), auth.tokens ([{tenant: NAME, token: SECRET}]) or auth.existingSecret (a Secret with a tokens.yaml key)" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) (or (not .Values.tls.cert) (not .Values.tls.key)) }}
{{- fail "tls.enabled=true needs tls.existingSecret (a kubernetes.io/tls Secret) or both tls.cert and tls.key (PEM)" }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.tls.enabled) (not .Values.insecure) }}
{{- fail "auth.enabled=true without tls.enabled=true would send bearer tokens in cleartext: enable TLS (tls.existingSecret, or tls.cert and tls.key), or set insecure=true to accept that" }}
{{- end }}
{{- if and .Values.state.persistence.enabled (not .Values.state.persistence.existingClaim) (not (has "ReadWriteMany" .Values.state.persistence.accessModes)) }}
{{- fail "state.persistence.accessModes must include ReadWriteMany: the head and every worker mount the state volume (or give state.persistence.existingClaim)" }}
{{- end }}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.enabled) }}
{{- fail "tls.clientCA.enabled=true (mutual TLS) needs tls.enabled=true as well" }}
{{- end }}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.clientCA.existingSecret) (not .Values.tls.clientCA.cert) }}
{{- fail "tls.clientCA.enabled=true needs tls.clientCA.existingSecret or tls.clientCA.cert (PEM CA bundle)" }}
{{- end }}
{{- if and .Values.tls.enabled (not (include "shardwright.separateHealthPort" .)) }}
{{- fail (printf "tls.enabled=true with server.healthPort=%v equal to server.port: the kubelet's gRPC probes cannot speak TLS; set server.healthPort to another port (or null for port + 1)" .Values.server.healthPort) }}
{{- end }}
{{- if and (not .Values.auth.enabled) (not (include "shardwright.separateHealthPort" .)) }}
{{- fail (printf "auth.enabled=false with server.healthPort=%v equal to server.port: without auth the gRPC port listens on 127.0.0.1 only, so the kubelet's probes need a health port of their own; set server.healthPort to another port (or null for port + 1), or enable auth" .Values.server.healthPort) }}
{{- end }}
{{- end }}

{{/* The pod securityContext of the pods that run the Shardwright image. */}}
{{- define "shardwright.podSecurityContext" -}}
securityContext:
  {{- toYaml .Values.securityContext.pod | nindent 2 }}
{{- end }}

{{/*
A container's securityContext: securityContext.container plus readOnlyRootFilesystem. Takes
(dict "root" $ "readOnly" BOOL).
*/}}
{{- define "shardwright.containerSecurityContext" -}}
{{- $context := deepCopy .root.Values.securityContext.container -}}
{{- $_ := set $context "readOnlyRootFilesystem" .readOnly -}}
securityContext:
  {{- toYaml $context | nindent 2 }}
{{- end }}

{{/* The state volume's claim: state.persistence.existingClaim, else the chart's. */}}
{{- define "shardwright.stateClaimName" -}}
{{- .Values.state.persistence.existingClaim | default (printf "%s-state" (include "shardwright.fullname" .)) }}
{{- end }}

{{/* The volumes every Shardwright pod mounts: the state directory and, when given, the model weights. */}}
{{- define "shardwright.sharedVolumes" -}}
- name: state
  {{- if .Values.state.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "shardwright.stateClaimName" . }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- with .Values.models.volume }}
- name: models
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Their mounts, in every container that runs Shardwright or Ray. */}}
{{- define "shardwright.sharedMounts" -}}
- name: state
  mountPath: {{ .Values.state.mountPath }}
{{- if .Values.models.volume }}
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* SHARDWRIGHT_STATE_DIR, in every container that runs Shardwright or Ray. */}}
{{- define "shardwright.stateEnv" -}}
- name: SHARDWRIGHT_STATE_DIR
  value: {{ .Values.state.mountPath | quote }}
{{- end }}

{{/* A NetworkPolicy peer: this release's Ray pods (head, workers and API pods). */}}
{{- define "shardwright.rayPodsPeer" -}}
- podSelector:
    matchLabels:
      {{- include "shardwright.selectorLabels" . | nindent 6 }}
    matchExpressions:
      - key: app.kubernetes.io/component
        operator: In
        values: [ray-head, ray-worker, api-server]
{{- end }}

{{/* The label of every pod that runs an API replica (the head and the API pods): the API Service
and the head NetworkPolicy select by it. */}}
{{- define "shardwright.apiServerLabel" -}}
shardwright.io/api-server: "true"
{{- end }}

{{/* The selector of the pods that run an API replica. */}}
{{- define "shardwright.apiServerSelectorLabels" -}}
{{ include "shardwright.selectorLabels" . }}
{{ include "shardwright.apiServerLabel" . }}
{{- end }}
