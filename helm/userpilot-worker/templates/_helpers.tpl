{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "userpilot-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: release-chart unless the release name already contains the chart
name, so `helm install userpilot-worker .` does not produce userpilot-worker-userpilot-worker.
*/}}
{{- define "userpilot-worker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version for the helm.sh/chart label.
*/}}
{{- define "userpilot-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels on every resource.
*/}}
{{- define "userpilot-worker.labels" -}}
helm.sh/chart: {{ include "userpilot-worker.chart" . }}
{{ include "userpilot-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: delivery-worker
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: immutable on a Deployment, so they carry no version.
*/}}
{{- define "userpilot-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "userpilot-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "userpilot-worker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "userpilot-worker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference; a digest pins the image and wins over the tag.
*/}}
{{- define "userpilot-worker.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the write token: the user's existingSecret or the chart's own.
*/}}
{{- define "userpilot-worker.apiKeySecretName" -}}
{{- default (include "userpilot-worker.fullname" .) .Values.userpilot.existingSecret }}
{{- end }}

{{/*
Whether the chart renders its own Secret (token and/or registry credentials).
*/}}
{{- define "userpilot-worker.createSecret" -}}
{{- if or (not .Values.userpilot.existingSecret) (and .Values.schemaRegistry.basicAuthUserInfo (not .Values.schemaRegistry.existingSecret)) (and .Values.redis.url (not .Values.redis.existingSecret)) }}true{{- end }}
{{- end }}

{{/*
Mappings as JSON text, or "" when none are given (the worker then uses its default preset).
*/}}
{{- define "userpilot-worker.mappingsJson" -}}
{{- $m := .Values.userpilot.mappings }}
{{- if kindIs "string" $m }}
{{- $m }}
{{- else if $m }}
{{- toPrettyJson $m }}
{{- end }}
{{- end }}

{{/*
Replica bounds that apply to the chosen scaling mode: [min, max].
*/}}
{{- define "userpilot-worker.maxReplicas" -}}
{{- if .Values.autoscaling.keda.enabled }}
{{- .Values.autoscaling.keda.maxReplicaCount }}
{{- else if .Values.autoscaling.hpa.enabled }}
{{- .Values.autoscaling.hpa.maxReplicas }}
{{- else }}
{{- .Values.replicaCount }}
{{- end }}
{{- end }}

{{/*
kafka.bootstrapServers as KEDA's Kafka scaler takes it: host:port entries only. The worker
(librdkafka) also takes a protocol prefix (SASL_SSL://b1:9093) and a host without a port
(9092); given as they are, KEDA's lag polling failed and autoscaling stopped, silently.
*/}}
{{- define "userpilot-worker.kedaBootstrapServers" -}}
{{- $out := list }}
{{- range (splitList "," .Values.kafka.bootstrapServers) }}
{{- $entry := regexReplaceAll "^[A-Za-z_]+://" (trim .) "" }}
{{- if $entry }}
{{- /* An IPv6 address without brackets (the worker takes it, on 9092; one with a port it
     refuses): its last group is no port, and KEDA (Go) needs [addr]:port (review
     config41). */}}
{{- if and (gt (len (splitList ":" $entry)) 2) (not (hasPrefix "[" $entry)) }}
{{- $entry = printf "[%s]:9092" $entry }}
{{- else if not (regexMatch ":[0-9]+$" $entry) }}
{{- $entry = printf "%s:9092" $entry }}
{{- end }}
{{- $out = append $out $entry }}
{{- end }}
{{- end }}
{{- join "," $out }}
{{- end }}

{{- define "userpilot-worker.minReplicas" -}}
{{- if .Values.autoscaling.keda.enabled }}
{{- .Values.autoscaling.keda.minReplicaCount }}
{{- else if .Values.autoscaling.hpa.enabled }}
{{- .Values.autoscaling.hpa.minReplicas }}
{{- else }}
{{- .Values.replicaCount }}
{{- end }}
{{- end }}

{{/*
The Kafka security protocol the chart can see, upper case ("" when not set): the last plain
value in kafka.extraEnv or extraEnv, which the pod's env takes over the ConfigMap's, else
kafka.config's (review "diff46e": SASL_SSL in extraEnv passed; "compat52": kafka.config's
won here while the pod took extraEnv's). For the KEDA guards and NOTES.txt alike (review
"whole52").
*/}}
{{- define "userpilot-worker.kafkaProtocol" -}}
{{- $v := .Values }}
{{- $protocol := upper (toString (index ($v.kafka.config | default dict) "security.protocol" | default "")) }}
{{- range $entry := concat ($v.kafka.extraEnv | default list) ($v.extraEnv | default list) }}
{{- if and (eq (toString $entry.name) "KAFKA_SECURITY_PROTOCOL") (hasKey $entry "value") }}
{{- $protocol = upper (toString $entry.value) }}
{{- end }}
{{- end }}
{{- $protocol }}
{{- end }}

