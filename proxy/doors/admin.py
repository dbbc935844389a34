"""The admin listener: ``/metrics`` (Prometheus), ``/healthz`` (alive), ``/readyz`` (serving).

Kept off the ingest port so that metrics and probes are never reachable by CI jobs that
can reach the ingest listener, unless the operator chooses to expose them.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.doors.ingest import RUNTIME
from proxy.doors.protocol import guard
from proxy.gate.runtime import Runtime


async def metrics(request: web.Request) -> web.Response:
    body = request.app[RUNTIME].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready while a policy is serving, tracegate is not draining, every listener takes
    calls (``listeners`` says which is which), and at least one issuer has keys — with
    none, every token would get 503. That last wait is bounded by
    ``TRACEGATE_READY_GRACE_SECONDS`` after start: past it tracegate reports ready anyway,
    so that webhooks (which need no issuer keys) are served through an identity provider's
    outage. Issuers whose keys have not arrived are always listed. The outbox absorbs an
    upstream outage, so Lightstep being down does not make tracegate unready either."""
    runtime = request.app[RUNTIME]
    listeners = {"http": not runtime.draining}
    if runtime.grpc_serving is not None:
        listeners["grpc"] = runtime.grpc_serving
    waiting = runtime.issuers_without_keys()
    no_keys = bool(runtime.gate.policy.issuers) and len(waiting) == len(runtime.gate.policy.issuers)
    in_grace = runtime.monotonic() - runtime.started_at < runtime.settings.ready_grace
    reason = (
        "draining"
        if runtime.draining
        else "listener-down"
        if not all(listeners.values())
        else "waiting-for-issuer-keys"
        if no_keys and in_grace
        else None
    )
    body = {"ready": reason is None, "reason": reason, "listeners": listeners, "issuers_without_keys": waiting}
    return web.json_response(body, status=200 if reason is None else 503)


def build_admin_app(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[guard(runtime.metrics)])
    app[RUNTIME] = runtime
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
