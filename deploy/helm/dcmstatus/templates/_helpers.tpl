{{/* Names and labels shared by the dcmstatus templates. */}}

{{- define "dcmstatus.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dcmstatus.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dcmstatus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dcmstatus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dcmstatus.labels" -}}
{{ include "dcmstatus.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The Secret holding DCMSTATUS_API_TOKEN, DCMSTATUS_PAGE_TOKEN_SECRET (and the NATS credentials). */}}
{{- define "dcmstatus.secretName" -}}
{{- .Values.secret.existingSecret | default (include "dcmstatus.fullname" .) -}}
{{- end -}}

{{/* "true" when a NATS credentials file is mounted. */}}
{{- define "dcmstatus.natsCreds" -}}
{{- if and .Values.nats.credsKey (or .Values.secret.existingSecret .Values.nats.creds) -}}true{{- end -}}
{{- end -}}
