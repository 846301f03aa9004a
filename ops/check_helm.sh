#!/usr/bin/env bash
# Offline checks of the userpilot-worker Helm chart, runnable on a fresh machine:
#   1. installs a pinned helm with `go install` when none is cached (no other downloads);
#   2. `helm lint --strict` and `helm template` for the default values, ops/helm-values-full.yaml
#      (every feature on) and a few focused variants;
#   3. asserts the combinations the chart must refuse do fail, for the stated reason;
#   4. validates every rendered manifest against the Kubernetes OpenAPI schemas with
#      kubernetes-validate (CRD kinds are checked structurally instead) and checks the
#      chart's own promises (security context, probes, env names the worker reads, ...).
# Exit status is non-zero on any failure. Env: HELM_VERSION, KUBE_VERSION, PYTHON, HELM.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="$ROOT/helm/userpilot-worker"
FULL_VALUES="$ROOT/ops/helm-values-full.yaml"
HELM_VERSION="${HELM_VERSION:-v3.19.5}"
# Version helm renders for (.Capabilities) and the schemas validated against: the chart's
# minimum and the newest kubernetes-validate knows.
KUBE_VERSION="${KUBE_VERSION:-1.33.0}"
SCHEMA_VERSIONS="${SCHEMA_VERSIONS:-1.25.0 latest}"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/userpilot-worker"
BIN_DIR="$CACHE_DIR/bin"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

log() { printf '==> %s\n' "$*"; }
die() { printf 'check_helm: FAIL: %s\n' "$*" >&2; exit 1; }

ensure_helm() {
  if [[ -n "${HELM:-}" ]]; then
    [[ -x "$HELM" ]] || die "HELM=$HELM is not executable"
    return
  fi
  local cached="$BIN_DIR/helm-$HELM_VERSION"
  if [[ -x "$cached" ]]; then
    HELM="$cached"
    return
  fi
  command -v go >/dev/null 2>&1 || die "helm $HELM_VERSION is not cached and Go is not installed"
  log "installing helm $HELM_VERSION with go install (cold: a few minutes)"
  local start=$SECONDS tmp
  mkdir -p "$BIN_DIR"
  tmp="$(mktemp -d "$BIN_DIR/.install.XXXXXX")"
  # The version ldflag only makes `helm version` honest; the build is otherwise upstream's.
  GOBIN="$tmp" GOFLAGS=-modcacherw go install \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" || { rm -rf "$tmp"; die "go install of helm failed"; }
  mv "$tmp/helm" "$cached"
  rm -rf "$tmp"
  ln -sf "helm-$HELM_VERSION" "$BIN_DIR/helm"
  log "helm installed in $((SECONDS - start))s: $cached"
  HELM="$cached"
}

[[ -x "$PYTHON" ]] || die "no Python at $PYTHON (create the venv: pip install -e '.[dev]')"
"$PYTHON" -c 'import kubernetes_validate, yaml' 2>/dev/null \
  || die "$PYTHON lacks kubernetes-validate/PyYAML (pip install -e '.[dev]')"
for f in files/dashboard.json files/alerts.yaml; do
  [[ -f "$CHART/$f" ]] || die "the chart needs $f"
done
ensure_helm
log "$("$HELM" version --short) (kube $KUBE_VERSION)"

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
RELEASE=upw
# The chart refuses to render without a token (checked below); renders get a placeholder.
# The endpoint has no default (an EU account's events would go to the US host): renders
# start from a base naming one, each variant's values on top of it (a file, not --set, which
# would beat a variant's own endpoint; review "whole52").
cat >"$OUT/base.values.yaml" <<'EOF'
userpilot: {analyticsEndpoint: analytex.userpilot.io}
EOF
TOKEN=(-f "$OUT/base.values.yaml" --set userpilot.apiKey=test-write-token)

# Variant values used below, each as a small file so the intent is readable.
cat >"$OUT/hpa.values.yaml" <<'EOF'
autoscaling:
  hpa: {enabled: true, minReplicas: 2, maxReplicas: 6, targetMemoryUtilizationPercentage: 80}
EOF
cat >"$OUT/single.values.yaml" <<'EOF'
replicaCount: 1
userpilot: {apiKey: "test-write-token", mappings: '{"preset": "none", "events": {"Feature Used": "feature_used"}}'}
schemaRegistry: {basicAuthUserInfo: "user:secret"}
kafka: {config: {security.protocol: SASL_SSL, sasl.mechanism: PLAIN}, existingSecret: kafka-credentials}
EOF
cat >"$OUT/keda-no-auth.values.yaml" <<'EOF'
autoscaling: {keda: {enabled: true}}
kafka: {config: {security.protocol: sasl_ssl, sasl.mechanism: PLAIN}, existingSecret: kafka-credentials}
EOF
cat >"$OUT/keda-latest.values.yaml" <<'EOF'
autoscaling: {keda: {enabled: true, offsetResetPolicy: latest}}
EOF
cat >"$OUT/keda-sasl-meta-only.values.yaml" <<'EOF'
autoscaling: {keda: {enabled: true, extraMetadata: {sasl: plaintext, tls: enable}}}
kafka: {config: {security.protocol: SASL_SSL, sasl.mechanism: PLAIN}, existingSecret: kafka-credentials}
EOF
cat >"$OUT/keda-owned-key.values.yaml" <<'EOF'
autoscaling: {keda: {enabled: true, extraMetadata: {consumerGroup: other-group}}}
EOF
cat >"$OUT/keda-ssl-tls-disable.values.yaml" <<'EOF'
autoscaling: {keda: {enabled: true, extraMetadata: {tls: disable}}}
kafka: {config: {security.protocol: SSL}}
EOF
cat >"$OUT/keda-protocol-in-env.values.yaml" <<'EOF'
autoscaling: {keda: {enabled: true}}
kafka: {extraEnv: [{name: KAFKA_SECURITY_PROTOCOL, value: sasl_ssl}], existingSecret: kafka-credentials}
EOF
cat >"$OUT/keda-group-from-env.values.yaml" <<'EOF'
autoscaling: {keda: {enabled: true, extraMetadata: {consumerGroupFromEnv: OTHER_GROUP}}}
EOF
cat >"$OUT/keda-idle-key.values.yaml" <<'EOF'
autoscaling: {keda: {enabled: true, extraMetadata: {allowIdleConsumers: "true"}}}
EOF
cat >"$OUT/keda-valued-key.values.yaml" <<'EOF'
autoscaling: {keda: {enabled: true, extraMetadata: {lagThreshold: "10"}}}
EOF
cat >"$OUT/insecure-userpilot.values.yaml" <<'EOF'
userpilot: {apiKey: "test-write-token", insecureHttp: true, analyticsEndpoint: " Analytex-EU.userpilot.io:80 "}
EOF
cat >"$OUT/no-endpoint.values.yaml" <<'EOF'
userpilot: {apiKey: "test-write-token", analyticsEndpoint: ""}
EOF
cat >"$OUT/bootstrap-prefix.values.yaml" <<'EOF'
kafka: {bootstrapServers: "b1:9093, SASL_SSL://b2:9096"}
EOF
cat >"$OUT/keda-mtls.values.yaml" <<'EOF'
autoscaling: {keda: {enabled: true, extraMetadata: {tls: enable}}}
kafka: {config: {security.protocol: SSL, ssl.certificate.location: /etc/kafka/tls/client.crt, ssl.key.location: /etc/kafka/tls/client.key}}
EOF
cat >"$OUT/keda-mtls-env.values.yaml" <<'EOF'
autoscaling: {keda: {enabled: true, extraMetadata: {tls: enable}}}
extraEnv:
  - {name: KAFKA_SECURITY_PROTOCOL, value: SSL}
  - {name: KAFKA_SSL_CERTIFICATE_LOCATION, value: /etc/kafka/tls/client.crt}
EOF
cat >"$OUT/keda-private-ca.values.yaml" <<'EOF'
autoscaling: {keda: {enabled: true, extraMetadata: {tls: enable}}}
kafka: {config: {security.protocol: SSL, ssl.ca.location: /etc/kafka/tls/ca.crt}}
EOF
cat >"$OUT/redis-url-ref.values.yaml" <<'EOF'
redis: {url: "redis://:$(REDIS_PASSWORD)@redis:6379/0"}
EOF
cat >"$OUT/registry-no-colon.values.yaml" <<'EOF'
schemaRegistry: {basicAuthUserInfo: "HUNTER2"}
EOF
cat >"$OUT/proxy-ref-after.values.yaml" <<'EOF'
extraEnv:
  - {name: HTTPS_PROXY, value: "http://svc:$(PROXY_PASSWORD)@proxy.corp:3128"}
  - {name: PROXY_PASSWORD, valueFrom: {secretKeyRef: {name: egress-proxy, key: password}}}
