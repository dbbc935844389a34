"""The OTLP/HTTP door: ``POST /v1/traces``, ``/v1/metrics``, ``/v1/logs``.

Identify → decide is :func:`proxy.admission.admit`, shared with every other door; this
module only knows where HTTP puts the credential and the signal, and how an OTLP/HTTP
answer is written. Every refusal is answered before the body is read and before anything
is sent upstream; an accepted request is answered with the upstream's own status, body
and content type, so the client never sees a 2xx the upstream did not give.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from aiohttp import web

from proxy.admission import Admitted, Refused, admit
from proxy.answers import refusal
from proxy.errors import BodyError, UpstreamError
from proxy.forward import Forwarder
from proxy.runtime import Runtime
from proxy.stamp import media_type, stamp_for, stamp_http_body

log = logging.getLogger("tracegate")

RUNTIME = web.AppKey("runtime", Runtime)
SIGNALS = ("traces", "metrics", "logs")
#: Compressed or JSON bodies larger than this are stamped in a thread.
STAMP_INLINE_BYTES = 256 * 1024


async def handle_signal(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    signal = request.match_info["signal"]
    content_type = request.headers.get("Content-Type")
    admitted = await admit(runtime, request.headers, request.query, signal=signal, transport="http")
    if isinstance(admitted, Refused):
        return refusal(admitted.status, content_type, retry_after=admitted.retry_after)
    try:
        forwarder = runtime.forwarder
        if forwarder is None:
            raise RuntimeError("runtime not started")
        body = await stamped_body(request, forwarder, admitted) if admitted.account.stamp else None
        answer = await forwarder.forward(request, signal, admitted.account, body=body)
    except (BodyError, UpstreamError) as exc:
        admitted.record("failed", exc.reason)
        response = refusal(exc.status, content_type)
        if isinstance(exc, BodyError):
            response.force_close()  # the rest of the body is unread: do not keep the connection
        return response

    reason = "forwarded" if 200 <= answer.status < 300 else f"upstream-{answer.status}"
    admitted.record("allowed", reason, bytes_in=answer.body_bytes, upstream_status=answer.status)
    return web.Response(status=answer.status, body=answer.body, headers=answer.headers)


async def stamped_body(request: web.Request, forwarder: Forwarder, admitted: Admitted) -> bytes:
    """The request body with the account's verified attributes stamped on (see stamp.py).
    The protobuf splice costs about one copy of the body and runs here; decompressing,
    recompressing or re-encoding JSON past STAMP_INLINE_BYTES runs in a thread so the
    event loop keeps serving."""
    raw = await forwarder.read(request)
    encoding = request.headers.get("Content-Encoding")
    content_type = request.headers.get("Content-Type")
    work = partial(
        stamp_http_body,
        raw,
        stamp_for(admitted.account, admitted.identity),
        content_type=content_type,
        content_encoding=encoding,
        limit=forwarder.max_body,
    )
    heavy = encoding is not None or media_type(content_type) == "application/json"
    return await asyncio.to_thread(work) if heavy and len(raw) > STAMP_INLINE_BYTES else work()


def add_ingest_routes(app: web.Application) -> None:
    for signal in SIGNALS:
        app.router.add_post(f"/v1/{{signal:{signal}}}", handle_signal)
