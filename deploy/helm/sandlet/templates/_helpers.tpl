{{/* The name of the release's cluster-wide objects: a release name holding "sandlet" is used as is. */}}
{{- define "sandlet.fullname" -}}
{{- if contains "sandlet" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-sandlet" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sandlet.labels" -}}
app.kubernetes.io/name: sandlet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "sandlet.selector" -}}
app.kubernetes.io/name: sandlet-controller
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