EOF
cat >"$OUT/listener-prefix.values.yaml" <<'EOF'
kafka: {bootstrapServers: "INTERNAL://kafka:9092"}
EOF
cat >"$OUT/both-autoscalers.values.yaml" <<'EOF'
autoscaling: {keda: {enabled: true}, hpa: {enabled: true}}
EOF
cat >"$OUT/keda-too-many.values.yaml" <<'EOF'
autoscaling: {partitions: 6, keda: {enabled: true, maxReplicaCount: 7}}
EOF
cat >"$OUT/hpa-too-many.values.yaml" <<'EOF'
autoscaling: {partitions: 4, hpa: {enabled: true, maxReplicas: 5}}
EOF
cat >"$OUT/replicas-too-many.values.yaml" <<'EOF'
replicaCount: 13
EOF
cat >"$OUT/grace-equal.values.yaml" <<'EOF'
terminationGracePeriodSeconds: 25
EOF
cat >"$OUT/grace-short.values.yaml" <<'EOF'
terminationGracePeriodSeconds: 30
worker: {shutdownGraceSeconds: 40}
EOF
cat >"$OUT/grace-thin.values.yaml" <<'EOF'
terminationGracePeriodSeconds: 30
EOF
cat >"$OUT/owned-env.values.yaml" <<'EOF'
extraEnv: [{name: WORKER_METRICS_PORT, value: "9000"}]
EOF
cat >"$OUT/owned-kafka-env.values.yaml" <<'EOF'
kafka: {extraEnv: [{name: KAFKA_TOPICS, value: "other"}]}
EOF
cat >"$OUT/owned-kafka-config.values.yaml" <<'EOF'
kafka: {config: {group.id: other-group}}
EOF
cat >"$OUT/broker-list-config.values.yaml" <<'EOF'
kafka: {config: {metadata.broker.list: "other:9092"}}
EOF
cat >"$OUT/token-file.values.yaml" <<'EOF'
extraEnv: [{name: USERPILOT_API_KEY_FILE, value: /secrets/token}]
EOF
cat >"$OUT/registry-file.values.yaml" <<'EOF'
schemaRegistry: {existingSecret: registry-auth}
extraEnv: [{name: SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE, value: /secrets/auth}]
EOF
cat >"$OUT/redis-ca-plain.values.yaml" <<'EOF'
redis: {url: "redis://redis:6379/0", tlsCaSecret: redis-ca}
EOF
cat >"$OUT/scrape-timeout-long.values.yaml" <<'EOF'
serviceMonitor: {enabled: true, interval: 5s, scrapeTimeout: 10s}
EOF
cat >"$OUT/exporter-timeout-long.values.yaml" <<'EOF'
kafkaExporter:
  serviceMonitor: {enabled: true, selector: {app: kafka-exporter}, interval: 1m, scrapeTimeout: 1m500ms}
EOF
cat >"$OUT/hold-short.values.yaml" <<'EOF'
serviceMonitor: {enabled: true, interval: 2m}
worker: {dlqGuard: {holdSeconds: 200}}
EOF
cat >"$OUT/redis-twice.values.yaml" <<'EOF'
redis: {url: "redis://:pw@redis:6379/0", existingSecret: redis-url}
EOF
cat >"$OUT/token-twice.values.yaml" <<'EOF'
userpilot: {apiKey: t2, existingSecret: upw-token}
EOF
cat >"$OUT/redis-ca-alone.values.yaml" <<'EOF'
redis: {tlsCaSecret: redis-ca}
EOF
cat >"$OUT/pdb-zero.values.yaml" <<'EOF'
podDisruptionBudget: {maxUnavailable: 0}
EOF
cat >"$OUT/request-timeout-tiny.values.yaml" <<'EOF'
userpilot: {requestTimeoutSeconds: 1.0e-300}
EOF
cat >"$OUT/dlq-is-source.values.yaml" <<'EOF'
kafka: {topics: [events, more], dlqTopic: more}
EOF
cat >"$OUT/dlq-default-is-source.values.yaml" <<'EOF'
kafka: {topics: [events, events.userpilot.dlq]}
EOF
cat >"$OUT/dlq-collides.values.yaml" <<'EOF'
kafka: {topics: [events.in], dlqTopic: events_in}
EOF
cat >"$OUT/dlq-default-collides.values.yaml" <<'EOF'
kafka: {topics: [events, events_userpilot_dlq]}
EOF
cat >"$OUT/internal-source.values.yaml" <<'EOF'
kafka: {topics: [events, __consumer_offsets]}
EOF
cat >"$OUT/internal-dlq.values.yaml" <<'EOF'
kafka: {topics: [events], dlqTopic: __transaction_state}
EOF
cat >"$OUT/registry-twice.values.yaml" <<'EOF'
schemaRegistry: {existingSecret: sr-creds, basicAuthUserInfo: "user:pw"}
EOF
cat >"$OUT/consent-typo.values.yaml" <<'EOF'
userpilot: {consentCategories: [analytic]}
EOF
cat >"$OUT/consent-mixed.values.yaml" <<'EOF'
userpilot: {consentCategories: [analytics, none]}
EOF
cat >"$OUT/liveness-success.values.yaml" <<'EOF'
livenessProbe: {successThreshold: 2}
EOF
cat >"$OUT/secret-in-config.values.yaml" <<'EOF'
kafka: {config: {sasl.password: hunter2}}
EOF
cat >"$OUT/secret-in-extra-env.values.yaml" <<'EOF'
kafka: {extraEnv: [{name: KAFKA_SASL_PASSWORD, value: HUNTER2}]}
EOF
cat >"$OUT/secret-mixed-case.values.yaml" <<'EOF'
extraEnv: [{name: Kafka_Sasl_Password, value: HUNTER2}]
EOF
cat >"$OUT/proxy-password.values.yaml" <<'EOF'
extraEnv: [{name: https_proxy, value: "http://u:HUNTER2@proxy:3128"}]
EOF
cat >"$OUT/proxy-password-no-scheme.values.yaml" <<'EOF'
extraEnv: [{name: HTTP_PROXY, value: "u:HUNTER2@proxy:3128"}]
EOF
cat >"$OUT/proxy-key-as-user.values.yaml" <<'EOF'
extraEnv: [{name: ALL_PROXY, value: "http://PROXYKEY-HUNTER2@proxy.corp:3128"}]
EOF
cat >"$OUT/proxy-no-password.values.yaml" <<'EOF'
extraEnv: [{name: HTTPS_PROXY, value: "http://proxy.corp:3128"}, {name: NO_PROXY, value: "kafka,registry"}]
EOF
cat >"$OUT/small-queue.values.yaml" <<'EOF'
kafka: {config: {queue.buffering.max.kbytes: "4"}}
EOF
cat >"$OUT/small-message-max.values.yaml" <<'EOF'
kafka: {config: {topic.message.max.bytes: 1000}}
EOF
cat >"$OUT/jaas-in-config.values.yaml" <<'EOF'
kafka: {config: {sasl.jaas.config: "org.apache.kafka.common.security.plain.PlainLoginModule required username=\"svc\" password=\"HUNTER2\";"}}
EOF
cat >"$OUT/truststore-in-config.values.yaml" <<'EOF'
kafka: {config: {ssl.truststore.password: HUNTER2}}
EOF
cat >"$OUT/url-secret-in-config.values.yaml" <<'EOF'
kafka: {config: {sasl.oauthbearer.token.endpoint.url: "https://cid:HUNTER2pw@idp.example/token"}}
EOF
cat >"$OUT/url-secret-no-scheme-in-config.values.yaml" <<'EOF'
kafka: {config: {sasl.oauthbearer.token.endpoint.url: "cid:HUNTER2pw@idp.example:8443/token"}}
EOF
cat >"$OUT/url-secret-in-kafka-env.values.yaml" <<'EOF'
kafka: {extraEnv: [{name: KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL, value: "https://cid:HUNTER2pw@idp.example/token"}]}
EOF
cat >"$OUT/url-secret-no-scheme-in-env.values.yaml" <<'EOF'
extraEnv: [{name: KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL, value: "cid:HUNTER2pw@idp.example/token"}]
EOF
cat >"$OUT/bad-schema.values.yaml" <<'EOF'
userpilot: {consentMissing: maybe}
EOF
cat >"$OUT/unknown-value.values.yaml" <<'EOF'
replicas: 3
EOF
cat >"$OUT/no-token.values.yaml" <<'EOF'
userpilot: {apiKey: "", existingSecret: ""}
EOF
cat >"$OUT/static-member.values.yaml" <<'EOF'
kafka: {config: {group.instance.id: upw-static}}
EOF
cat >"$OUT/offset-latest.values.yaml" <<'EOF'
kafka: {config: {auto.offset.reset: latest}}
EOF
cat >"$OUT/auto-commit.values.yaml" <<'EOF'
kafka: {config: {enable.auto.commit: "true"}}
EOF
cat >"$OUT/acks-one.values.yaml" <<'EOF'
kafka: {config: {topic.acks: 1}}
EOF
cat >"$OUT/read-uncommitted.values.yaml" <<'EOF'
kafka: {config: {isolation.level: read_uncommitted}}
EOF
cat >"$OUT/kafka-url.values.yaml" <<'EOF'
kafka: {bootstrapServers: "kafka://kafka:9092"}
EOF
cat >"$OUT/topic-isolation.values.yaml" <<'EOF'
kafka: {config: {topic.isolation.level: read_committed}}
EOF
cat >"$OUT/static-member-env.values.yaml" <<'EOF'
kafka: {extraEnv: [{name: KAFKA_GROUP_INSTANCE_ID, value: upw-static}]}
EOF
cat >"$OUT/registry-url-creds.values.yaml" <<'EOF'
schemaRegistry: {url: "https://sruser:srpass@sr.example.com"}
EOF
cat >"$OUT/rule-without-monitor.values.yaml" <<'EOF'
prometheusRule: {enabled: true}
EOF
cat >"$OUT/lag-injection.values.yaml" <<'EOF'
prometheusRule: {kafkaLagMatchers: 'cluster="a\",b="}) or vector(1e9) #"'}
EOF
cat >"$OUT/lag-regex.values.yaml" <<'EOF'
prometheusRule: {enabled: true, kafkaLagMatchers: 'cluster=~"eu-\\d+", env=''prod'''}
serviceMonitor: {enabled: true}
EOF
cat >"$OUT/selector-label.values.yaml" <<'EOF'
podLabels: {app.kubernetes.io/name: mine}
EOF
cat >"$OUT/label-twice.values.yaml" <<'EOF'
commonLabels: {team: growth}
podLabels: {team: other}
EOF

