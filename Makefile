# Entry points for developers and CI. `make test` is the one command CI runs (.ci/run):
# it sets up everything on a fresh machine, starts Kafka + the schema registry + Redis, runs every
# check, and stops the services it started, also when a check fails.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RUN := .run
CTL = $(BIN)/python services/ctl.py

.PHONY: sysdeps venv test check lint typecheck ops-check pytest demo services-up services-down

# Java, Maven, python3-venv, redis-server: installed with apt when missing (CI runs as root).
sysdeps:
	@bash services/sysdeps.sh

venv: $(STAMP)

# Re-installs whenever pyproject.toml changes.
$(STAMP): pyproject.toml | sysdeps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

# $(call with-services,COMMAND): start (or reuse) Kafka + registry + Redis, run COMMAND with
# KAFKA_BOOTSTRAP_SERVERS, SCHEMA_REGISTRY_URL and REDIS_URL exported, then stop only what this call
# started -- on success, failure or Ctrl-C alike.
define with-services
mkdir -p $(RUN); rec=$(RUN)/make-$@.started; rm -f "$$rec"; \
trap "$(CTL) down --from $$rec" EXIT; trap 'exit 130' INT TERM; \
$(CTL) up all --record "$$rec"; \
set -a; eval "$$($(CTL) env)"; set +a; \
$(1)
endef

# -k: run every check even after one fails, so one CI run reports all problems.
test: venv
	@$(call with-services,$(MAKE) --no-print-directory -k check)

# >>> Hook: later checks are added here, as targets listed before `pytest`.
#     Each must exit non-zero on failure. ops-check (helm, promtool) is the first.
CHECKS := lint typecheck ops-check
check: $(CHECKS) pytest

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy

ops-check:
	@if [ -f ops/check.sh ]; then bash ops/check.sh; \
	else echo "ops-check: ops/check.sh not present, nothing to check"; fi

pytest: venv
	$(BIN)/pytest tests

demo: venv
	@$(call with-services,$(BIN)/python -m consumer demo)

services-up: venv
	@$(CTL) up all
	@$(CTL) env

services-down:
	@$(PYTHON) services/ctl.py down all
