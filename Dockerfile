# tracegate: slim, non-root; policies are mounted at /policies.
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
    PYTHONUNBUFFERED=1
VOLUME ["/policies", "/var/lib/tracegate"]
EXPOSE 4318 9464
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["tracegate"]
CMD ["serve"]