# The placeholder token, unless the values name userpilot.existingSecret (the full values
# do): the chart refuses both, one of them ignored.
token_for() { [[ " $* " == *" $FULL_VALUES "* ]] || printf '%s\n' "${TOKEN[@]}"; }

render() { # name, extra helm args...
  local name="$1"; shift
  local token; mapfile -t token < <(token_for "$@")
  "$HELM" template "$RELEASE" "$CHART" --namespace delivery --kube-version "$KUBE_VERSION" \
    "${token[@]}" "$@" \
    >"$OUT/$name.yaml" || die "helm template ($name) failed"
}

log "helm lint --strict (default values, full values)"
"$HELM" lint --strict "$CHART" "${TOKEN[@]}" >/dev/null || die "helm lint (default values) failed"
"$HELM" lint --strict "$CHART" -f "$FULL_VALUES" >/dev/null || die "helm lint (full values) failed"

log "helm template"
render default
render full -f "$FULL_VALUES"
render hpa -f "$OUT/hpa.values.yaml"
render single -f "$OUT/single.values.yaml"
render keda-topics -f "$FULL_VALUES" --set 'kafka.topics={signal.web,signal.ios,signal.android}'
# The protocol of a prefixed broker may come from kafka.existingSecret: the worker checks it.
render prefix-secret --set 'kafka.bootstrapServers=SASL_SSL://b1:9096' \
  --set kafka.existingSecret=kafka-credentials

log "the README's helm install line, exactly as written (as helm template)"
readme_args="$("$PYTHON" - "$ROOT/README.md" <<'PY'
import re, shlex, sys
text = open(sys.argv[1], encoding="utf-8").read()
found = re.search(r"```bash\n(helm install .*?)```", text, re.S)
assert found, "no helm install block in the README"
argv = shlex.split(found.group(1).replace("\\\n", " "))
assert argv[:2] == ["helm", "install"], argv
print("\n".join(argv[2:]))
PY
)" || die "the README's helm install line was not found"
mapfile -t README_ARGS <<<"$readme_args"
(cd "$ROOT" && "$HELM" template "${README_ARGS[@]}" --kube-version "$KUBE_VERSION") \
  >"$OUT/readme.yaml" || die "the README's helm install line does not render"
"$PYTHON" - "$ROOT/README.md" "$OUT/readme.yaml" <<'PY' \
  || die "the README's kubectl create secret line does not name what the chart reads"
import re, shlex, sys
text = open(sys.argv[1], encoding="utf-8").read()
rendered = open(sys.argv[2], encoding="utf-8").read()
line = re.search(r"`(kubectl create secret generic [^`]*)`", text)
assert line, "no kubectl create secret line in the README"
argv = shlex.split(line.group(1))
name = argv[4]
keys = [a.split("=", 2)[1] for a in argv[5:] if a.startswith("--from-literal=")]
ref = re.search(r"name: USERPILOT_API_KEY\n\s+valueFrom:\n\s+secretKeyRef:\n"
                r"\s+name: (\S+)\n\s+key: (\S+)", rendered)
assert ref, "the rendered chart reads no USERPILOT_API_KEY secretKeyRef"
assert (ref.group(1).strip('"'), ref.group(2).strip('"')) in [(name, k) for k in keys], \
    (ref.groups(), name, keys)
PY

log "NOTES.txt renders (helm template skips it: render it through a copy of the chart)"
cp -r "$CHART" "$OUT/notes-chart"
cat >"$OUT/notes-chart/templates/zz-notes.yaml" <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata: {name: notes}
data:
  notes: {{ include (print $.Template.BasePath "/NOTES.txt") . | quote }}
EOF
notes() { # expected fragment, helm args...
  local want="$1" text token; shift
  mapfile -t token < <(token_for "$@")
  text="$("$HELM" template "$RELEASE" "$OUT/notes-chart" --kube-version "$KUBE_VERSION" \
    --show-only templates/zz-notes.yaml "${token[@]}" "$@")" || die "NOTES.txt does not render ($*)"
  grep -qF -- "$want" <<<"$text" || die "NOTES.txt lacks '$want' ($*)"
}
notes "Scaling: KEDA on consumer lag (2..12 replicas" -f "$FULL_VALUES"
notes "WARNING: KEDA without Redis" -f "$FULL_VALUES" --set redis.existingSecret= --set redis.tlsCaSecret=
no_notes() { # unexpected fragment, helm args...
  local unwanted="$1" text token; shift
  mapfile -t token < <(token_for "$@")
  text="$("$HELM" template "$RELEASE" "$OUT/notes-chart" --kube-version "$KUBE_VERSION" \
    --show-only templates/zz-notes.yaml "${token[@]}" "$@")" || die "NOTES.txt does not render ($*)"
  ! grep -qF -- "$unwanted" <<<"$text" || die "NOTES.txt has '$unwanted' ($*)"
}
no_notes "WARNING: KEDA without Redis" -f "$FULL_VALUES"
notes "NOTE: 2 topics: KEDA scales on each topic's lag" -f "$FULL_VALUES" --set 'kafka.topics={a,b}'
no_notes "topics: KEDA scales on each topic's lag" -f "$FULL_VALUES" --set 'kafka.topics={a}'
# The default dead-letter topic follows the first topic (review "multi53").
notes "NOTE: the dead-letter topic is a.userpilot.dlq" -f "$OUT/single.values.yaml" \
  --set 'kafka.topics={a,b}'
no_notes "NOTE: the dead-letter topic is" -f "$OUT/single.values.yaml" --set 'kafka.topics={a,b}' \
  --set kafka.dlqTopic=d
no_notes "NOTE: the dead-letter topic is" -f "$OUT/single.values.yaml" --set 'kafka.topics={a}'
notes "/v1/track (INSECURE: plain http)" -f "$OUT/single.values.yaml" --set userpilot.insecureHttp=true \
  --set userpilot.analyticsEndpoint=sandbox:8080
notes "delivers to http://" -f "$OUT/single.values.yaml" --set userpilot.insecureHttp=true \
  --set userpilot.analyticsEndpoint=sandbox:8080
notes "delivers to https://" -f "$OUT/single.values.yaml"
notes "Scaling: HPA (2..6 replicas)" -f "$OUT/hpa.values.yaml"
# A CA of the workers' own: KEDA checks the brokers against the system's (review diff52a).
notes "WARNING: kafka.config names the brokers' CA" -f "$OUT/base.values.yaml" \
  -f "$OUT/keda-private-ca.values.yaml"
no_notes "WARNING: kafka.config names the brokers' CA" -f "$OUT/base.values.yaml" \
  -f "$OUT/keda-private-ca.values.yaml" --set kafka.config.ssl\\.ca\\.location=probe
no_notes "WARNING: kafka.config names the brokers' CA" -f "$OUT/base.values.yaml" \
  -f "$OUT/keda-private-ca.values.yaml" --set autoscaling.keda.authenticationRef=kafka-auth
no_notes "WARNING: kafka.config names the brokers' CA" -f "$OUT/base.values.yaml" \
  -f "$OUT/keda-private-ca.values.yaml" --set kafka.config.security\\.protocol=PLAINTEXT
# The protocol given in extraEnv counts as the KEDA guards read it (review "whole52").
notes "WARNING: kafka.config names the brokers' CA" -f "$OUT/base.values.yaml" \
  -f "$OUT/keda-private-ca.values.yaml" --set kafka.config.security\\.protocol= \
  --set-json 'extraEnv=[{"name":"KAFKA_SECURITY_PROTOCOL","value":"SSL"}]'
# A registry password may hold "$(": noted, not refused (the worker notes it too).
notes "NOTE: schemaRegistry.basicAuthUserInfo holds" -f "$OUT/single.values.yaml" \
  --set-string 'schemaRegistry.basicAuthUserInfo=svc:Xk$(Zq9)w'

