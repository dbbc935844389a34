"""The OTLP/HTTP ingest endpoints: identify → decide → forward, one request at a time.

``POST /v1/traces``, ``/v1/metrics``, ``/v1/logs``. Every refusal is answered before the
body is read and before anything is sent upstream; an accepted request is answered with
the upstream's own status, body and content type, so the client never sees a 2xx the
upstream did not give.
"""

from __future__ import annotations

import logging

from aiohttp import web

from proxy.answers import refusal
from proxy.errors import AuthError, BodyError, UpstreamError
from proxy.identify import extract_token
from proxy.runtime import Runtime

log = logging.getLogger("tracegate")

RUNTIME = web.AppKey("runtime", Runtime)
SIGNALS = ("traces", "metrics", "logs")
#: Seconds a client is told to wait while an issuer's keys are not yet available.
KEYS_RETRY_AFTER = 5


async def handle_signal(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    signal = request.match_info["signal"]
    content_type = request.headers.get("Content-Type")
    metrics = runtime.metrics
    audit = runtime.audit
    gate = runtime.gate  # one consistent policy for the whole request, even across a reload
    try:
        identity = await gate.verifier.verify(extract_token(request.headers, request.query))
    except AuthError as exc:
        metrics.count_request(signal, "", "refused", exc.reason)
        audit(kind="ingest", decision="refused", reason=exc.reason, issuer=exc.issuer, signal=signal)
        retry = KEYS_RETRY_AFTER if exc.status == 503 else None
        return refusal(exc.status, content_type, retry_after=retry)

    decision = gate.decide(identity, signal)
    account = decision.account.name if decision.account else ""
    rule = decision.rule.name if decision.rule else None

    def record(outcome: str, reason: str, bytes_in: int = 0, upstream_status: int | None = None) -> None:
        metrics.count_request(signal, account, outcome, reason)
        audit(
            kind="ingest",
            decision=outcome,
            reason=reason,
            issuer=identity.issuer,
            claims=identity.claims,
            service_account=account or None,
            rule=rule,
            signal=signal,
            bytes_in=bytes_in,
            upstream_status=upstream_status,
        )

    if not decision.allowed or decision.account is None:
        record("denied", decision.reason)
        return refusal(403, content_type)

    try:
        forwarder = runtime.forwarder
        if forwarder is None:
            raise RuntimeError("runtime not started")
        answer = await forwarder.forward(request, signal, decision.account)
    except (BodyError, UpstreamError) as exc:
        record("failed", exc.reason)
        response = refusal(exc.status, content_type)
        if isinstance(exc, BodyError):
            response.force_close()  # the rest of the body is unread: do not keep the connection
        return response

    reason = "forwarded" if 200 <= answer.status < 300 else f"upstream-{answer.status}"
    record("allowed", reason, answer.body_bytes, answer.status)
    return web.Response(status=answer.status, body=answer.body, headers=answer.headers)


def add_ingest_routes(app: web.Application) -> None:
    for signal in SIGNALS:
        app.router.add_post(f"/v1/{{signal:{signal}}}", handle_signal)
