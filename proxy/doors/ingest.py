"""The OTLP/HTTP door: ``POST /v1/traces``, ``/v1/metrics``, ``/v1/logs``.

Identify → decide is :func:`proxy.gate.admission.admit`, shared with every other door; this
module only knows where HTTP puts the credential and the signal, and how an OTLP/HTTP
answer is written. Every refusal is answered before the body is read and before anything
is sent upstream — with ``Expect: 100-continue``, before the body is even invited — and an
accepted request is answered with the upstream's own status, body and content type, so
the client never sees a 2xx the upstream did not give.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial

from aiohttp import web

from proxy.answers import Answer, refusal_answer, response
from proxy.doors.protocol import expect_refusal
from proxy.errors import BodyError, UpstreamError
from proxy.gate.admission import Admitted, Refused, admit
from proxy.gate.runtime import Runtime
from proxy.policy.model import SIGNALS
from proxy.upstream.forward import Forwarder, Upload
from proxy.upstream.stamp import media_type, stamp_for, stamp_http_body

log = logging.getLogger("tracegate")

RUNTIME = web.AppKey("runtime", Runtime)
ADMISSION = web.RequestKey("admission", object)
#: Compressed or JSON bodies larger than this are stamped in a thread.
STAMP_INLINE_BYTES = 256 * 1024


async def admit_http(request: web.Request, *, signal: str, mode: str = "ingest") -> Admitted | Refused:
    """The request's admission, made once: by its ``Expect`` handler when the client asked
    before sending the body, else now."""
    found = request.get(ADMISSION)
    if isinstance(found, (Admitted, Refused)):
        return found
    admitted = await admit(
        request.app[RUNTIME], request.headers, request.query, signal=signal, transport="http", mode=mode
    )
    request[ADMISSION] = admitted
    return admitted


def expect_admitted(
    signal_of: Callable[[web.Request], str], limit: Callable[[web.Request], int], *, mode: str = "ingest"
) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    """An ``Expect: 100-continue`` handler that admits the request first (the handler reuses
    that admission): a refused or oversized one is answered without inviting the body."""

    async def refuses(request: web.Request) -> bool:
        return isinstance(await admit_http(request, signal=signal_of(request), mode=mode), Refused)

    return expect_refusal(refuses, limit)


def refused_answer(refused: Refused, content_type: str | None, *, close: bool = False) -> Answer:
    return refusal_answer(refused.status, content_type, retry_after=refused.retry_after, close=close)


async def handle_signal(request: web.Request) -> web.StreamResponse:
    signal = request.match_info["signal"]
    admitted = await admit_http(request, signal=signal)
    if isinstance(admitted, Refused):
        return response(refused_answer(admitted, request.headers.get("Content-Type")))
    return response(await export(request.app[RUNTIME], request, signal, admitted))


async def export(runtime: Runtime, request: Upload, signal: str, admitted: Admitted) -> Answer:
    """Forward an admitted export and say how to answer it: the upstream's own status, body
    and content type, or tracegate's refusal when the body or the upstream failed. Shared
    by both servers of the OTLP/HTTP door (aiohttp's, and ``ingest_conn``'s)."""
    content_type = request.headers.get("Content-Type")
    try:
        forwarder = runtime.forwarder
        if forwarder is None:
            raise RuntimeError("runtime not started")
        body = await stamped_body(request, forwarder, admitted) if admitted.account.stamp else None
        answer = await forwarder.forward(request, signal, admitted.account, body=body)
    except (BodyError, UpstreamError) as exc:
        admitted.record("failed", exc.reason)
        # After a body error the rest of the body is unread: do not keep the connection.
        return refusal_answer(exc.status, content_type, close=isinstance(exc, BodyError))
    reason = "forwarded" if 200 <= answer.status < 300 else f"upstream-{answer.status}"
    admitted.record("allowed", reason, bytes_in=answer.body_bytes, upstream_status=answer.status)
    return Answer(answer.status, answer.body, answer.headers)


async def stamped_body(request: Upload, forwarder: Forwarder, admitted: Admitted) -> bytes:
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
    expect = expect_admitted(lambda request: request.match_info["signal"], lambda r: r.app[RUNTIME].settings.max_body)
    for signal in SIGNALS:
        app.router.add_post(f"/v1/{{signal:{signal}}}", handle_signal, expect_handler=expect)