log "invalid combinations must fail"
expect_fail() { # name, expected message fragment
  local name="$1" want="$2" err
  if err="$("$HELM" template "$RELEASE" "$CHART" --kube-version "$KUBE_VERSION" \
      -f "$OUT/base.values.yaml" -f "$OUT/$name.values.yaml" 2>&1 >/dev/null)"; then
    die "$name: rendering succeeded but must fail"
  fi
  grep -qF -- "$want" <<<"$err" || die "$name: failed for another reason: $err"
  printf '    ok  %-20s %s\n' "$name" "$want"
}
# A secret field's refusal by the schema quotes no secret (helm quotes what a `pattern`
# refuses; the chart writes those checks as `not`s; review "diff49b").
expect_secret_unquoted() { # name, values (YAML), secret
  local name="$1" err
  printf '%s\n' "$2" >"$OUT/$name.values.yaml"
  if err="$("$HELM" template "$RELEASE" "$CHART" --kube-version "$KUBE_VERSION" \
      -f "$OUT/base.values.yaml" -f "$OUT/$name.values.yaml" 2>&1 >/dev/null)"; then
    die "$name: rendering succeeded but must fail"
  fi
  if grep -qF -- "$3" <<<"$err"; then die "$name: the refusal quotes the secret: $err"; fi
  printf '    ok  %-20s %s\n' "$name" "refused without quoting it"
}
# Values the worker refuses at start (every pod exit 2), refused at render (review "config53").
expect_refused() { # name, values (YAML), expected message fragment
  printf '%s\n' "$2" >"$OUT/$1.values.yaml"
  expect_fail "$1" "$3"
}
expect_refused token-prefix 'userpilot: {apiKey: "Token abc123"}' "userpilot.apiKey starts with 'Token '"
expect_refused token-quoted "userpilot: {apiKey: \"'abc123'\"}" "userpilot.apiKey is wrapped in quotes"
expect_refused token-space 'userpilot: {apiKey: "abc 123"}' "userpilot.apiKey contains spaces"
expect_refused token-non-ascii 'userpilot: {apiKey: "abc\u00a0123"}' "userpilot.apiKey contains non-ASCII"
expect_refused token-long "userpilot: {apiKey: $(printf 'a%.0s' $(seq 1 1025))}" "userpilot.apiKey is longer than any token"
expect_refused report-only-error 'kafka: {config: {delivery.report.only.error: true}}' "kafka.config.delivery.report.only.error is managed by the worker itself"
expect_refused protocol-type 'kafka: {config: {group.protocol.type: connect}}' "kafka.config.group.protocol.type=connect is not the consumer-group protocol type"
expect_refused protocol-type-case 'kafka: {config: {group.protocol.type: Consumer}}' "kafka.config.group.protocol.type=Consumer is not the consumer-group protocol type"
expect_refused broker-char 'kafka: {bootstrapServers: "kaf!ka:9092"}' "bootstrapServers"
expect_refused broker-userinfo 'kafka: {bootstrapServers: "user@kafka:9092"}' "bootstrapServers"
expect_refused broker-commas 'kafka: {bootstrapServers: " , "}' "bootstrapServers"
expect_refused registry-no-host 'schemaRegistry: {url: "http://:8081"}' "schemaRegistry"
label63=$(printf 'a%.0s' $(seq 1 63))  # four labels the label rule takes, 255 characters in all
expect_refused endpoint-long "userpilot: {analyticsEndpoint: $label63.$label63.$label63.$label63.io}" "analyticsEndpoint"
expect_refused config-empty-part 'kafka: {config: {"socket..timeout.ms": "1000"}}' "socket..timeout.ms"
expect_secret_unquoted token-secret 'userpilot: {apiKey: "Token HUNTER2"}' HUNTER2
# A registry URL with credentials and no user still gets the chart's own message, not the
# schema's bare "not failed" (review "compat53").
expect_refused registry-blank-user 'schemaRegistry: {url: "https://:tok3n@registry:8443"}' "schemaRegistry.url holds credentials"
# A Kafka secret that is exactly $(VAR) of a variable from a Secret defined before it
# renders (Kubernetes expands it; the Deployment shows the reference only); before it, not.
expect_refused kafka-secret-ref-late 'extraEnv: [{name: KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET, value: "$(IDP_SECRET)"}, {name: IDP_SECRET, valueFrom: {secretKeyRef: {name: idp, key: secret}}}]' "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET is \$(IDP_SECRET), but IDP_SECRET is not taken from a Secret before it"
expect_refused kafka-secret-ref-plain 'extraEnv: [{name: IDP_SECRET, value: hunter2-plain}, {name: KAFKA_SASL_PASSWORD, value: "$(IDP_SECRET)"}]' "KAFKA_SASL_PASSWORD is \$(IDP_SECRET), but IDP_SECRET is not taken from a Secret before it"
printf '%s\n' 'extraEnv: [{name: IDP_SECRET, valueFrom: {secretKeyRef: {name: idp, key: secret}}}, {name: KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET, value: "$(IDP_SECRET)"}]' \
  >"$OUT/kafka-secret-ref.values.yaml"
"$HELM" template "$RELEASE" "$CHART" --kube-version "$KUBE_VERSION" "${TOKEN[@]}" \
  -f "$OUT/kafka-secret-ref.values.yaml" >/dev/null \
  || die "a Kafka secret written \$(VAR) of a Secret's variable defined before it must render"
