# tracegate: slim, non-root; policies are mounted at /policies. The repository's policies/ is a
# starter that needs one variable (-e LIGHTSTEP_ACCESS_TOKEN); examples/policies/ is the fuller example.
#
# The base image is pinned by digest (the multi-platform index), so a rebuild starts from the
# same Python and Debian bytes until someone moves the pin on purpose; the tag before the @
# only says what the digest is (Docker ignores it when a digest is given). To move it, for a
# Python or Debian security release:
#   docker buildx imagetools inspect python:3.11-slim     # the "Digest:" line
# then replace the digest below in a reviewed change (or try one with
# --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:...).
ARG PYTHON_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# pyproject.toml alone first: its [project] dependencies become requirements.txt, which the
# runtime stage installs in a layer of its own, so a change to the code (or to pyproject's
# tool settings) does not reinstall the dependencies.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
      > requirements.txt
COPY README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --home-dir /var/lib/tracegate --create-home tracegate
# The dependency layer: rebuilt only when the dependency list changes.
COPY --from=build /src/requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt
# The code layer: tracegate alone, its dependencies being above; pip check fails the build if
# the wheel's requirements and the list above ever disagree.
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels && pip check
USER 10001
ENV TRACEGATE_POLICIES=/policies \
    TRACEGATE_DATA_DIR=/var/lib/tracegate \
    TRACEGATE_LISTEN=0.0.0.0:4318 \
    TRACEGATE_ADMIN_LISTEN=0.0.0.0:9464 \
    TRACEGATE_WORKERS=auto \
    PYTHONUNBUFFERED=1
VOLUME ["/policies", "/var/lib/tracegate"]
EXPOSE 4318 4317 9464
# The admin listener is loopback-only by default; the image opens it on 0.0.0.0 inside the
# container so that an orchestrator's probes and Prometheus reach it. Publish it on the host's
# loopback only (docker run -p 127.0.0.1:9464:9464), never on every interface.
# The probe follows TRACEGATE_ADMIN_LISTEN and imports only the standard library (it runs every
# 15 s; the module's docstring has its start-up time).
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-m", "proxy.run.healthcheck"]
ENTRYPOINT ["tracegate"]
CMD ["serve"]
