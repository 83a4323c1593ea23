{{/*
Pieces shared by the Ray head and worker pod templates of the RayCluster.
*/}}

{{/*
The Ray container (KubeRay runs `ray start` in it). Takes (dict "root" $ "name" NAME
"group" GROUP-VALUES "resources" RESOURCES). KubeRay adds the `ray start` command, the Ray ports it
needs and its own probes.
*/}}
{{- define "shardwright.rayContainer" -}}
name: {{ .name }}
image: {{ include "shardwright.image" (dict "image" .root.Values.image "root" .root) | quote }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
{{- include "shardwright.containerSecurityContext" (dict "root" .root "readOnly" .root.Values.securityContext.rayReadOnlyRootFilesystem) | nindent 0 }}
resources:
  {{- toYaml .resources | nindent 2 }}
env:
  {{- include "shardwright.stateEnv" .root | nindent 2 }}
  {{- with .group.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
volumeMounts:
  - name: dshm
    mountPath: /dev/shm
  {{- if .root.Values.securityContext.rayReadOnlyRootFilesystem }}
  - name: tmp
    mountPath: /tmp
  {{- end }}
  {{- if has .name (list "ray-head" "ray-api") }}
  - name: ray-tmp
    mountPath: /tmp/ray
  {{- end }}
  {{- include "shardwright.sharedMounts" .root | nindent 2 }}
{{- end }}

{{/*
A worker pod's volumes: /dev/shm, the shared state and model volumes, /tmp with a read-only root.
Takes (dict "root" $ "group" VALUES).
*/}}
{{- define "shardwright.workerVolumes" -}}
{{ include "shardwright.shmVolume" .group }}
{{ include "shardwright.sharedVolumes" .root }}
{{- if .root.Values.securityContext.rayReadOnlyRootFilesystem }}
- name: tmp
  emptyDir: {}
{{- end }}
{{- end }}

{{/* The memory-backed /dev/shm volume for Ray's object store. Takes the group's values. */}}
{{- define "shardwright.shmVolume" -}}
- name: dshm
  emptyDir:
    medium: Memory
    {{- with .shmSizeLimit }}
    sizeLimit: {{ . | quote }}
    {{- end }}
{{- end }}

{{/* imagePullSecrets, nodeSelector, tolerations and affinity of a pod. Takes (dict "root" $ "group" VALUES). */}}
{{- define "shardwright.podPlacement" -}}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A worker group's container resources: its CPU and memory plus `gpus` as the nvidia.com/gpu limit. */}}
{{- define "shardwright.workerResources" -}}
{{- $resources := deepCopy (.resources | default dict) }}
{{- if gt (int .gpus) 0 }}
{{- $limits := get $resources "limits" | default dict }}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpus) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}
