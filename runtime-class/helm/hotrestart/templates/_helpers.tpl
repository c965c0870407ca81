{{/* The release's base name, at most 63 characters (a label value's limit). */}}
{{- define "hotrestart.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The installer's objects: DaemonSet, ServiceAccount, ClusterRole and its binding. */}}
{{- define "hotrestart.installerName" -}}
{{- printf "%s-installer" (include "hotrestart.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The node guard's ValidatingAdmissionPolicy and its binding. */}}
{{- define "hotrestart.nodeGuardName" -}}
{{- printf "%s-node-guard" (include "hotrestart.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: fixed for the release's life (a DaemonSet's selector cannot change). */}}
{{- define "hotrestart.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: installer
{{- end -}}

{{- define "hotrestart.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hotrestart
{{- end -}}

{{- define "hotrestart.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}

{{/* The installer's command; fails on a mode it does not have. */}}
{{- define "hotrestart.command" -}}
{{- if not (has .Values.mode (list "install" "uninstall")) -}}
{{- fail (printf "mode: %q is not one of install, uninstall" (toString .Values.mode)) -}}
{{- end -}}
{{- list "/hotrestart/bin/hotrestart" .Values.mode "--wait" | toJson -}}
{{- end -}}

{{/* Settings with a fixed set of choices, checked here as well as by values.schema.json
     (which --skip-schema-validation bypasses). */}}
{{- define "hotrestart.validate" -}}
{{- if not (has (toString .Values.store.backend) (list "directory" "s3")) -}}
{{- fail (printf "store.backend: %q is not supported; use \"directory\" (a node-local directory) or \"s3\" (an object store)" (toString .Values.store.backend)) -}}
{{- end -}}
{{- if eq (toString .Values.store.backend) "s3" -}}
{{- if not (hasPrefix "s3://" (toString .Values.store.url)) -}}
{{- fail "store.url: give the object store as s3://bucket/prefix" -}}
{{- end -}}
{{- if not .Values.store.keySecret.name -}}
{{- fail "store.keySecret.name: an object store is shared and needs a store key" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.store.s3ConfigSecret.name (not .Values.store.s3ConfigSecret.key) -}}
{{- fail "store.s3ConfigSecret.key: empty; name the Secret's key that holds the AWS config file" -}}
{{- end -}}
{{- if not (has .Values.containerd.restart (list "systemd" "none")) -}}
{{- fail (printf "containerd.restart: %q is not one of systemd, none" (toString .Values.containerd.restart)) -}}
{{- end -}}
{{- if not (has (toString .Values.systemdCgroup) (list "auto" "true" "false")) -}}
{{- fail (printf "systemdCgroup: %q is not one of auto, true, false" (toString .Values.systemdCgroup)) -}}
{{- end -}}
{{- if and .Values.store.keySecret.name (not .Values.store.keySecret.key) -}}
{{- fail "store.keySecret.key: empty; name the Secret's key that holds the store key" -}}
{{- end -}}
{{- end -}}
