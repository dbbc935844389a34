{{- define "tracegate.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tracegate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tracegate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tracegate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tracegate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "tracegate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "tracegate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tracegate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tracegate.policyConfigMap" -}}
{{- if .Values.policies.existingConfigMap -}}
{{- .Values.policies.existingConfigMap -}}
{{- else -}}
{{- printf "%s-policies" (include "tracegate.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "tracegate.sqlite" -}}
{{- if eq .Values.outbox.mode "sqlite" -}}true{{- end -}}
{{- end -}}

{{/* The pod's grace period covers the preStop pause, the drain, and a margin to exit. */}}
{{- define "tracegate.gracePeriod" -}}
{{- add .Values.preStopSleepSeconds .Values.drainSeconds 5 -}}
{{- end -}}

{{/* The authorization listener's own ClusterIP Service (deploy/gateway-api names it tracegate-authz). */}}
{{- define "tracegate.authzServiceName" -}}
{{- printf "%s-authz" (include "tracegate.fullname" . | trunc 57 | trimSuffix "-") -}}
{{- end -}}

{{/* Where a mountAs: file shared secret appears in the container. */}}
{{- define "tracegate.authzSecretDir" -}}/etc/tracegate/authz-secret{{- end -}}

{{/* The environment variable a mountAs: env shared secret arrives in (TRACEGATE_AUTHZ_SECRET=env:NAME). */}}
{{- define "tracegate.authzSecretEnv" -}}AUTHZ_GATEWAY_SECRET{{- end -}}

{{/* The PromQL selector of this release's samples: the labels its ServiceMonitor gives them. */}}
{{- define "tracegate.promSelector" -}}
{{- printf "job=%q, namespace=%q" (include "tracegate.fullname" .) .Release.Namespace -}}
{{- end -}}
