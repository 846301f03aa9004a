# syntax=docker/dockerfile:1
# Userpilot delivery worker image. One image serves every subcommand of `python -m consumer`
# (run, produce, replay, sandbox, ...); the default is `run`.
#
#   docker build --build-arg REVISION="$(git rev-parse HEAD)" -t userpilot-delivery-worker:local .
#   docker run --rm userpilot-delivery-worker:local check-config

# Pinned patch release; pin the digest too (python:3.11.14-slim-bookworm@sha256:...) when
# the image is promoted, so a rebuild cannot silently change the base.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- build: the project wheel, installed with its runtime dependencies only ---------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# README.md* so the build works whether or not the project has a README yet.
# constraints.txt holds every dependency at the version CI tested (`make constraints`), so a
# rebuild installs the same versions instead of whatever is newest that day.
COPY pyproject.toml constraints.txt README.md* ./
# schemas/ too: consumer/signal_event.avsc is a symlink into it, followed into the wheel.
COPY schemas ./schemas
COPY consumer ./consumer
RUN pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --constraint constraints.txt /dist/*.whl \
 && /opt/venv/bin/pip uninstall --yes pip setuptools \
 && find /opt/venv -name '__pycache__' -type d -prune -exec rm -rf {} +

# --- runtime: the venv, the sample data, a non-root user ----------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# The git commit built from: `docker build --build-arg REVISION=$(git rev-parse HEAD) .`.
# The worker exports it as userpilot_build_info{revision}.
ARG REVISION=unknown
LABEL org.opencontainers.image.title="userpilot-delivery-worker" \
      org.opencontainers.image.description="Kafka consumer delivering Signal events to the Userpilot Track API" \
      org.opencontainers.image.revision="${REVISION}"
# No .pyc writes: the root filesystem is read-only in Kubernetes.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    USERPILOT_WORKER_REVISION=${REVISION} \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 worker \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin worker
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Schemas and sample events for `produce` (demo) and `explain`.
COPY schemas ./schemas
# Numeric user so Kubernetes can verify runAsNonRoot.
USER 10001:10001
EXPOSE 8082
ENTRYPOINT ["python", "-m", "consumer"]
CMD ["run"]