{{/*
Rendering-time guards for combinations the schema cannot express. Included by the
Deployment, so every render runs them.
*/}}
{{- define "userpilot-worker.validate" -}}
{{- $v := .Values }}
{{- if and $v.autoscaling.keda.enabled $v.autoscaling.hpa.enabled }}
{{- fail "autoscaling.keda.enabled and autoscaling.hpa.enabled are mutually exclusive: both would scale the same Deployment" }}
{{- end }}
{{- $partitions := int $v.autoscaling.partitions }}
{{- if and $v.autoscaling.keda.enabled (gt (int $v.autoscaling.keda.maxReplicaCount) $partitions) }}
{{- fail (printf "autoscaling.keda.maxReplicaCount (%d) exceeds autoscaling.partitions (%d): consumers beyond the partition count sit idle" (int $v.autoscaling.keda.maxReplicaCount) $partitions) }}
{{- end }}
{{- /* KEDA reads the lag from the brokers itself: without the worker's SASL/TLS it cannot,
   and the replica count stays where it is with no sign from the chart. */}}
{{- $protocol := include "userpilot-worker.kafkaProtocol" . }}
{{- /* A broker written SASL_SSL://host whose prefix is not the security protocol: the
   worker refuses it (librdkafka drops such a broker; exit 2 in every pod), and KEDA's guard
   below read the protocol without it (review "helm52"). */}}
{{- $protocolOf := $protocol | default "PLAINTEXT" }}
{{- /* Unknown when the protocol may come from a Secret or ConfigMap (kafka.existingSecret's
   KAFKA_* keys, extraEnvFrom, a valueFrom): the worker checks it (review "diff52a"). */}}
{{- $protocolKnown := not (or $v.kafka.existingSecret $v.extraEnvFrom) }}
{{- range $entry := concat ($v.extraEnv | default list) ($v.kafka.extraEnv | default list) }}
{{- if and (eq (toString $entry.name) "KAFKA_SECURITY_PROTOCOL") (not (hasKey $entry "value")) }}
{{- $protocolKnown = false }}{{- /* from a Secret or ConfigMap: the worker checks it */}}
{{- end }}
{{- end }}
{{- /* A listener's name (INTERNAL://) is no protocol: the worker refuses it (review
   "compat52"). */}}
{{- range $entry := splitList "," (toString $v.kafka.bootstrapServers) }}
{{- $parts := splitList "://" (trim $entry) }}
{{- if and (gt (len $parts) 1) (not (has (upper (first $parts)) (list "PLAINTEXT" "SSL" "SASL_PLAINTEXT" "SASL_SSL"))) }}
{{- fail (printf "kafka.bootstrapServers has %s: a broker is host:port, and %s:// is not a Kafka security protocol (a listener's name is not one either); write the broker as host:port" (trim $entry) (first $parts)) }}
{{- end }}
{{- end }}
{{- range $entry := ternary (splitList "," (toString $v.kafka.bootstrapServers)) list $protocolKnown }}
{{- $parts := splitList "://" (trim $entry) }}
{{- if and (gt (len $parts) 1) (has (upper (first $parts)) (list "PLAINTEXT" "SSL" "SASL_PLAINTEXT" "SASL_SSL")) (ne (upper (first $parts)) $protocolOf) }}
{{- fail (printf "kafka.bootstrapServers has %s, whose protocol is not the security protocol (%s): librdkafka drops such a broker and the worker refuses it. Set kafka.config.security.protocol: %s or write the broker without its prefix" (trim $entry) $protocolOf (upper (first $parts))) }}
{{- end }}
{{- end }}
{{- $kedaMeta := $v.autoscaling.keda.extraMetadata | default dict }}
{{- /* SASL's username and password come from a TriggerAuthentication only: `sasl` in the
   metadata alone fails in KEDA ("no username given"), `tls` alone meets a SASL listener
   without SASL (review "scaling46"). TLS alone (SSL) may be the metadata's `tls`. */}}
{{- $saslOk := $v.autoscaling.keda.authenticationRef }}
{{- $tlsOk := or $v.autoscaling.keda.authenticationRef (eq (toString (index $kedaMeta "tls" | default "")) "enable") }}
{{- if and $v.autoscaling.keda.enabled (or (and (has $protocol (list "SASL_SSL" "SASL_PLAINTEXT")) (not $saslOk)) (and (eq $protocol "SSL") (not $tlsOk))) }}
{{- fail (printf "the security protocol is %s but KEDA's Kafka trigger has no credentials: it could not read the lag and would never scale. Set autoscaling.keda.authenticationRef to a TriggerAuthentication (and autoscaling.keda.extraMetadata, e.g. %s)" $protocol (ternary "{tls: enable}" "{sasl: scram_sha512, tls: enable}" (eq $protocol "SSL"))) }}
{{- end }}
{{- /* A client certificate (mutual TLS): KEDA takes one from a TriggerAuthentication only
   (`cert`, `key`). With `tls: enable` alone it met the brokers without one, never read the
   lag and never scaled (review "helm52"). A CA of the workers' own may be a public bundle
   (`probe`, the system's): NOTES.txt warns of it instead (review "diff52a"). */}}
{{- if and $v.autoscaling.keda.enabled (has $protocol (list "SSL" "SASL_SSL")) (not $v.autoscaling.keda.authenticationRef) }}
{{- $config := $v.kafka.config | default dict }}
{{- range $key := list "ssl.certificate.location" "ssl.key.location" "ssl.certificate.pem" "ssl.key.pem" "ssl.keystore.location" }}
{{- $name := printf "KAFKA_%s" (upper (replace "." "_" $key)) }}
{{- $where := ternary (printf "kafka.config.%s" $key) "" (hasKey $config $key) }}
{{- /* ... or in extraEnv, where the protocol is read too (review "whole52") */}}
{{- range $entry := concat ($v.extraEnv | default list) ($v.kafka.extraEnv | default list) }}
{{- if and (not $where) (eq (upper (toString $entry.name)) $name) }}
{{- $where = printf "extraEnv's %s" $entry.name }}
{{- end }}
{{- end }}
{{- if $where }}
{{- fail (printf "%s is set (a client certificate) but KEDA's Kafka trigger has no TriggerAuthentication: KEDA takes a client certificate from one only (cert, key), so it could not read the lag and would never scale. Set autoscaling.keda.authenticationRef" $where) }}
{{- end }}
{{- end }}
{{- end }}
{{- /* The chart's own trigger keys: another value written after them wins in Kubernetes
   (the last of duplicate YAML keys), e.g. another consumerGroup than the workers'. */}}
{{- range $key := list "bootstrapServers" "consumerGroup" "topic" "bootstrapServersFromEnv" "consumerGroupFromEnv" "topicFromEnv" "lagThreshold" "activationLagThreshold" "offsetResetPolicy" "allowIdleConsumers" "limitToPartitionsWithLag" "excludePersistentLag" }}
{{- if and $v.autoscaling.keda.enabled (hasKey $kedaMeta $key) }}
{{- $how := "" }}
{{- /* Named after a value only where one exists (review "upgrade47"). */}}
{{- if hasKey $v.autoscaling.keda $key }}
{{- $how = printf "use autoscaling.keda.%s" $key }}
{{- else if eq $key "allowIdleConsumers" }}
{{- $how = "the chart keeps it false: a replica beyond the partitions has nothing to read" }}
{{- else }}
{{- $how = "it follows kafka.bootstrapServers, kafka.groupId and kafka.topics" }}
{{- end }}
{{- fail (printf "autoscaling.keda.extraMetadata.%s is set by the chart: %s" $key $how) }}
{{- end }}
{{- end }}
{{- if and $v.autoscaling.keda.enabled (gt (int $v.autoscaling.keda.minReplicaCount) (int $v.autoscaling.keda.maxReplicaCount)) }}
{{- fail "autoscaling.keda.minReplicaCount must not exceed autoscaling.keda.maxReplicaCount" }}
{{- end }}
{{- if and $v.autoscaling.hpa.enabled (gt (int $v.autoscaling.hpa.maxReplicas) $partitions) }}
{{- fail (printf "autoscaling.hpa.maxReplicas (%d) exceeds autoscaling.partitions (%d): consumers beyond the partition count sit idle" (int $v.autoscaling.hpa.maxReplicas) $partitions) }}
{{- end }}
{{- if and $v.autoscaling.hpa.enabled (gt (int $v.autoscaling.hpa.minReplicas) (int $v.autoscaling.hpa.maxReplicas)) }}
{{- fail "autoscaling.hpa.minReplicas must not exceed autoscaling.hpa.maxReplicas" }}
{{- end }}
{{- if and $v.autoscaling.hpa.enabled (not $v.autoscaling.hpa.targetCPUUtilizationPercentage) (not $v.autoscaling.hpa.targetMemoryUtilizationPercentage) }}
{{- fail "autoscaling.hpa needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" }}
{{- end }}
{{- if and (not $v.autoscaling.keda.enabled) (not $v.autoscaling.hpa.enabled) (gt (int $v.replicaCount) $partitions) }}
{{- fail (printf "replicaCount (%d) exceeds autoscaling.partitions (%d): consumers beyond the partition count sit idle" (int $v.replicaCount) $partitions) }}
{{- end }}
{{- /* After the drain the worker commits, leaves the group and flushes the DLQ within 18 s (STOP_AFTER_DRAIN_S), 2 s to exit: 20 s. */}}
{{- if lt (int $v.terminationGracePeriodSeconds) (add (int $v.worker.shutdownGraceSeconds) 20) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be longer than worker.shutdownGraceSeconds (%d) by at least 20 s (the final commit and leaving the group follow the drain), or pods are killed before their offsets are committed" (int $v.terminationGracePeriodSeconds) (int $v.worker.shutdownGraceSeconds)) }}
{{- end }}
{{- /* Names the chart sets from its values: an env entry would win over them unseen (the drain
   outlasting the grace period, probes on another port than the worker's). */}}
{{- $owned := list "USERPILOT_API_KEY" "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO" "REDIS_URL" "USERPILOT_ANALYTICS_ENDPOINT" "USERPILOT_INSECURE_HTTP" "USERPILOT_CONSENT_CATEGORIES" "USERPILOT_CONSENT_MISSING" "USERPILOT_MAPPINGS_FILE" "USERPILOT_RATE_LIMIT" "USERPILOT_RATE_PERIOD_SECONDS" "USERPILOT_RATE_LIMIT_SHARED" "USERPILOT_ENSURE_USER" "USERPILOT_ENSURE_USER_CACHE" "USERPILOT_REQUEST_TIMEOUT_SECONDS" "USERPILOT_RETRY_MAX_ATTEMPTS" "USERPILOT_RETRY_BUDGET_SECONDS" "KAFKA_BOOTSTRAP_SERVERS" "KAFKA_TOPICS" "KAFKA_GROUP_ID" "KAFKA_DLQ_TOPIC" "SCHEMA_REGISTRY_URL" "WORKER_MAX_IN_FLIGHT" "WORKER_SHUTDOWN_GRACE_SECONDS" "WORKER_METRICS_PORT" "WORKER_LOG_FORMAT" "WORKER_LOG_LEVEL" "WORKER_DLQ_MAX_RATIO" "WORKER_DLQ_WINDOW" "WORKER_DLQ_MAX_CONSECUTIVE" "WORKER_DLQ_GUARD_HOLD_SECONDS" "WORKER_REPLAY_MAX" "REDIS_TIMEOUT_SECONDS" "REDIS_DEDUP_TTL_SECONDS" "REDIS_TLS_CA_FILE" "KAFKA_METADATA_BROKER_LIST" }}
{{- /* A secret's *_FILE beside the variable the chart sets: the worker refuses both (every
   pod exits 2). */}}
{{- $fromFile := dict "USERPILOT_API_KEY_FILE" "userpilot.existingSecret (a Secret holding the token)" }}
{{- if or $v.schemaRegistry.existingSecret $v.schemaRegistry.basicAuthUserInfo }}
{{- $_ := set $fromFile "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE" "schemaRegistry.existingSecret, without schemaRegistry.basicAuthUserInfo" }}
{{- end }}
{{- /* librdkafka's secret settings (config.SECRET_KAFKA_KEYS), and their KAFKA_ names. */}}
{{- $secretKeys := (list "sasl.password" "ssl.key.password" "sasl.oauthbearer.client.secret" "ssl.keystore.password" "ssl.key.pem" "sasl.oauthbearer.config" "sasl.oauthbearer.client.credentials.client.secret" "sasl.oauthbearer.assertion.private.key.passphrase" "sasl.oauthbearer.assertion.private.key.pem") }}
{{- $secretNames := list }}
{{- range $secretKeys }}{{- $secretNames = append $secretNames (printf "KAFKA_%s" (upper (replace "." "_" .))) }}{{- end }}
{{- /* A proxy password written $(VAR): Kubernetes expands it only when VAR comes before the
   proxy variable (in the env list as rendered, kafka.extraEnv then extraEnv, or from an
   envFrom source); otherwise the worker gets the text and refuses it in every pod (review
   "compat52"). */}}
{{- $secretRefs := list }}
{{- $fromEnvFrom := or $v.kafka.existingSecret $v.extraEnvFrom }}
{{- range $entry := concat ($v.kafka.extraEnv | default list) ($v.extraEnv | default list) }}
{{- $ref := regexFind "^([A-Za-z][A-Za-z0-9+.-]*://)?[^/@:]*:\\$\\([A-Za-z_][A-Za-z0-9_]*\\)@" (toString ($entry.value | default "")) }}
{{- if and $ref (has (upper (toString $entry.name)) (list "HTTPS_PROXY" "HTTP_PROXY" "ALL_PROXY")) (not $fromEnvFrom) }}
{{- $var := regexReplaceAll "^.*\\$\\(([A-Za-z_][A-Za-z0-9_]*)\\)@$" $ref "${1}" }}
{{- if not (has $var $secretRefs) }}
{{- fail (printf "%s's password is $(%s), but %s is not taken from a Secret before it: Kubernetes leaves the reference as it is and the worker refuses it (or expands a plain value the Deployment shows). Define %s (valueFrom a Secret) before %s in kafka.extraEnv or extraEnv" $entry.name $var $var $var $entry.name) }}
{{- end }}
{{- end }}
{{- /* A Kafka secret written as exactly $(VAR) of a variable taken from a Secret shows
   nothing in the Deployment, as the proxy passwords above (review "compat53"), when VAR
   comes before it. */}}
{{- $whole := regexFind "^\\$\\(([A-Za-z_][A-Za-z0-9_]*)\\)$" (toString ($entry.value | default "")) }}
{{- if and $whole (has (upper (toString $entry.name)) $secretNames) (not $fromEnvFrom) }}
{{- $var := trimSuffix ")" (trimPrefix "$(" $whole) }}
{{- if not (has $var $secretRefs) }}
{{- fail (printf "%s is $(%s), but %s is not taken from a Secret before it: Kubernetes leaves the reference as it is (or expands a plain value the Deployment shows). Define %s (valueFrom a Secret) before %s in kafka.extraEnv or extraEnv" $entry.name $var $var $var $entry.name) }}
{{- end }}
{{- end }}
{{- if and (hasKey $entry "valueFrom") (hasKey ($entry.valueFrom | default dict) "secretKeyRef") }}
{{- $secretRefs = append $secretRefs (toString $entry.name) }}
{{- end }}
{{- end }}
{{- range $where, $entries := dict "extraEnv" $v.extraEnv "kafka.extraEnv" $v.kafka.extraEnv }}
{{- range $entries }}
{{- /* Any case: `Kafka_Sasl_Password` rendered the password, then every pod refused the name
   (review "config48"). */}}
{{- if and (has (upper .name) $secretNames) (hasKey . "value") (ne (toString .value) "") (not (regexMatch "^\\$\\([A-Za-z_][A-Za-z0-9_]*\\)$" (toString .value))) }}
{{- fail (printf "%s sets %s as a plain value, which the Deployment shows to anyone who may read it: take it from a Secret (valueFrom: {secretKeyRef: {name: ..., key: ...}}) or put it in kafka.existingSecret" $where .name) }}
{{- end }}
{{- /* A proxy URL with a password in it (`http://user:password@proxy:3128`, or without the
   scheme, which the worker reads as http://; review "diff48b"), or a user name only (an API
   key as the user, which the worker masks as a secret; review "secrets49"), likewise. */}}
{{- /* A password that is exactly a $(VAR) reference to another variable (from a Secret)
   shows nothing: Kubernetes expands it into the env var, not the Deployment (review
   "helm52"). */}}
{{- if and (has (upper .name) (list "HTTPS_PROXY" "HTTP_PROXY" "ALL_PROXY")) (hasKey . "value") (regexMatch "^([A-Za-z][A-Za-z0-9+.-]*://)?[^/@]*@" (toString .value)) (not (regexMatch "^([A-Za-z][A-Za-z0-9+.-]*://)?[^/@:]*:\\$\\([A-Za-z_][A-Za-z0-9_]*\\)@" (toString .value))) }}
{{- fail (printf "%s sets %s with credentials in its URL as a plain value, which the Deployment shows to anyone who may read it: take it from a Secret (valueFrom: {secretKeyRef: {name: ..., key: ...}}), or write the password as $(VAR) of a variable taken from one (its value percent-encoded: @ as %40, : as %3A)" $where .name) }}
{{- end }}
{{- /* A Kafka setting's URL with credentials (an OIDC token endpoint's client id and
   secret), with or without its scheme, likewise (review "secrets55"). */}}
{{- if and (hasPrefix "KAFKA_" (upper .name)) (hasKey . "value") (or (regexMatch "^[A-Za-z][A-Za-z0-9+.-]*://[^/?#@]*@" (toString .value)) (and (hasSuffix "_URL" (upper .name)) (regexMatch "^[^/?#@]*@" (toString .value)))) (not (regexMatch "^([A-Za-z][A-Za-z0-9+.-]*://)?[^/@:]*:\\$\\([A-Za-z_][A-Za-z0-9_]*\\)@" (toString .value))) }}
{{- fail (printf "%s sets %s with credentials in its URL as a plain value, which the Deployment shows to anyone who may read it: take it from a Secret (valueFrom: {secretKeyRef: {name: ..., key: ...}}) or put it in kafka.existingSecret" $where .name) }}
{{- end }}
{{- if and (eq .name "KAFKA_GROUP_INSTANCE_ID") (hasKey . "value") }}
{{- fail (printf "%s sets KAFKA_GROUP_INSTANCE_ID to one value for every pod: each new pod fences the others (a crash loop). Take it from the pod: valueFrom: {fieldRef: {fieldPath: metadata.name}}" $where) }}
{{- end }}
{{- if has .name $owned }}
{{- fail (printf "%s sets %s, which the chart sets from its values: set the chart's value instead (see values.yaml), so the probes, the grace period and the secrets follow it" $where .name) }}
{{- end }}
{{- if hasKey $fromFile .name }}
{{- fail (printf "%s sets %s, but the chart sets %s itself and the worker refuses both: give the secret through %s instead" $where .name (trimSuffix "_FILE" .name) (get $fromFile .name)) }}
{{- end }}
{{- end }}
{{- end }}
{{- /* Each kafka.config key becomes KAFKA_<KEY> in the ConfigMap: never one the chart sets,
   never a secret. */}}
{{- range $key, $_ := $v.kafka.config }}
{{- $name := printf "KAFKA_%s" (upper (replace "." "_" $key)) }}
{{- if has $name $owned }}
{{- fail (printf "kafka.config.%s becomes %s, which the chart sets from its values (kafka.bootstrapServers, kafka.topics, kafka.groupId, kafka.dlqTopic): set that value instead, so KEDA, the alerts and the dashboard follow it" $key $name) }}
{{- end }}
{{- /* What the worker refuses at start (config._passthrough_problem): refused here, at
   install, instead of every pod exiting 2 (review "ops29"). */}}
{{- $k := trimPrefix "topic." (lower $key) }}
{{- $val := lower (trim (toString (index $v.kafka.config $key))) }}
{{- if has (lower $key) (list "topic.isolation.level" "topic.group.protocol") }}
{{- fail (printf "kafka.config.%s is no setting librdkafka has (it is a consumer setting, without topic.): every pod would refuse it; remove it" $key) }}
{{- end }}
{{- if and (eq $k "auto.offset.reset") (not (has $val (list "earliest" "smallest" "beginning"))) }}
{{- fail (printf "kafka.config.%s=%s would skip events (a new partition's first ones, a backlog whose committed offset retention removed); the worker starts where the log starts and refuses it: remove it (to skip a backlog once, reset the group's offsets with kafka-consumer-groups.sh --reset-offsets --to-latest)" $key $val) }}
{{- end }}
{{- if and (eq $k "isolation.level") (ne $val "read_committed") }}
{{- fail (printf "kafka.config.%s=%s would send Userpilot the events of aborted transactions; the worker refuses it: remove it" $key $val) }}
{{- end }}
{{- if and (has $k (list "acks" "request.required.acks")) (not (has $val (list "all" "-1"))) }}
{{- fail (printf "kafka.config.%s=%s would count a dead letter before every in-sync replica has it; the worker commits on the acknowledgement (acks=all) and refuses it: remove it" $key $val) }}
{{- end }}
{{- if has (lower $key) (list "enable.auto.commit" "enable.auto.offset.store" "partition.assignment.strategy" "delivery.report.only.error") }}
{{- fail (printf "kafka.config.%s is managed by the worker itself (at-least-once delivery) and refused: remove it" $key) }}
{{- end }}
{{- if eq $k "transactional.id" }}
{{- fail (printf "kafka.config.%s makes the dead-letter producer transactional, and it writes outside transactions; the worker refuses it: remove it" $key) }}
{{- end }}
{{- if and (eq $k "group.protocol") (ne $val "classic") }}
{{- fail (printf "kafka.config.%s=%s selects the broker-side group protocol (KIP-848), which the worker refuses: remove it" $key $val) }}
{{- end }}
{{- $raw := trim (toString (index $v.kafka.config $key)) }}
{{- if and (eq (lower $key) "group.protocol.type") (ne $raw "consumer") }}
{{- fail (printf "kafka.config.%s=%s is not the consumer-group protocol type the worker reads with (librdkafka takes consumer, in lower case; Kafka Connect's workers use connect), which the worker refuses: remove it" $key $raw) }}
{{- end }}
{{- if eq (lower $key) "group.instance.id" }}
{{- fail "kafka.config.group.instance.id gives every pod the same static member id: each new pod fences the others (\"Static consumer fenced\", exit 1, a crash loop). Give each pod its own through kafka.extraEnv: [{name: KAFKA_GROUP_INSTANCE_ID, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]" }}
{{- end }}
{{- if has (lower $key) $secretKeys }}
{{- fail (printf "kafka.config.%s is a secret: put %s in kafka.existingSecret, or in kafka.extraEnv with valueFrom.secretKeyRef, instead of a ConfigMap" $key $name) }}
{{- end }}
{{- if and (eq $k "queue.buffering.max.kbytes") (regexMatch "^[+-]?[0-9]+$" $val) (lt (atoi (trimPrefix "+" $val)) 16) }}
{{- fail (printf "kafka.config.%s=%s is below 16: the dead-letter producer's queue must hold a dead letter of 16384 bytes; the worker refuses it: use at least 16 (or remove it)" $key $val) }}
{{- end }}
{{- if and (eq $k "message.max.bytes") (regexMatch "^[+-]?[0-9]+$" $val) (lt (atoi (trimPrefix "+" $val)) 16384) }}
{{- fail (printf "kafka.config.%s=%s is below 16384: a dead letter without its value still carries up to ~5 KB of the worker's headers, and one the producer refuses stops its partition for good; the worker refuses it: use at least 16384 (or remove it)" $key $val) }}
{{- end }}
{{- /* Java clients' settings: librdkafka reads none of them and the worker refuses each
   (config.py's _JAVA_ONLY); a JAAS line and a truststore password hold secrets, which
   the ConfigMap would keep in clear for nothing (review "chart42"). */}}
{{- if eq (lower $key) "sasl.jaas.config" }}
{{- fail (printf "kafka.config.%s is Java's JAAS configuration, which librdkafka does not read (and its password would be stored in the ConfigMap): set kafka.config.sasl.mechanism, and KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD in kafka.existingSecret, instead" $key) }}
{{- end }}
{{- if has (lower $key) (list "ssl.truststore.location" "ssl.truststore.password" "ssl.truststore.type") }}
{{- fail (printf "kafka.config.%s is a Java truststore setting, which librdkafka does not read (a truststore password would be stored in the ConfigMap): give the brokers' CA as a PEM file in kafka.config.ssl.ca.location instead" $key) }}
{{- end }}
{{- /* A URL with user info (an OIDC token endpoint's client id and secret): the worker
   masks it as a secret, the ConfigMap would hold it in clear (review "secrets34"). */}}
{{- /* Also a `*.url` setting written without a scheme (`cid:secret@idp/token`, which the
   worker reads as http:// and masks as a secret; review "secrets55"). */}}
{{- if or (regexMatch "^[a-z][a-z0-9+.-]*://[^/?#@]*@" $val) (and (hasSuffix ".url" (lower $key)) (regexMatch "^[^/?#@]*@" $val)) }}
{{- fail (printf "kafka.config.%s holds credentials in its URL (user:password@), which would be stored in the ConfigMap: put %s in kafka.existingSecret or kafka.extraEnv instead" $key $name) }}
{{- end }}
{{- end }}
{{- range $where, $monitor := dict "serviceMonitor" $v.serviceMonitor "kafkaExporter.serviceMonitor" $v.kafkaExporter.serviceMonitor }}
{{- if $monitor.enabled }}
{{- $interval := include "userpilot-worker.durationMs" $monitor.interval | int64 }}
{{- $timeout := include "userpilot-worker.durationMs" $monitor.scrapeTimeout | int64 }}
{{- if gt $timeout $interval }}
{{- fail (printf "%s.scrapeTimeout (%s) is longer than %s.interval (%s): prometheus-operator skips such a ServiceMonitor, so nothing is scraped and every alert is blind; set a timeout no longer than the interval" $where $monitor.scrapeTimeout $where $monitor.interval) }}
{{- end }}
{{- end }}
{{- end }}
{{- if $v.serviceMonitor.enabled }}
{{- $interval := include "userpilot-worker.durationMs" $v.serviceMonitor.interval | int64 }}
{{- if lt (mul (int64 $v.worker.dlqGuard.holdSeconds) 1000) (mul 2 $interval) }}
{{- fail (printf "worker.dlqGuard.holdSeconds (%d) is shorter than two serviceMonitor.interval (%s): a tripped DLQ guard's pod may exit before Prometheus scrapes the trip, and its alert never fires; raise holdSeconds to at least two intervals" (int64 $v.worker.dlqGuard.holdSeconds) $v.serviceMonitor.interval) }}
{{- end }}
{{- end }}
{{- if and $v.redis.existingSecret $v.redis.url }}
{{- fail "redis.url and redis.existingSecret are both set: the URL in existingSecret is used and redis.url (with any password in it) would be ignored; keep one" }}
{{- end }}
{{- if and $v.userpilot.existingSecret $v.userpilot.apiKey }}
{{- fail "userpilot.apiKey and userpilot.existingSecret are both set: the token in existingSecret is used and userpilot.apiKey would be ignored; keep one" }}
{{- end }}
{{- if and $v.redis.tlsCaSecret (not $v.redis.url) (not $v.redis.existingSecret) }}
{{- fail "redis.tlsCaSecret is set but no Redis is (redis.url or redis.existingSecret): set the rediss:// URL it is for, or remove it" }}
{{- end }}
{{- if and $v.redis.tlsCaSecret $v.redis.url (not (hasPrefix "rediss://" $v.redis.url)) }}
{{- fail "redis.tlsCaSecret needs a rediss:// redis.url (TLS): the worker refuses a CA bundle for plain redis://" }}
{{- end }}
{{- if and $v.prometheusRule.enabled (not $v.serviceMonitor.enabled) (not $v.prometheusRule.job) }}
{{- fail "prometheusRule.enabled without serviceMonitor.enabled: set prometheusRule.job to the job label your Prometheus gives the workers' targets (without the ServiceMonitor no target has the chart's job, and UserpilotWorkersDown would fire for ever)" }}
{{- end }}
{{- if regexMatch "^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@" $v.schemaRegistry.url }}
{{- fail "schemaRegistry.url holds credentials (user:password@), which would be stored in the ConfigMap: put them in schemaRegistry.existingSecret (recommended) or schemaRegistry.basicAuthUserInfo and give the URL without them" }}
{{- end }}
{{- /* The chart's own labels (the Deployment's selector among them): set again, the pods
     no longer matched their Deployment's selector, which the API server refuses, or a
     label was written twice (review helm24). */}}
{{- $chartLabels := list "app.kubernetes.io/name" "app.kubernetes.io/instance" "app.kubernetes.io/version" "app.kubernetes.io/managed-by" "app.kubernetes.io/component" "helm.sh/chart" }}
{{- range $where, $labels := dict "commonLabels" $v.commonLabels "podLabels" $v.podLabels }}
{{- range $key, $_ := $labels }}
{{- if has $key $chartLabels }}
{{- fail (printf "%s sets %s, a label the chart sets itself (the Deployment selects its pods by it): choose another key" $where $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $key, $_ := $v.podLabels }}
{{- if hasKey $v.commonLabels $key }}
{{- fail (printf "podLabels and commonLabels both set %s: set it in one of them" $key) }}
{{- end }}
{{- end }}
{{- if not $v.kafka.topics }}
{{- fail "kafka.topics must list at least one source topic" }}
{{- end }}
{{- /* As the worker reads USERPILOT_CONSENT_CATEGORIES (config._consent_categories): any
   case, "none" or "off" alone turns gating off. A typo otherwise renders pods that exit 2. */}}
{{- $categories := list "analytics" "marketing" "functional" "advertising" "personalization" "essential" }}
{{- $consent := list }}
{{- range $v.userpilot.consentCategories }}
{{- $consent = append $consent (lower (trim .)) }}
{{- end }}
{{- range $consent }}
{{- if has . (list "none" "off") }}
{{- if gt (len (uniq $consent)) 1 }}
{{- fail (printf "userpilot.consentCategories mixes %q with categories: %q alone disables consent gating" . .) }}
{{- end }}
{{- else if not (has . $categories) }}
{{- fail (printf "userpilot.consentCategories has %q, not a Signal consent category: use %s, or none to disable consent gating" . (join ", " $categories)) }}
{{- end }}
{{- end }}
{{- /* As the worker refuses them (config.KAFKA_INTERNAL_TOPICS): rendered, every pod exited 2
     (review ops35). */}}
{{- $internal := list "__consumer_offsets" "__transaction_state" "__cluster_metadata" "__share_group_state" }}
{{- range $v.kafka.topics }}
{{- if has . $internal }}
{{- fail (printf "kafka.topics has %s, one of Kafka's own internal topics: name the topic Signal's events are on" .) }}
{{- end }}
{{- end }}
{{- if and $v.kafka.dlqTopic (has $v.kafka.dlqTopic $internal) }}
{{- fail (printf "kafka.dlqTopic (%s) is one of Kafka's own internal topics: name a topic of its own for dead letters" $v.kafka.dlqTopic) }}
{{- end }}
{{- if and $v.schemaRegistry.existingSecret $v.schemaRegistry.basicAuthUserInfo }}
{{- fail "schemaRegistry.basicAuthUserInfo and schemaRegistry.existingSecret are both set: the credentials in existingSecret are used and basicAuthUserInfo would be ignored; keep one" }}
{{- end }}
{{- /* Not quoted: a secret. The worker refuses one without a colon (exit 2 in every pod,
   review "helm52"). */}}
{{- if and $v.schemaRegistry.basicAuthUserInfo (not (contains ":" (toString $v.schemaRegistry.basicAuthUserInfo))) }}
{{- fail "schemaRegistry.basicAuthUserInfo must be user:password (the worker refuses it without the colon)" }}
{{- end }}
{{- /* A $(VAR) reference in a value the chart keeps in its Secret is never expanded:
   Kubernetes expands them in an env var's `value` only. The worker got the text itself, and
   Redis refused its password: a crash loop (review "helm52"). Not quoted: secrets. */}}
{{- /* Not the registry's credentials, which have no escape: a password may hold "$(" (the
   worker and NOTES.txt note it; review "whole52"). */}}
{{- range $name, $value := dict "redis.url" $v.redis.url "userpilot.apiKey" $v.userpilot.apiKey }}
{{- /* As the worker reads a reference: `$(` then a variable's name then `)` (a password
   holding `k3$(Qz!` is no reference; review "compat52"). */}}
{{- if regexMatch "\\$\\([A-Za-z_][A-Za-z0-9_]*\\)" (toString $value) }}
{{- fail (printf "%s holds a $(...) reference: the chart keeps %s in a Secret, where Kubernetes expands no variable, and the worker refuses the text. Give the value itself%s" $name $name (ternary " (a $ that the password really holds written %24)" "" (eq $name "redis.url"))) }}
{{- end }}
{{- end }}
{{- /* The token as the worker refuses it (`config._check_api_key`): rendered, every pod
   exited 2 (review "config53"). Never quoted: a secret. */}}
{{- with $v.userpilot.apiKey }}
{{- $key := trim (toString .) }}
{{- if regexMatch "(?i)^token\\s" $key }}
{{- fail "userpilot.apiKey starts with 'Token ': enter the token alone; the worker adds the 'Token' prefix to the Authorization header itself" }}
{{- else if regexMatch "^(\"[\\s\\S]*\"|'[\\s\\S]*'|`[\\s\\S]*`)$" $key }}
{{- fail "userpilot.apiKey is wrapped in quotes, which would be sent as part of the token: remove them" }}
{{- else if regexMatch "[\\s\\x00-\\x1f\\x7f]" $key }}
{{- fail "userpilot.apiKey contains spaces or control characters: paste the token alone" }}
{{- else if regexMatch "[^\\x00-\\x7f]" $key }}
{{- fail "userpilot.apiKey contains non-ASCII characters, which cannot be sent in an HTTP header (often a smart quote or a non-breaking space pasted with it): paste the token alone" }}
{{- else if gt (len $key) 1024 }}
{{- fail "userpilot.apiKey is longer than any token (at most 1024 characters): paste the token alone" }}
{{- end }}
{{- end }}
{{- /* As the worker refuses them (config "config40"; the chart's guard, review config41):
     the dead-letter topic the worker will use, kafka.dlqTopic or its default. */}}
{{- $dlq := $v.kafka.dlqTopic | default (printf "%s.userpilot.dlq" (first $v.kafka.topics)) }}
{{- if and $v.kafka.dlqTopic (has $v.kafka.dlqTopic $v.kafka.topics) }}
{{- fail (printf "kafka.dlqTopic (%s) is also a source topic: dead letters would be read back and sent again; name another topic" $v.kafka.dlqTopic) }}
{{- else if has $dlq $v.kafka.topics }}
{{- /* The default's too: it rendered, and every pod exited 2 (review "config53"). */}}
{{- fail (printf "the default dead-letter topic %s (the first topic's name + .userpilot.dlq) is also a source topic: dead letters would be read back and sent again; set kafka.dlqTopic to another topic" $dlq) }}
{{- end }}
{{- if gt (len $dlq) 249 }}
{{- fail (printf "the default dead-letter topic %s is longer than Kafka's 249 characters: set kafka.dlqTopic" $dlq) }}
{{- end }}
{{- range $v.kafka.topics }}
{{- if and (ne . $dlq) (eq (replace "." "_" .) (replace "." "_" $dlq)) }}
{{- fail (printf "the dead-letter topic %s differs from the source topic %s only by '.' against '_', which Kafka refuses as a colliding topic name (no dead letter could be written): set kafka.dlqTopic to another topic" $dlq .) }}
{{- end }}
{{- end }}
{{- /* Last, so the other guards name their own mistake first. */}}
{{- if and (not $v.userpilot.apiKey) (not $v.userpilot.existingSecret) }}
{{- fail "userpilot.existingSecret (recommended) or userpilot.apiKey is required: the worker cannot start without the Userpilot write token" }}
{{- end }}
{{- end }}

{{/*
files/alerts.yaml or files/dashboard.json with this release's values in place of the
defaults they are written with; docker-compose and promtool load the files as they are.
Call with (dict "file" "files/alerts.yaml" "ctx" $).
*/}}
{{- define "userpilot-worker.monitoringFile" -}}
{{- $ctx := .ctx -}}
{{- $text := $ctx.Files.Get .file -}}
{{- $base := trimSuffix "/" $ctx.Values.runbookBaseUrl -}}
{{- $group := $ctx.Values.kafka.groupId -}}
{{- $text = replace "https://github.com/signal/userpilot-worker/blob/main/README.md" $base $text -}}
{{- /* The broker-side lag: the group, and where several clusters' exporters reach one
     Prometheus, which of them (prometheusRule.kafkaLagMatchers; by default the namespace
     of the exporter this chart's ServiceMonitor scrapes): a group name shared by releases
     on different clusters crossed them (review diff24b). The alert and the dashboard's
     lag panels alike (review diff24c). */ -}}
{{- $exporter := $ctx.Values.kafkaExporter.serviceMonitor -}}
{{- $extra := "" -}}
{{- if $ctx.Values.prometheusRule.kafkaLagMatchers -}}
{{- $extra = printf ",%s" (trim $ctx.Values.prometheusRule.kafkaLagMatchers) -}}
{{- else if $exporter.enabled -}}
{{- $extra = printf ",namespace=%s" (toJson (default $ctx.Release.Namespace $exporter.namespace)) -}}
{{- end -}}
{{- if hasSuffix ".json" .file -}}
{{- $text = replace "\"query\": \"userpilot-delivery\"" (printf "\"query\": %s" (toJson $group)) $text -}}
{{- $text = replace "\"text\": \"userpilot-delivery\"" (printf "\"text\": %s" (toJson $group)) $text -}}
{{- $text = replace "\"value\": \"userpilot-delivery\"" (printf "\"value\": %s" (toJson $group)) $text -}}
{{- /* Inside a JSON string: the matchers JSON-escaped, without toJson's outer quotes. */ -}}
{{- $text = replace "kafka_consumergroup_lag{consumergroup=\\\"$consumergroup\\\"" (printf "kafka_consumergroup_lag{consumergroup=\\\"$consumergroup\\\"%s" (toJson $extra | trimPrefix "\"" | trimSuffix "\"")) $text -}}
{{- else -}}
{{- /* The alert: the release's own topics only. The group's commits on a topic it no longer
     reads stay for the brokers' offsets retention (7 days), and kafka_exporter reports them:
     the old topic's growing lag paged while the workers' only topic was at 0 (review
     "dash55"). Not the dashboard: its topic variable reads the workers' series. */ -}}
{{- $topics := list -}}
{{- range $ctx.Values.kafka.topics -}}
{{- $topics = append $topics (regexQuoteMeta (toString .)) -}}
{{- end -}}
{{- if $topics -}}
{{- $extra = printf "%s,topic=~%s" $extra (toJson (join "|" $topics)) -}}
{{- end -}}
{{- $text = replace "consumergroup=\"userpilot-delivery\"" (printf "consumergroup=%s%s" (toJson $group) $extra) $text -}}
{{- /* Every worker series of this release's namespace only: a central Prometheus loading
     the rules of releases in several namespaces evaluated each release's rules on all of
     them (the lag alert's fallback paged twice, review helm24), and absent() sees one
     namespace without targets only when it names that namespace. */ -}}
{{- $ns := toJson $ctx.Release.Namespace -}}
{{- $job := toJson ($ctx.Values.prometheusRule.job | default (include "userpilot-worker.name" $ctx)) -}}
{{- $text = replace "up{job=\"userpilot-worker\"}" (printf "up{job=%s,namespace=%s}" $job $ns) $text -}}
{{- $text = regexReplaceAll "(userpilot_[a-z_]+)\\{" $text (printf "${1}{namespace=%s," $ns) -}}
{{- $text = regexReplaceAll "(userpilot_[a-z_]+)(\\[|\\)| ==| offset )" $text (printf "${1}{namespace=%s}${2}" $ns) -}}
{{- end -}}
{{- $text -}}
{{- end }}

{{/*
A value as the worker reads it: whole numbers without an exponent or a fraction
(52428800, not 5.24288e+07; Helm reads every YAML number as a float), other numbers as
written (0.5 stays 0.5, never truncated), anything else as its string.
*/}}
{{- define "userpilot-worker.plain" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) -}}
{{- int64 . | toString -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end }}


{{/*
A Prometheus duration ("30s", "1m30s", "500ms") in milliseconds, for the checks above.
*/}}
{{- define "userpilot-worker.durationMs" -}}
{{- $total := 0 -}}
{{- range regexFindAll "[0-9]+(ms|s|m|h)" (toString .) -1 -}}
{{- $n := regexFind "^[0-9]+" . | int64 -}}
{{- $unit := regexFind "(ms|s|m|h)$" . -}}
{{- $total = add $total (mul $n (get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit)) -}}
{{- end -}}
{{- $total -}}
{{- end -}}
