#!/usr/bin/env bash
# Make sure the OS has what the project cannot pip-install: Java 17+ (Kafka, Apicurio),
# Maven (fetches both from Maven Central), Python 3.11+ with venv and redis-server (the
# shared rate budget and deduplication tests run against a real Redis). On a fresh CI machine
# (root, Debian) missing pieces are installed with apt; elsewhere we say what to install.
set -euo pipefail

missing=()
java_major() { java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print v[1]; exit}'; }
if ! command -v java >/dev/null 2>&1 || [ "$(java_major)" -lt 17 ] 2>/dev/null; then
  missing+=(openjdk-17-jre-headless)
fi
command -v mvn >/dev/null 2>&1 || missing+=(maven)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if ! python3 -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  missing+=(python3 python3-venv)
fi

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[sysdeps] installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "[sysdeps] please install: ${missing[*]} (Java 17+, Maven, Python 3.11+ with venv, redis-server)" >&2
  exit 1
fi
