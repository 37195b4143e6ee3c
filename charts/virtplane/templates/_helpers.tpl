{{/* Chart name, truncated to fit a DNS label. */}}
{{- define "virtplane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name, plus the chart name unless the release name already
contains it. Cluster-scoped objects (ClusterRoles) carry it, so two releases never collide.
*/}}
{{- define "virtplane.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "virtplane.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "virtplane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: virtplane
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "controller"). */}}
{{- define "virtplane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "virtplane.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects. */}}
{{- define "virtplane.componentLabels" -}}
{{ include "virtplane.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "virtplane.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- default (printf "%s-controller" (include "virtplane.fullname" .)) .Values.controller.serviceAccount.name }}
{{- else }}
{{- required "controller.serviceAccount.name is required when controller.serviceAccount.create is false" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "virtplane.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (printf "%s-agent" (include "virtplane.fullname" .)) .Values.agent.serviceAccount.name }}
{{- else }}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: repository@digest, or repository:tag (default: appVersion). */}}
{{- define "virtplane.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The agent's host directories: allowedPaths and hostPaths, without duplicates. */}}
{{- define "virtplane.agent.hostDirs" -}}
{{- $dirs := list }}
{{- range concat .Values.agent.allowedPaths .Values.agent.hostPaths }}
{{- $d := trimSuffix "/" . }}
{{- if not (has $d $dirs) }}
{{- $dirs = append $dirs $d }}
{{- end }}
{{- end }}
{{- toJson $dirs }}
{{- end }}

{{/*
Checks across values that the schema cannot express. Included by every workload template, so a
bad combination fails the install with a message instead of producing a flapping cluster.
*/}}
{{- define "virtplane.validate" -}}
{{- if le (int .Values.controller.nodeGraceSeconds) (int .Values.agent.heartbeatSeconds) }}
{{- fail (printf "controller.nodeGraceSeconds (%v) must exceed agent.heartbeatSeconds (%v): otherwise every node is marked unreachable between two heartbeats" .Values.controller.nodeGraceSeconds .Values.agent.heartbeatSeconds) }}
{{- end }}
{{- if and .Values.agent.allowedPaths (ne .Values.tenancy "open") }}
{{- fail "agent.allowedPaths applies only with tenancy: open. In namespaced mode a source must lie in a storage pool granted to the object's namespace: define a libvirt dir pool for the directory and grant it (virtplane.io/pools)" }}
{{- end }}
{{- end }}
