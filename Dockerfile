# tracegate: slim, non-root; policies are mounted at /policies. The repository's policies/ is a
# starter that needs one variable (-e LIGHTSTEP_ACCESS_TOKEN); examples/policies/ is the fuller example.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/tracegate --create-home tracegate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
ENV TRACEGATE_POLICIES=/policies \
    TRACEGATE_DATA_DIR=/var/lib/tracegate \
    TRACEGATE_LISTEN=0.0.0.0:4318 \
    TRACEGATE_ADMIN_LISTEN=0.0.0.0:9464 \
    TRACEGATE_WORKERS=auto \
    PYTHONUNBUFFERED=1
VOLUME ["/policies", "/var/lib/tracegate"]
EXPOSE 4318 4317 9464
# Follows TRACEGATE_ADMIN_LISTEN (the admin listener is loopback-only by default; the image
# opens it on 0.0.0.0 so that an orchestrator's probes and Prometheus reach it).
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-m", "proxy.run.healthcheck"]
ENTRYPOINT ["tracegate"]
CMD ["serve"]