printf '    ok  %-20s %s\n' kafka-secret-ref "renders"
expect_secret_unquoted redis-query-secret 'redis: {url: "redis://r:6379/0?password=HUNTER2#x"}' HUNTER2
expect_secret_unquoted redis-no-at 'redis: {url: "redis://:HUNTER2/host"}' HUNTER2
expect_secret_unquoted registry-no-scheme 'schemaRegistry: {url: "user:HUNTER2@sr:8081"}' HUNTER2
expect_secret_unquoted registry-comma 'schemaRegistry: {url: "http://user:HUNTER2,x@sr:8081"}' HUNTER2
expect_fail no-endpoint "userpilot.analyticsEndpoint is required: your Userpilot account's host"
expect_fail both-autoscalers "mutually exclusive"
expect_fail bootstrap-prefix "kafka.bootstrapServers has SASL_SSL://b2:9096, whose protocol is not the security protocol (PLAINTEXT)"
expect_fail keda-mtls "kafka.config.ssl.certificate.location is set (a client certificate) but KEDA's Kafka trigger has no TriggerAuthentication"
expect_fail keda-mtls-env "extraEnv's KAFKA_SSL_CERTIFICATE_LOCATION is set (a client certificate) but KEDA's Kafka trigger has no TriggerAuthentication"
expect_fail redis-url-ref "redis.url holds a \$(...) reference: the chart keeps redis.url in a Secret"
expect_fail registry-no-colon "schemaRegistry.basicAuthUserInfo must be user:password"
expect_fail proxy-ref-after "HTTPS_PROXY's password is \$(PROXY_PASSWORD), but PROXY_PASSWORD is not taken from a Secret before it"
# Nor from a plain value before it: expanded, the Deployment showed the password (review
# "diff53c").
expect_refused proxy-ref-plain 'extraEnv: [{name: PROXY_PW, value: hunter2-plain}, {name: HTTPS_PROXY, value: "http://u:$(PROXY_PW)@proxy:3128"}]' "HTTPS_PROXY's password is \$(PROXY_PW), but PROXY_PW is not taken from a Secret before it"
expect_fail listener-prefix "kafka.bootstrapServers has INTERNAL://kafka:9092: a broker is host:port"
expect_fail insecure-userpilot "userpilot.insecureHttp=true would send the write token to Analytex-EU.userpilot.io:80 in clear text"
expect_fail jaas-in-config "kafka.config.sasl.jaas.config is Java's JAAS configuration"
expect_fail secret-in-extra-env "kafka.extraEnv sets KAFKA_SASL_PASSWORD as a plain value"
expect_fail secret-mixed-case "extraEnv sets Kafka_Sasl_Password as a plain value"
expect_fail proxy-password "extraEnv sets https_proxy with credentials in its URL as a plain value"
expect_fail proxy-password-no-scheme "extraEnv sets HTTP_PROXY with credentials in its URL as a plain value"
expect_fail proxy-key-as-user "extraEnv sets ALL_PROXY with credentials in its URL as a plain value"
expect_fail small-message-max "kafka.config.topic.message.max.bytes=1000 is below 16384"
expect_fail small-queue "kafka.config.queue.buffering.max.kbytes=4 is below 16"
expect_fail truststore-in-config "kafka.config.ssl.truststore.password is a Java truststore setting"
expect_fail keda-no-auth "the security protocol is SASL_SSL but KEDA's Kafka trigger has no credentials"
expect_fail keda-latest "offsetResetPolicy"
expect_fail keda-sasl-meta-only "the security protocol is SASL_SSL but KEDA's Kafka trigger has no credentials"
expect_fail keda-ssl-tls-disable "the security protocol is SSL but KEDA's Kafka trigger has no credentials"
expect_fail keda-protocol-in-env "the security protocol is SASL_SSL but KEDA's Kafka trigger has no credentials"
expect_fail keda-group-from-env "autoscaling.keda.extraMetadata.consumerGroupFromEnv is set by the chart"
expect_fail keda-owned-key "autoscaling.keda.extraMetadata.consumerGroup is set by the chart: it follows kafka.bootstrapServers"
expect_fail keda-idle-key "autoscaling.keda.extraMetadata.allowIdleConsumers is set by the chart: the chart keeps it false"
expect_fail keda-valued-key "autoscaling.keda.extraMetadata.lagThreshold is set by the chart: use autoscaling.keda.lagThreshold"
expect_fail keda-too-many "maxReplicaCount (7) exceeds autoscaling.partitions (6)"
expect_fail hpa-too-many "maxReplicas (5) exceeds autoscaling.partitions (4)"
expect_fail replicas-too-many "replicaCount (13) exceeds autoscaling.partitions (12)"
expect_fail grace-equal "terminationGracePeriodSeconds (25) must be longer than"
expect_fail grace-short "terminationGracePeriodSeconds (30) must be longer than"
expect_fail grace-thin "must be longer than worker.shutdownGraceSeconds (25) by at least 20 s"
expect_fail owned-env "extraEnv sets WORKER_METRICS_PORT, which the chart sets"
expect_fail owned-kafka-env "kafka.extraEnv sets KAFKA_TOPICS, which the chart sets"
expect_fail liveness-success "successThreshold"
expect_fail owned-kafka-config "kafka.config.group.id becomes KAFKA_GROUP_ID, which the chart sets"
expect_fail broker-list-config "kafka.config.metadata.broker.list becomes KAFKA_METADATA_BROKER_LIST"
expect_fail token-file "extraEnv sets USERPILOT_API_KEY_FILE, but the chart sets USERPILOT_API_KEY itself"
expect_fail registry-file "but the chart sets SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO itself"
expect_fail redis-ca-plain "redis.tlsCaSecret needs a rediss:// redis.url"
expect_fail scrape-timeout-long "serviceMonitor.scrapeTimeout (10s) is longer than serviceMonitor.interval (5s)"
expect_fail exporter-timeout-long "kafkaExporter.serviceMonitor.scrapeTimeout (1m500ms) is longer than"
expect_fail hold-short "worker.dlqGuard.holdSeconds (200) is shorter than two serviceMonitor.interval (2m)"
expect_fail redis-twice "redis.url and redis.existingSecret are both set"
expect_fail token-twice "userpilot.apiKey and userpilot.existingSecret are both set"
expect_fail redis-ca-alone "redis.tlsCaSecret is set but no Redis is"
expect_fail pdb-zero "maxUnavailable"
expect_fail request-timeout-tiny "requestTimeoutSeconds"
expect_fail dlq-is-source "kafka.dlqTopic (more) is also a source topic"
expect_fail dlq-default-is-source "the default dead-letter topic events.userpilot.dlq (the first topic's name + .userpilot.dlq) is also a source topic"
expect_fail dlq-collides "the dead-letter topic events_in differs from the source topic events.in only by '.' against '_'"
expect_fail dlq-default-collides "the dead-letter topic events.userpilot.dlq differs from the source topic events_userpilot_dlq"
expect_fail internal-source "kafka.topics has __consumer_offsets, one of Kafka's own internal topics"
expect_fail internal-dlq "kafka.dlqTopic (__transaction_state) is one of Kafka's own internal topics"
expect_fail registry-twice "schemaRegistry.basicAuthUserInfo and schemaRegistry.existingSecret are both set"
expect_fail consent-typo "userpilot.consentCategories has \"analytic\", not a Signal consent category"
expect_fail consent-mixed "userpilot.consentCategories mixes \"none\" with categories"
expect_fail static-member "kafka.config.group.instance.id gives every pod the same static member id"
expect_fail static-member-env "kafka.extraEnv sets KAFKA_GROUP_INSTANCE_ID to one value for every pod"
expect_fail offset-latest "kafka.config.auto.offset.reset=latest would skip events"
expect_fail auto-commit "kafka.config.enable.auto.commit is managed by the worker itself"
expect_fail acks-one "kafka.config.topic.acks=1 would count a dead letter"
expect_fail read-uncommitted "kafka.config.isolation.level=read_uncommitted would send Userpilot"
expect_fail kafka-url "bootstrapServers"
expect_fail topic-isolation "kafka.config.topic.isolation.level is no setting librdkafka has"
expect_fail registry-url-creds "schemaRegistry.url holds credentials"
expect_fail rule-without-monitor "set prometheusRule.job to the job label"
expect_fail lag-injection "kafkaLagMatchers"
expect_fail selector-label "podLabels sets app.kubernetes.io/name, a label the chart sets itself"
expect_fail label-twice "podLabels and commonLabels both set team"

log "the PDB lets unready pods be evicted where Kubernetes knows how (1.27+)"
# Rendered into files first: `helm template | grep -q` lost helm to SIGPIPE (pipefail).
"$HELM" template "$RELEASE" "$CHART" --kube-version 1.27.0 "${TOKEN[@]}" >"$OUT/pdb-127.yaml" \
  || die "helm template (1.27) failed"
"$HELM" template "$RELEASE" "$CHART" --kube-version 1.25.0 "${TOKEN[@]}" >"$OUT/pdb-125.yaml" \
  || die "helm template (1.25) failed"
grep -qF "unhealthyPodEvictionPolicy: AlwaysAllow" "$OUT/pdb-127.yaml" \
  || die "no unhealthyPodEvictionPolicy at 1.27"
! grep -qF "unhealthyPodEvictionPolicy" "$OUT/pdb-125.yaml" \
  || die "unhealthyPodEvictionPolicy rendered for 1.25"
expect_fail secret-in-config "kafka.config.sasl.password is a secret"
expect_fail url-secret-in-config "kafka.config.sasl.oauthbearer.token.endpoint.url holds credentials in its URL"
expect_fail url-secret-no-scheme-in-config "kafka.config.sasl.oauthbearer.token.endpoint.url holds credentials in its URL"
expect_fail url-secret-in-kafka-env "kafka.extraEnv sets KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL with credentials in its URL as a plain value"
expect_fail url-secret-no-scheme-in-env "extraEnv sets KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL with credentials in its URL as a plain value"
expect_fail bad-schema "consentMissing"
expect_fail unknown-value "replicas"
expect_fail no-token "userpilot.existingSecret (recommended) or userpilot.apiKey is required"

log "chart values reach the alert rules and the dashboard"
has() { # rendering name, fixed string, why
  grep -qF -- "$2" "$OUT/$1.yaml" || die "$1: lacks '$2' ($3)"
}
lacks() {
  ! grep -qF -- "$2" "$OUT/$1.yaml" || die "$1: still has '$2' ($3)"
}
has full "runbook_url: https://wiki.example.com/runbooks/userpilot-worker#alert-userpilotworkersdown" \
  "runbookBaseUrl in the PrometheusRule"
has full '"url": "https://wiki.example.com/runbooks/userpilot-worker#alert-userpilotconsumerlaggrowing"' \
  "runbookBaseUrl in the dashboard's links"
