#!/usr/bin/env bash
# Static checks for the monitoring artefacts: alert rules (promtool check + unit tests),
# metric names used by the dashboard and alerts, and — when present — the Helm checks.
# Installs promtool itself (cached), never starts a Prometheus server.
#
# promtool comes from Debian's `prometheus` package, but only the binary is unpacked into
# the cache: `apt-get download` + `dpkg-deb` takes seconds, needs no dependencies and
# starts no service. Fallback where apt is unavailable: `go install` from the Go module
# proxy (works, but compiles for ~5 minutes on 2 cores).
#
# Usage: bash ops/check.sh            (from anywhere; exits non-zero on any failure)
# Env:   PROMTOOL=/path/to/promtool   use that binary instead
#        PYTHON=/path/to/python       interpreter with the package installed
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CACHE_BIN="${XDG_CACHE_HOME:-$HOME/.cache}/userpilot-worker/bin"
PROMTOOL_GO_VERSION="v0.316.0" # Prometheus 3.x; Go module versions are v0.<minor>.<patch>

log() { printf '== %s\n' "$*"; }

install_promtool_apt() {
    command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || return 1
    local tmp
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" RETURN
    if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
        # A fresh machine has no package lists yet.
        apt-get update -qq >/dev/null || return 1
        (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) || return 1
    fi
    dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool || return 1
    install -m 0755 "$tmp/usr/bin/promtool" "$CACHE_BIN/promtool"
}

install_promtool_go() {
    command -v go >/dev/null || return 1
    GOBIN="$CACHE_BIN" go install "github.com/prometheus/prometheus/cmd/promtool@${PROMTOOL_GO_VERSION}"
}

# Sets PROMTOOL_BIN: $PROMTOOL, the cached binary, one on PATH, or a fresh install.
find_promtool() {
    if [[ -n "${PROMTOOL:-}" ]]; then
        PROMTOOL_BIN="$PROMTOOL"
    elif [[ -x "$CACHE_BIN/promtool" ]]; then
        PROMTOOL_BIN="$CACHE_BIN/promtool"
    elif command -v promtool >/dev/null; then
        PROMTOOL_BIN="$(command -v promtool)"
    else
        mkdir -p "$CACHE_BIN"
        log "installing promtool into $CACHE_BIN"
        if ! install_promtool_apt; then
            log "apt route failed; building promtool with go install (slow)"
            install_promtool_go || { log "could not install promtool"; return 1; }
        fi
        PROMTOOL_BIN="$CACHE_BIN/promtool"
    fi
}

find_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        printf '%s\n' "$PYTHON"
    elif [[ -x "$ROOT/.venv/bin/python" ]]; then
        printf '%s\n' "$ROOT/.venv/bin/python"
    else
        command -v python3
    fi
}

failed=0
run() {
    log "$*"
    if ! "$@"; then
        log "FAILED: $*"
        failed=1
    fi
}

find_promtool
PYTHON_BIN="$(find_python)"
log "promtool: $("$PROMTOOL_BIN" --version 2>&1 | head -n1)"

run "$PROMTOOL_BIN" check rules helm/userpilot-worker/files/alerts.yaml
run "$PROMTOOL_BIN" test rules ops/alerts_test.yaml
run "$PYTHON_BIN" ops/check_metric_names.py
# The dashboard's structure, then its queries parsed by promtool as recording rules.
# Then evaluated over the series the worker exports: a query that parses can still fail
# every evaluation (two series with one label set), an error panel in Grafana.
dashboard_rules="$(mktemp --suffix=.yaml)"
dashboard_test="$(mktemp --suffix=.yaml)"
trap 'rm -f "$dashboard_rules" "$dashboard_test"' EXIT
run "$PYTHON_BIN" ops/check_dashboard.py --emit-rules "$dashboard_rules" --emit-test "$dashboard_test"
run "$PROMTOOL_BIN" check rules "$dashboard_rules"
run "$PROMTOOL_BIN" test rules "$dashboard_test"

# --- Helm checks (helm lint/template + kubernetes-validate), owned by ops/check_helm.sh ---
if [[ -f ops/check_helm.sh ]]; then
    run env PROMTOOL="$PROMTOOL_BIN" bash ops/check_helm.sh
else
    log "ops/check_helm.sh not present; skipping Helm checks"
fi
# --- end of Helm checks ---

if [[ "$failed" -ne 0 ]]; then
    log "ops/check.sh: FAILED"
    exit 1
fi
log "ops/check.sh: all checks passed"
