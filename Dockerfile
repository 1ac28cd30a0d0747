# Multi-stage: build a wheel, install it in a slim runtime as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 relay
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config/relay.toml /etc/relay/relay.toml
USER relay
WORKDIR /home/relay
# The embedded Redis keeps its AOF here: mount a volume to keep events across container restarts.
VOLUME ["/data"]
ENV RELAY_CONFIG=/etc/relay/relay.toml \
    RELAY_STORAGE_DIR=/data \
    RELAY_INGRESS_LISTEN=0.0.0.0:8780
EXPOSE 8780 8781
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8780/healthz').status == 200 else 1)"
ENTRYPOINT ["relay"]
CMD ["serve"]