lacks full "https://github.com/signal/userpilot-worker" "every runbook link follows runbookBaseUrl"
has full "name: upw-userpilot-worker-kafka-exporter" "kafkaExporter.serviceMonitor renders"
render renamed -f "$FULL_VALUES" --set kafka.groupId=orders-to-userpilot --set nameOverride=upw-worker
# Numbers as the worker reads them: Helm holds every YAML number as a float, and `int64`
# truncated 0.5 s to "0" while `toString` wrote 52428800 as "5.24288e+07".
cat >"$OUT/numbers.values.yaml" <<'EOF2'
userpilot: {ratePeriodSeconds: 0.5, retry: {budgetSeconds: 1.5}}
kafka: {config: {fetch.max.bytes: 52428800, queued.max.messages.kbytes: 1048576, enable.idempotence: true}}
EOF2
render numbers -f "$OUT/numbers.values.yaml"
# A Kafka secret's name with an empty value (the worker reads it as unset) shows nothing.
cat >"$OUT/empty-secret.values.yaml" <<'EOF2'
kafka: {extraEnv: [{name: KAFKA_SASL_PASSWORD, value: ""}]}
EOF2
render empty-secret -f "$OUT/empty-secret.values.yaml"
has numbers 'USERPILOT_RATE_PERIOD_SECONDS: "0.5"' "a fractional period is not truncated"
has numbers 'USERPILOT_RETRY_BUDGET_SECONDS: "1.5"' "a fractional budget is not truncated"
has numbers 'KAFKA_FETCH_MAX_BYTES: "52428800"' "large whole numbers have no exponent"
has numbers 'KAFKA_QUEUED_MAX_MESSAGES_KBYTES: "1048576"' "large whole numbers have no exponent"
has numbers 'KAFKA_ENABLE_IDEMPOTENCE: "true"' "booleans stay booleans"
has default 'USERPILOT_RATE_PERIOD_SECONDS: "60"' "whole numbers have no fraction"
for key in ssl.keystore.password ssl.key.pem sasl.oauthbearer.config \
    sasl.oauthbearer.client.credentials.client.secret \
    sasl.oauthbearer.assertion.private.key.passphrase sasl.oauthbearer.assertion.private.key.pem; do
  err="$("$HELM" template "$RELEASE" "$CHART" --kube-version "$KUBE_VERSION" "${TOKEN[@]}" \
    --set "kafka.config.${key//./\\.}=x" 2>&1 >/dev/null)" && die "kafka.config.$key: rendered into the ConfigMap"
  grep -qF -- "kafka.config.$key is a secret" <<<"$err" || die "kafka.config.$key: failed for another reason: $err"
done
has renamed 'kafka_consumergroup_lag{consumergroup="orders-to-userpilot",namespace="kafka",topic=~"delivery-userpilot|delivery-userpilot-backfill"}' "the lag alert follows kafka.groupId, on the exporter's namespace (review diff24b), for the release's own topics (review dash55)"
render lag-matchers --set prometheusRule.enabled=true --set serviceMonitor.enabled=true \
  --set-string 'prometheusRule.kafkaLagMatchers=cluster="eu-1"'
has lag-matchers 'kafka_consumergroup_lag{consumergroup="userpilot-delivery",cluster="eu-1",topic=~"' "prometheusRule.kafkaLagMatchers"
has lag-matchers 'kafka_consumergroup_lag{consumergroup=\"$consumergroup\",cluster=\"eu-1\"' "the dashboard's lag panels select the same exporter (review diff24c)"
render proxy-no-password -f "$OUT/proxy-no-password.values.yaml"
cat >"$OUT/proxy-ref.values.yaml" <<'EOF'
extraEnv:
  - {name: PROXY_PASSWORD, valueFrom: {secretKeyRef: {name: egress-proxy, key: password}}}
  - {name: HTTPS_PROXY, value: "http://svc-userpilot:$(PROXY_PASSWORD)@proxy.corp:3128"}
EOF
render proxy-ref -f "$OUT/proxy-ref.values.yaml"
has proxy-ref 'value: http://svc-userpilot:$(PROXY_PASSWORD)@proxy.corp:3128' "a proxy password given as \$(VAR) of a variable from a Secret renders (review helm52)"
# As the worker takes them (review "compat52"): a SOCKS proxy for other tools beside the
# HTTP one it uses (the worker refuses one it would use itself), a Redis password holding
# "$(" that is no variable reference.
render socks-beside --set-json 'extraEnv=[{"name":"HTTPS_PROXY","value":"http://proxy.corp:3128"},{"name":"ALL_PROXY","value":"socks5://proxy.corp:1080"}]'
render redis-dollar --set-string 'redis.url=redis://:k3$(Qz!@redis:6379/0'
has proxy-no-password 'value: http://proxy.corp:3128' "a proxy URL without a password renders (review config48)"
render lag-regex -f "$OUT/lag-regex.values.yaml"
render shared-dash --set dashboard.namespace=monitoring
grep -qE '^  name: upw-userpilot-worker-[0-9a-f]{10}-dashboard$' "$OUT/shared-dash.yaml" \
  || die "shared-dash: the ConfigMap's name does not tell the release's namespace apart (reviews diff24b, diff24c)"
"$PYTHON" - "$OUT/shared-dash.yaml" <<'PY' || die "the dashboard does not open on its release's namespace"
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "ConfigMap"
        and any(k.endswith(".json") for k in (d.get("data") or {}))]
(board,) = [json.loads(v) for d in docs for v in d["data"].values()]
(var,) = [v for v in board["templating"]["list"] if v["name"] == "namespace"]
assert var["current"]["value"] == ["delivery"], var["current"]
PY
has renamed 'sum by (namespace) (up{job="upw-worker",namespace="delivery"})' "the workers-down alert follows the chart name (the ServiceMonitor's jobLabel)"
has renamed 'absent(up{job="upw-worker",namespace="delivery"})' "the workers-down alert sees its own namespace without targets while others have some"
has renamed 'max by (namespace, topic, partition) (last_over_time(userpilot_consumer_lag{namespace="delivery"}[1m]))' "every worker series of the release's namespace only (review helm24)"
has renamed 'rate(userpilot_events_dropped_total{namespace="delivery",reason="consent"}[30m])' "a namespace beside the selector's own labels"
lacks renamed 'userpilot_events_delivered_total[' "no worker series left without the namespace"
for r in orders billing; do
  "$HELM" template "$r" "$CHART" --namespace delivery --kube-version "$KUBE_VERSION" "${TOKEN[@]}" \
    --set dashboard.namespace=monitoring --show-only templates/dashboard-configmap.yaml \
    >"$OUT/dash-$r.yaml" || die "helm template (dashboard $r) failed"
  grep -qF "delivery_$r-userpilot-worker.json: |-" "$OUT/dash-$r.yaml" \
    || die "dashboard $r: the sidecar's file is not named after the release (two releases overwrite one file)"
  grep -qF "\"title\": \"Userpilot delivery worker (delivery/$r-userpilot-worker)\"" "$OUT/dash-$r.yaml" \
    || die "dashboard $r: the title does not name the release"
done
uid_of() { grep -oE '"uid": "upw-[0-9a-f]+"' "$1" | head -n1; }
[[ -n "$(uid_of "$OUT/dash-orders.yaml")" && "$(uid_of "$OUT/dash-orders.yaml")" != "$(uid_of "$OUT/dash-billing.yaml")" ]] \
  || die "two releases' dashboards share a Grafana uid (review helm24)"
render common-labels --set commonLabels.cost-center=c42 -f "$FULL_VALUES"
[[ "$(grep -c "^    cost-center: c42$" "$OUT/common-labels.yaml")" -ge 8 ]] \
  || die "commonLabels: not on every resource"
grep -qE "^        cost-center: c42$" "$OUT/common-labels.yaml" || die "commonLabels: not on the pods"
render dash-uid --set dashboard.uid=my-board
has dash-uid '"uid": "my-board"' "dashboard.uid sets the Grafana uid"
render other-job --set prometheusRule.enabled=true --set prometheusRule.job=kubernetes-pods
has other-job 'absent(up{job="kubernetes-pods",namespace="delivery"})' "prometheusRule.job names the workers' targets"
has renamed '"query": "orders-to-userpilot"' "the dashboard's consumergroup variable follows kafka.groupId"
lacks renamed 'consumergroup="userpilot-delivery"' "no rule left on the default group"

log "KEDA gets host:port brokers; the PDB follows the most replicas there can be"
render keda-brokers -f "$FULL_VALUES" --set 'kafka.bootstrapServers=SASL_SSL://b1:9093\, b2'
cat >"$OUT/keda-ssl-tls.values.yaml" <<'EOF'
autoscaling: {keda: {enabled: true, extraMetadata: {tls: enable}}}
kafka: {config: {security.protocol: ssl}}
EOF
render keda-ssl-tls -f "$OUT/keda-ssl-tls.values.yaml"
has keda-ssl-tls 'tls: "enable"' "TLS alone (SSL) may be the trigger metadata's tls: enable"
has keda-brokers 'bootstrapServers: "b1:9093,b2:9092"' "no protocol prefix, a port on every broker"
has keda-brokers 'excludePersistentLag: "true"' "lag no replica can deliver (outage, stuck commit) does not scale"
render keda-ipv6 -f "$FULL_VALUES" --set 'kafka.bootstrapServers=fd00::10\,[fd00::11]\,[::1]:9093'
has keda-ipv6 'bootstrapServers: "[fd00::10]:9092,[fd00::11]:9092,[::1]:9093"' "IPv6 brokers in brackets, with a port"
has keda-brokers 'KAFKA_BOOTSTRAP_SERVERS: "SASL_SSL://b1:9093, b2"' "the worker gets them as written"
render consent-off --set 'userpilot.consentCategories={None}'
has consent-off 'USERPILOT_CONSENT_CATEGORIES: "None"' "consent gating can be turned off (any case)"
render consent-case --set 'userpilot.consentCategories={Analytics, functional}'
has consent-case 'USERPILOT_CONSENT_CATEGORIES: "Analytics, functional"' "categories in any case"
render hpa-from-one -f "$OUT/hpa.values.yaml" --set autoscaling.hpa.minReplicas=1
has hpa-from-one "kind: PodDisruptionBudget" "an autoscaler starting at one pod still has a PDB"

log "validating rendered manifests (kubernetes-validate: $SCHEMA_VERSIONS)"
# Expected kinds per rendering: a missing or surplus object is as wrong as an invalid one.
"$PYTHON" - "$ROOT" "$SCHEMA_VERSIONS" \
  "$OUT/default.yaml=ConfigMap,ConfigMap,Deployment,PodDisruptionBudget,Secret,Service,ServiceAccount" \
  "$OUT/full.yaml=ConfigMap,ConfigMap,ConfigMap,Deployment,PodDisruptionBudget,PrometheusRule,ScaledObject,Service,ServiceAccount,ServiceMonitor,ServiceMonitor" \
  "$OUT/keda-topics.yaml=ConfigMap,ConfigMap,ConfigMap,Deployment,PodDisruptionBudget,PrometheusRule,ScaledObject,Service,ServiceAccount,ServiceMonitor,ServiceMonitor" \
  "$OUT/hpa.yaml=ConfigMap,ConfigMap,Deployment,HorizontalPodAutoscaler,PodDisruptionBudget,Secret,Service,ServiceAccount" \
  "$OUT/single.yaml=ConfigMap,ConfigMap,ConfigMap,Deployment,Secret,Service,ServiceAccount" \
  "$OUT/readme.yaml=ConfigMap,ConfigMap,Deployment,PodDisruptionBudget,Service,ServiceAccount" \
  <<'PY'
