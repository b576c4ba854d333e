{{/*
Chart name, truncated to a DNS label.
*/}}
{{- define "peg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Resource-name prefix: <release>-peg, or the release name when it already contains the chart name.
Truncated to 40 characters so every derived name (prefix + "-launcher-r<revision>") stays a
DNS label.
*/}}
{{- define "peg.fullname" -}}
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

{{- define "peg.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels; call with (dict "root" $ "component" "launcher").
*/}}
{{- define "peg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "peg.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Common labels; call with (dict "root" $ "component" "launcher").
*/}}
{{- define "peg.labels" -}}
helm.sh/chart: {{ include "peg.chart" .root }}
{{ include "peg.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
An image reference; call with (dict "image" .Values.image "root" $). The tag defaults to appVersion.
*/}}
{{- define "peg.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion) }}
{{- end }}

{{- define "peg.launcherServiceAccount" -}}
{{- printf "%s-launcher" (include "peg.fullname" .) }}
{{- end }}

{{- define "peg.jobServiceAccount" -}}
{{- printf "%s-job" (include "peg.fullname" .) }}
{{- end }}

{{- define "peg.s3ServiceName" -}}
{{- printf "%s-s3" (include "peg.fullname" .) }}
{{- end }}

{{/*
The Secret with the S3 keys: s3.existingSecret, or the one the chart makes for the bundled server.
Empty when neither exists.
*/}}
{{- define "peg.s3SecretName" -}}
{{- if .Values.s3.existingSecret }}
{{- .Values.s3.existingSecret }}
{{- else if .Values.seaweedfs.enabled }}
{{- printf "%s-s3-credentials" (include "peg.fullname" .) }}
{{- end }}
{{- end }}

{{/*
S3 endpoint host:port: s3.endpoint, else the bundled server's Service, else empty.
*/}}
{{- define "peg.s3Endpoint" -}}
{{- if .Values.s3.endpoint }}
{{- .Values.s3.endpoint }}
{{- else if .Values.seaweedfs.enabled }}
{{- printf "%s.%s.svc:8333" (include "peg.s3ServiceName" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{/*
"true"/"false": TLS to the S3 endpoint (plain HTTP to the bundled server).
*/}}
{{- define "peg.s3Secure" -}}
{{- if and .Values.seaweedfs.enabled (not .Values.s3.endpoint) }}false{{ else }}{{ .Values.s3.secure }}{{ end }}
{{- end }}

{{/*
Where the chart's pods mount the S3 Secret (files, never environment variables); the same path
peg's renderers mount it at in stage pods.
*/}}
{{- define "peg.s3MountPath" -}}
/etc/peg-s3
{{- end }}

{{/*
The S3 Secret as a read-only volume; with "peg.s3VolumeMount", the launcher's and test pod's keys.
*/}}
{{- define "peg.s3Volume" -}}
- name: s3-credentials
  secret:
    secretName: {{ include "peg.s3SecretName" . }}
    defaultMode: 0440
{{- end }}

{{- define "peg.s3VolumeMount" -}}
- name: s3-credentials
  mountPath: {{ include "peg.s3MountPath" . }}
  readOnly: true
{{- end }}

{{/*
Names of the two S3 key variables (and Secret keys): the run's store.access_key_env and
secret_key_env when set, else peg's defaults.
*/}}
{{- define "peg.s3KeyNames" -}}
{{- $store := (.Values.run | default dict).store | default dict }}
{{- list ($store.access_key_env | default "AWS_ACCESS_KEY_ID") ($store.secret_key_env | default "AWS_SECRET_ACCESS_KEY") | toJson }}
{{- end }}

{{/*
True when `run` values are given.
*/}}
{{- define "peg.hasRun" -}}
{{- if .Values.run }}true{{ end }}
{{- end }}

{{/*
The run config the launcher reads, as YAML: `run` with the platform's facts filled in where the
run leaves them unset (name, cluster namespace/images/service account/S3 secret/scheduling, store
endpoint/TLS/uri). Keys the run sets are kept as they are.
*/}}
{{- define "peg.runConfig" -}}
{{- $run := deepCopy .Values.run }}
{{- if not (hasKey $run "name") }}{{ $_ := set $run "name" .Release.Name }}{{ end }}
{{- if not (hasKey $run "cluster") }}{{ $_ := set $run "cluster" dict }}{{ end }}
{{- $cluster := $run.cluster }}
{{- if and (hasKey $cluster "namespace") (ne $cluster.namespace .Release.Namespace) }}
{{- fail (printf "run.cluster.namespace is %q but the release is in %q: the launcher may create jobs only in its own namespace (remove the key or install into %q)" $cluster.namespace .Release.Namespace $cluster.namespace) }}
{{- end }}
{{- $defaults := dict
    "namespace" .Release.Namespace
    "image" (include "peg.image" (dict "image" .Values.image "root" .))
    "ray_image" (include "peg.image" (dict "image" .Values.rayImage "root" .))
    "image_pull_policy" .Values.image.pullPolicy
    "service_account" (include "peg.jobServiceAccount" .)
    "run_as_user" (int .Values.podSecurityContext.runAsUser) }}
{{- with (include "peg.s3SecretName" .) }}{{ $_ := set $defaults "s3_secret" . }}{{ end }}
{{- with .Values.scheduling.nodeSelector }}{{ $_ := set $defaults "node_selector" . }}{{ end }}
{{- with .Values.scheduling.priorityClassName }}{{ $_ := set $defaults "priority_class" . }}{{ end }}
{{- with .Values.scheduling.tolerations }}
{{- $tolerations := list }}
{{- range . }}
{{- $t := dict }}
{{- range $k, $v := . }}{{ $_ := set $t (ternary "toleration_seconds" $k (eq $k "tolerationSeconds")) $v }}{{ end }}
{{- $tolerations = append $tolerations $t }}
{{- end }}
{{- $_ := set $defaults "tolerations" $tolerations }}
{{- end }}
{{- range $k, $v := $defaults }}
{{- if not (hasKey $cluster $k) }}{{ $_ := set $cluster $k $v }}{{ end }}
{{- end }}
{{- $endpoint := include "peg.s3Endpoint" . }}
{{- if $endpoint }}
{{- if not (hasKey $run "store") }}{{ $_ := set $run "store" dict }}{{ end }}
{{- $store := $run.store }}
{{- if not (hasKey $store "endpoint") }}{{ $_ := set $store "endpoint" $endpoint }}{{ end }}
{{- if not (hasKey $store "secure") }}{{ $_ := set $store "secure" (eq (include "peg.s3Secure" .) "true") }}{{ end }}
{{- if not (hasKey $store "uri") }}{{ $_ := set $store "uri" (printf "s3://%s/%s" .Values.s3.bucket $run.name) }}{{ end }}
{{- end }}
{{- if include "peg.s3SecretName" . }}
{{- if not (hasKey $run "store") }}{{ $_ := set $run "store" dict }}{{ end }}
{{- if not (hasKey $run.store "credentials_file") }}{{ $_ := set $run.store "credentials_file" (include "peg.s3MountPath" .) }}{{ end }}
{{- end }}
{{- toYaml $run }}
{{- end }}

{{/*
The training API the run uses: run.cluster.trainer_api, else peg's default (ClusterConfig;
tests/test_chart.py checks the two agree).
*/}}
{{- define "peg.trainerApi" -}}
{{- ((.Values.run | default dict).cluster | default dict).trainer_api | default "trainjob" }}
{{- end }}

{{/*
Fail early, with what to install, when the custom resources the launcher creates are not served.
*/}}
{{- define "peg.requireCRDs" -}}
{{- if .Values.checkCRDs }}
{{- $trainJob := .Capabilities.APIVersions.Has "trainer.kubeflow.org/v1alpha1/TrainJob" }}
{{- $pyTorchJob := .Capabilities.APIVersions.Has "kubeflow.org/v1/PyTorchJob" }}
{{- $missing := list }}
{{- if not (.Capabilities.APIVersions.Has "ray.io/v1/RayJob") }}
{{- $missing = append $missing "RayJob (ray.io/v1): install KubeRay (the kuberay-operator chart)" }}
{{- end }}
{{- if include "peg.hasRun" . }}
{{- if and (eq (include "peg.trainerApi" .) "trainjob") (not $trainJob) }}
{{- $missing = append $missing "TrainJob (trainer.kubeflow.org/v1alpha1), which run.cluster.trainer_api=trainjob uses: install Kubeflow Trainer v2 (the kubeflow-trainer chart), or set run.cluster.trainer_api=pytorchjob" }}
{{- else if and (eq (include "peg.trainerApi" .) "pytorchjob") (not $pyTorchJob) }}
{{- $missing = append $missing "PyTorchJob (kubeflow.org/v1), which run.cluster.trainer_api=pytorchjob uses: install the Kubeflow training-operator v1, or set run.cluster.trainer_api=trainjob" }}
{{- end }}
{{- else if not (or $trainJob $pyTorchJob) }}
{{- $missing = append $missing "TrainJob (trainer.kubeflow.org/v1alpha1) or PyTorchJob (kubeflow.org/v1): install Kubeflow Trainer v2 or the training-operator v1" }}
{{- end }}
{{- if $missing }}
{{- fail (printf "peg needs custom resources this cluster does not serve:\n  - %s\n(checkCRDs=false skips this check; with `helm template` pass --api-versions for each)" (join "\n  - " $missing)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Checks of the platform values that templates cannot express in values.schema.json.
*/}}
{{- define "peg.validate" -}}
{{- include "peg.requireCRDs" . }}
{{- $data := (.Values.run | default dict).data | default dict }}
{{- if regexMatch "^[a-z][a-z0-9+.-]*://" (toString ($data.beir | default "")) }}
{{- fail (printf "run.data.beir: %s is a URL, but the launcher's prepare stage reads data.beir as a folder in its own pod and uploads it into the store: use beir:NAME (e.g. beir:fiqa; prepare downloads it) or run `peg pipeline stage prepare` where the data is, with the same run config" (toString $data.beir)) }}
{{- end }}
{{- if and (include "peg.hasRun" .) (not (include "peg.s3SecretName" .)) }}
{{- $store := .Values.run.store | default dict }}
{{- if or (not $store.uri) (hasPrefix "s3://" (toString $store.uri)) }}
{{- fail "s3.existingSecret is required: the run's pods read and write the store with keys from that Secret (or set seaweedfs.enabled=true for a bundled S3 server with generated keys)" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The pod-level fields every chart pod shares (restricted Pod Security Standard).
*/}}
{{- define "peg.podSecurity" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
The operator's calls inside the namespaces it watches (peg/operator/api.py API_CALLS, all but the
cluster-scoped CRD reads): a ClusterRole's rules cluster-wide, a Role's per watched namespace.
*/}}
{{- define "peg.operatorNamespacedRules" -}}
- apiGroups: ["peg.dev"]
  resources: ["embeddingpipelines"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["peg.dev"]
  resources: ["embeddingpipelines/status"]
  verbs: ["patch"]
- apiGroups: ["peg.dev"]
  resources: ["embeddingpipelines/finalizers"]
  verbs: ["update"]
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["list", "watch", "create", "delete"]
- apiGroups: ["trainer.kubeflow.org"]
  resources: ["trainjobs"]
  verbs: ["list", "watch", "create", "delete"]
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "get", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
