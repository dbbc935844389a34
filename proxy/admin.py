"""The admin listener: ``/metrics`` (Prometheus), ``/healthz`` (alive), ``/readyz`` (serving).

Kept off the ingest port so that metrics and probes are never reachable by CI jobs that
can reach the ingest listener, unless the operator chooses to expose them.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.ingest import RUNTIME
from proxy.runtime import Runtime


async def metrics(request: web.Request) -> web.Response:
    body = request.app[RUNTIME].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready while a policy is serving and tracegate is not draining. Issuers whose keys
    have not arrived are listed but do not make it unready: their tokens get 503, others
    are served. The outbox absorbs an upstream outage, so Lightstep being down does not
    make tracegate unready either. With the gRPC listener on, it must be taking calls too;
    ``listeners`` says which is which."""
    runtime = request.app[RUNTIME]
    listeners = {"http": not runtime.draining}
    if runtime.grpc_serving is not None:
        listeners["grpc"] = runtime.grpc_serving
    ready = all(listeners.values())
    body = {"ready": ready, "listeners": listeners, "issuers_without_keys": runtime.issuers_without_keys()}
    return web.json_response(body, status=200 if ready else 503)


def build_admin_app(runtime: Runtime) -> web.Application:
    app = web.Application()
    app[RUNTIME] = runtime
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