"""Schema + promise checks of rendered manifests; prints one line per file, raises on error."""

from __future__ import annotations

import base64
import copy
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import certifi
import kubernetes_validate
import yaml

root, versions, *specs = sys.argv[1:]
sys.path.insert(0, root)
try:  # the worker's own view of which variables exist and which settings are valid
    from consumer.config import is_known_env_var, load_settings
    from consumer.errors import ConfigError
except ImportError as exc:
    sys.exit(f"cannot import the worker's config/mapping modules: {exc}")

schema_versions = [
    kubernetes_validate.latest_version() if v == "latest" else v for v in versions.split()
]
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}
problems: list[str] = []


def check(ok: bool, where: str, message: str) -> None:
    if not ok:
        problems.append(f"{where}: {message}")


def without_runbook_bases(groups: Any) -> Any:
    """The rule groups with each runbook_url cut to its #anchor (the base is a chart value)
    and the release's namespace and the exporter's matchers taken out of the selectors (the
    chart adds them)."""
    out = copy.deepcopy(groups)
    for g in out or []:
        for r in g.get("rules") or []:
            if isinstance(r.get("expr"), str):
                expr = re.sub(r'up\{job="([^"]*)",namespace="[^"]*"\}', r'up{job="\1"}',
                              r["expr"])
                expr = re.sub(r'(userpilot_[a-z_]+)\{namespace="[^"]*"\}', r"\1", expr)
                expr = re.sub(r'(userpilot_[a-z_]+)\{namespace="[^"]*",', r"\1{", expr)
                r["expr"] = re.sub(r'(kafka_consumergroup_lag\{consumergroup="[^"]*"),[^}]*\}',
                                   r"\1}", expr)
            notes = r.get("annotations") or {}
            if "runbook_url" in notes:
                url = str(notes["runbook_url"])
                absolute = url.startswith(("https://", "http://")) and "#" in url
                notes["runbook_url"] = "#" + url.partition("#")[2] if absolute else url
    return out


def crd(doc: dict[str, Any], where: str, by_kind: dict[str, list[dict[str, Any]]]) -> None:
    """Structural checks for CRDs whose schemas kubernetes-validate does not ship."""
    kind, spec = doc["kind"], doc.get("spec") or {}
    meta = doc.get("metadata") or {}
    check(bool(meta.get("name")) and bool(meta.get("labels")), where, "needs name and labels")
    if kind == "ServiceMonitor" and meta.get("name", "").endswith("-kafka-exporter"):
        # Scrapes a Service this chart does not render: only its shape can be checked.
        check(doc["apiVersion"] == "monitoring.coreos.com/v1", where, "apiVersion")
        eps = spec.get("endpoints") or []
        check(
            len(eps) == 1 and bool(eps[0].get("port")) and eps[0].get("path") == "/metrics",
            where,
            "one named endpoint, path /metrics",
        )
        check(bool((spec.get("selector") or {}).get("matchLabels")), where, "needs a selector")
        check(bool((spec.get("namespaceSelector") or {}).get("matchNames")), where, "namespace")
    elif kind == "ServiceMonitor":
        check(doc["apiVersion"] == "monitoring.coreos.com/v1", where, "apiVersion")
        check(spec.get("jobLabel") == "app.kubernetes.io/name", where, "jobLabel: the alerts' job")
        eps = spec.get("endpoints") or []
        check(
            len(eps) == 1 and eps[0].get("port") == "metrics" and eps[0].get("path") == "/metrics",
            where,
            "one endpoint on port 'metrics' path /metrics",
        )
        check(
            bool(eps) and eps[0].get("honorLabels") is True,
            where,
            "honorLabels: true (the worker's `endpoint` label is also the operator's target label)",
        )
        svc_labels = [s["metadata"]["labels"] for s in by_kind.get("Service", [])]
        sel = (spec.get("selector") or {}).get("matchLabels") or {}
        check(
            bool(sel) and any(sel.items() <= lab.items() for lab in svc_labels),
            where,
            "selector matches no rendered Service",
        )
    elif kind == "PrometheusRule":
        check(doc["apiVersion"] == "monitoring.coreos.com/v1", where, "apiVersion")
        groups = spec.get("groups")
        check(isinstance(groups, list) and bool(groups), where, "spec.groups must be a list")
        for g in groups or []:
            check(
                isinstance(g.get("name"), str)
                and isinstance(g.get("rules"), list)
                and bool(g["rules"]),
                where,
                f"group {g.get('name')!r} needs a name and rules",
            )
            for r in g.get("rules") or []:
                check(
                    ("alert" in r) != ("record" in r) and isinstance(r.get("expr"), str | int),
                    where,
                    f"rule {r.get('alert') or r.get('record')!r}: alert xor record, and expr",
                )
        src = yaml.safe_load((Path(root) / "helm/userpilot-worker/files/alerts.yaml").read_text())
        check(
            without_runbook_bases(groups) == without_runbook_bases(src.get("groups")),
            where,
            "groups differ from files/alerts.yaml (beyond the runbook base URL)",
        )
    elif kind == "ScaledObject":
        check(doc["apiVersion"] == "keda.sh/v1alpha1", where, "apiVersion")
        deployments = [d["metadata"]["name"] for d in by_kind.get("Deployment", [])]
        check(
            (spec.get("scaleTargetRef") or {}).get("name") in deployments,
            where,
            "scaleTargetRef names no rendered Deployment",
        )
        lo, hi = spec.get("minReplicaCount"), spec.get("maxReplicaCount")
        check(
            isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi, where, "replica bounds"
        )
        triggers = spec.get("triggers") or []
        check(bool(triggers), where, "no triggers")
        for t in triggers:
            md = t.get("metadata") or {}
            check(t.get("type") == "kafka", where, "trigger type must be kafka")
            for key in ("bootstrapServers", "consumerGroup", "topic", "lagThreshold"):
                check(isinstance(md.get(key), str) and bool(md[key]), where, f"metadata.{key}")
            check(
                all(isinstance(v, str) for v in md.values()),
                where,
                "metadata values must be strings",
            )
            check(
                md.get("allowIdleConsumers") == "false", where, "allowIdleConsumers must be 'false'"
            )
        # One trigger per topic, each naming it: KEDA refuses a topic-less trigger beside
        # limitToPartitionsWithLag (the whole ScaledObject), and before the group's first
        # commit one counted every topic of the cluster (reviews "diff52a", "diff52b").
        named = [c["data"]["KAFKA_TOPICS"] for c in by_kind.get("ConfigMap", [])
                 if "KAFKA_TOPICS" in (c.get("data") or {})]
        check(len(named) == 1, where, "one ConfigMap names the topics")
        if named:
            found = [(t.get("metadata") or {}).get("topic") for t in triggers]
            check(sorted(found, key=str) == sorted(named[0].split(",")), where,
                  f"a trigger per topic {named[0]}, found {found}")


def deployment(doc: dict[str, Any], where: str, by_kind: dict[str, list[dict[str, Any]]]) -> None:
    """The chart's promises about the worker pod."""
    pod = doc["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    psc, csc = pod.get("securityContext") or {}, c.get("securityContext") or {}
    check(
        psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 10001,
        where,
        "pod non-root 10001",
    )
    check(csc.get("readOnlyRootFilesystem") is True, where, "readOnlyRootFilesystem")
    check(csc.get("allowPrivilegeEscalation") is False, where, "allowPrivilegeEscalation")
    check((csc.get("capabilities") or {}).get("drop") == ["ALL"], where, "drop ALL capabilities")
    check(
        (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        == "RuntimeDefault",
        where,
        "seccomp RuntimeDefault",
    )
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
    vols = {v["name"]: v for v in pod.get("volumes") or []}
    check("emptyDir" in vols.get(mounts.get("/tmp", ""), {}), where, "writable emptyDir at /tmp")
    unmounted = sorted(name for name in mounts.values() if name not in vols)
    check(not unmounted, where, f"mounts of volumes the pod does not declare: {unmounted}")
    port = {p["name"]: p["containerPort"] for p in c.get("ports") or []}.get("metrics")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = (c.get(probe) or {}).get("httpGet") or {}
        check(
            get.get("path") == path and get.get("port") in ("metrics", port),
            where,
            f"{probe} {path}",
        )
    annotations = doc["spec"]["template"]["metadata"].get("annotations") or {}
    check("checksum/config" in annotations, where, "checksum/config annotation")
    # The Secret's hash only beside the token (a hash of guessable passwords alone confirms
    # guesses offline to anyone who may read pods).
    token_ref = next(
        (((e.get("valueFrom") or {}).get("secretKeyRef") or {})
         for e in c.get("env") or [] if e.get("name") == "USERPILOT_API_KEY"),
        {},
    )
    token_inline = any(
        s["metadata"]["name"] == token_ref.get("name") and token_ref.get("key") in (s.get("data") or {})
        for s in by_kind.get("Secret", [])
    )
    check(
        ("checksum/secret" in annotations) == token_inline,
        where,
        "checksum/secret annotation exactly when the chart's Secret holds the token",
    )

    maps = {m["metadata"]["name"]: m.get("data") or {} for m in by_kind.get("ConfigMap", [])}
    settings: dict[str, str] = {}
    names = [e["name"] for e in c.get("env") or []]
    for src in c.get("envFrom") or []:
        if "configMapRef" in src:
            ref = src["configMapRef"]["name"]
            check(ref in maps, where, f"envFrom ConfigMap {ref} is not rendered")
            settings.update(maps.get(ref, {}))
    names += list(settings)
    unknown = sorted(n for n in names if not is_known_env_var(n))
    check(not unknown, where, f"variables the worker does not read: {unknown}")
    for required in (
        "USERPILOT_API_KEY",
        "USERPILOT_ANALYTICS_ENDPOINT",
        "KAFKA_BOOTSTRAP_SERVERS",
        "KAFKA_TOPICS",
        "SCHEMA_REGISTRY_URL",
    ):
        check(required in names, where, f"{required} is not set")
    check(
        str(port) == settings.get("WORKER_METRICS_PORT"),
        where,
        "container port != WORKER_METRICS_PORT",
    )
    grace = int(settings.get("WORKER_SHUTDOWN_GRACE_SECONDS", "25"))
    check(
        pod.get("terminationGracePeriodSeconds", 30) > grace,
        where,
        "terminationGracePeriodSeconds must exceed WORKER_SHUTDOWN_GRACE_SECONDS",
    )
    # Every Secret the pod reads must be rendered here or be the user's existing one.
    secrets = {s["metadata"]["name"]: s.get("data") or {} for s in by_kind.get("Secret", [])}
    for e in c.get("env") or []:
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if ref and ref["name"] in secrets:
            check(
                ref["key"] in secrets[ref["name"]],
                where,
                f"{e['name']}: key {ref['key']} not in Secret",
            )
    accepted_by_worker(c, settings, maps, mounts, vols, secrets, where)
    mapping_file = settings.get("USERPILOT_MAPPINGS_FILE")
    if mapping_file:
        directory, _, filename = mapping_file.rpartition("/")
        vol = vols.get(mounts.get(directory, ""), {})
        cm = (vol.get("configMap") or {}).get("name")
        check(cm in maps and filename in maps.get(cm, {}), where, "mappings file is not mounted")
    replicas = doc["spec"].get("replicas")
    pdbs = by_kind.get("PodDisruptionBudget", [])
    scaled = bool(by_kind.get("ScaledObject") or by_kind.get("HorizontalPodAutoscaler"))
    check(scaled == (replicas is None), where, "replicas must be omitted exactly when autoscaled")
    if replicas is not None:
        check(
            bool(pdbs) == (replicas > 1), where, f"PDB must exist iff replicas > 1 (got {replicas})"
        )
    for d in by_kind.get("ConfigMap", []):
        for key, value in (d.get("data") or {}).items():
            if key.endswith(".json"):
                try:
                    json.loads(value)
                except ValueError as exc:
                    problems.append(f"{where}: ConfigMap {d['metadata']['name']} {key}: {exc}")


def accepted_by_worker(
    c: dict[str, Any],
    settings: dict[str, str],
    maps: dict[str, dict[str, str]],
    mounts: dict[str, str],
    vols: dict[str, Any],
    secrets: dict[str, dict[str, str]],
    where: str,
) -> None:
    """Run the worker's own settings validation on the environment the pod would get.

    Values from Secrets the chart renders are decoded; values from the user's existing
    Secrets (and an empty token, which NOTES.txt warns about) get a placeholder.
    """
    env = dict(settings)
    for e in c.get("env") or []:
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif ref:
            raw = secrets.get(ref["name"], {}).get(ref["key"], "")
            placeholder = ("user:password" if "USER_INFO" in e["name"]
                           else "rediss://from-secret:6380/0" if e["name"] == "REDIS_URL"
                           else "from-secret")
            env[e["name"]] = base64.b64decode(raw).decode() or placeholder
    for src in c.get("envFrom") or []:
        if "secretRef" in src and env.get("KAFKA_SASL_MECHANISM"):
            env.setdefault("KAFKA_SASL_USERNAME", "placeholder-user")
            env.setdefault("KAFKA_SASL_PASSWORD", "placeholder-password")
    with tempfile.TemporaryDirectory() as tmp:
        path = env.get("USERPILOT_MAPPINGS_FILE")
        if path:  # the mounted ConfigMap file, written where this process can read it
            directory, _, filename = path.rpartition("/")
            cm = (vols.get(mounts.get(directory, ""), {}).get("configMap") or {}).get("name", "")
            local = Path(tmp) / filename
            local.write_text(maps.get(cm, {}).get(filename, ""))
            env["USERPILOT_MAPPINGS_FILE"] = str(local)
        for name in ("REDIS_TLS_CA_FILE", "USERPILOT_CA_BUNDLE"):
            ca = env.get(name)
            if not ca:
                continue
            # A file of a mounted CA Secret: the mount must exist, its content can't (a
            # real PEM bundle stands in for it: the worker checks the file is one).
            directory, _, filename = ca.rpartition("/")
            secret = (vols.get(mounts.get(directory, ""), {}).get("secret") or {})
            if not secret.get("secretName"):
                problems.append(f"{where}: {name}={ca} is not on a Secret mount")
            local = Path(tmp) / f"{name}-{filename}"
            local.write_bytes(Path(certifi.where()).read_bytes())
            env[name] = str(local)
        try:
            load_settings(env)
        except ConfigError as exc:
            problems.append(f"{where}: the worker rejects this configuration: {exc}")


for spec in specs:
    path, _, kinds = spec.partition("=")
    name = Path(path).name
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    got = sorted(d["kind"] for d in docs)
    check(
        got == sorted(kinds.split(",")), name, f"kinds {got} != expected {sorted(kinds.split(','))}"
    )
    validated = 0
    for d in docs:
        where = f"{name} {d['kind']}/{d['metadata']['name']}"
        if d["kind"] in CRD_KINDS:
            crd(d, where, by_kind)
            continue
        for version in schema_versions:
            doc = d
            if version.startswith("1.25") and d["kind"] == "PodDisruptionBudget":
                # Rendered for KUBE_VERSION; for 1.25 the template leaves it out (checked
                # above), and the 1.25 schema does not know it.
                doc = {**d, "spec": {k: v for k, v in d["spec"].items()
                                     if k != "unhealthyPodEvictionPolicy"}}
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{where} (k8s {version}): {exc.message} at {list(exc.path)}")
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{where}: no Kubernetes {version} schema for {d['apiVersion']}")
        validated += 1
        if d["kind"] == "Deployment":
            deployment(d, where, by_kind)
    crds = sum(d["kind"] in CRD_KINDS for d in docs)
    print(
        f"    {name}: {validated} validated against {', '.join(schema_versions)}; "
        f"{crds} CRDs checked structurally"
    )

if problems:
    print("\n".join(f"    FAIL {p}" for p in problems), file=sys.stderr)
    sys.exit(1)
PY
if [[ -n "${PROMTOOL:-}" ]]; then
  log "the rendered rules see their own namespace only (promtool: ops/alerts_rendered_test.yaml)"
  mkdir -p "$OUT/rules"
  rules_of() { # rendered manifests, rules file out: the PrometheusRule's groups, as Prometheus loads them
    "$PYTHON" - "$1" "$2" <<'PY' || die "no PrometheusRule rendered in $1"
import sys, yaml
(doc,) = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "PrometheusRule"]
yaml.safe_dump({"groups": doc["spec"]["groups"]}, open(sys.argv[2], "w"), sort_keys=False)
PY
  }
  "$HELM" template upw "$CHART" --namespace delivery --kube-version "$KUBE_VERSION" "${TOKEN[@]}" \
    --set prometheusRule.enabled=true --set serviceMonitor.enabled=true \
    --set kafka.groupId=group-a --set-string 'prometheusRule.kafkaLagMatchers=cluster="a"' \
    --set 'kafka.topics={delivery-userpilot,signal.events}' \
    --show-only templates/prometheusrule.yaml >"$OUT/rules/rule.yaml" \
    || die "helm template (rules) failed"
  rules_of "$OUT/rules/rule.yaml" "$OUT/rules/rendered-alerts.yaml"
  cp "$ROOT/ops/alerts_rendered_test.yaml" "$OUT/rules/"
  # A regex matcher with an escape, single quotes and spaces: rules Prometheus parses.
  rules_of "$OUT/lag-regex.yaml" "$OUT/rules/lag-regex-rules.yaml"
  "$PROMTOOL" check rules "$OUT/rules/lag-regex-rules.yaml" >/dev/null \
    || die "prometheusRule.kafkaLagMatchers with a regex: rules Prometheus cannot parse"
  "$PROMTOOL" test rules "$OUT/rules/alerts_rendered_test.yaml" \
    || die "the rendered rules failed ops/alerts_rendered_test.yaml"
fi
log "check_helm: all checks passed"
