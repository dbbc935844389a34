"""The ingest listener's HTTP/1.1 edge: what happens before, around and instead of a handler.

* A malformed request (aiohttp's parser refuses it) is answered with the status phrase
  alone — the parser's message can quote header bytes, an ``Authorization`` line among
  them — counted in ``tracegate_protocol_errors_total{kind}`` and logged as one short
  warning: a client's mistake is never an error-level line.
* An HTTP/2 connection preface (a gRPC exporter pointed at the OTLP/HTTP port) is answered
  in HTTP/2 — an empty SETTINGS frame, then GOAWAY ``HTTP_1_1_REQUIRED`` whose debug text
  names the gRPC port — so the exporter's error says what to change; it is counted as
  ``grpc-or-h2-on-http-port``.
* :func:`guard` is the last line: any exception a handler did not expect becomes a generic
  500 with the reason ``internal-error``, logged (type only) and counted. The test suite
  fails on any such line, so it stays a safety net and never a code path.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Protocol

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.typedefs import Middleware

from proxy.answers import Answer, response
from proxy.observe.metrics import Metrics

log = logging.getLogger("tracegate")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_H2_HTTP_1_1_REQUIRED = 0xD
#: Parser exceptions → the ``kind`` label; most specific first (they subclass each other).
_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (LineTooLong, "line-too-long"),
    (InvalidHeader, "invalid-header"),
    (BadHttpMethod, "bad-method"),
    (BadStatusLine, "bad-request-line"),
    (TransferEncodingError, "bad-transfer-encoding"),
    (ContentLengthError, "bad-content-length"),
    (BadHttpMessage, "bad-message"),
    (HttpProcessingError, "protocol-error"),
)


def _h2_goaway(debug: str) -> bytes:
    """An empty SETTINGS frame (the server preface) and a GOAWAY frame (RFC 9113 §6.8)."""
    settings = struct.pack(">I", 0)[1:] + bytes((0x4, 0x0)) + struct.pack(">I", 0)
    payload = struct.pack(">II", 0, _H2_HTTP_1_1_REQUIRED) + debug.encode()
    goaway = struct.pack(">I", len(payload))[1:] + bytes((0x7, 0x0)) + struct.pack(">I", 0) + payload
    return settings + goaway


def protocol_error_kind(exc: BaseException | None) -> str:
    for cls, kind in _KINDS:
        if isinstance(exc, cls):
            return kind
    return "protocol-error"


class EdgeRequestHandler(web.RequestHandler):
    """aiohttp's connection handler with tracegate's answers to malformed input."""

    metrics: Metrics
    grpc_hint: str
    _first_bytes = True

    def data_received(self, data: bytes) -> None:
        if self._first_bytes:
            self._first_bytes = False
            if data.startswith(H2_PREFACE[: len(data)]) and len(data) >= 3:
                self._refuse_h2()
                return
        super().data_received(data)

    def _refuse_h2(self) -> None:
        self.metrics.child(self.metrics.protocol_errors, "grpc-or-h2-on-http-port").inc()
        log.warning("HTTP/2 or gRPC client on the OTLP/HTTP port; %s", self.grpc_hint)
        if self.transport is not None:
            self.transport.write(_h2_goaway(f"tracegate: this port speaks OTLP/HTTP 1.1; {self.grpc_hint}"))
        self.force_close()

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if isinstance(exc, ConnectionError):
            # The client went away while an Expect handler (outside the middlewares) wrote.
            self.metrics.child(self.metrics.protocol_errors, "client-disconnected").inc()
        elif isinstance(exc, HttpProcessingError) or status != 500:
            kind = protocol_error_kind(exc) if status != 504 else "handler-timeout"
            self.metrics.child(self.metrics.protocol_errors, kind).inc()
            log.warning("malformed request refused", extra={"kind": kind, "status": status})
        else:
            self.metrics.unhandled_errors.inc()
            log.error("unhandled error", extra={"error_type": type(exc).__name__ if exc else None})
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had begun; the connection is closed")
        response = web.Response(status=status, text=HTTPStatus(status).phrase)
        response.force_close()
        return response


class Lane(Protocol):
    """A connection served outside aiohttp (``ingest_conn``): drained with the listener."""

    def close(self) -> None: ...

    async def shutdown(self, timeout: float) -> None: ...


#: Makes a listener's connections instead of aiohttp: given the server, whose ``handler()``
#: makes the aiohttp connection a lane hands a request off to, and whose ``lanes`` it joins.
LaneFactory = Callable[["EdgeServer"], asyncio.Protocol]


class EdgeServer(web.Server):
    metrics: Metrics
    grpc_hint: str
    lane: LaneFactory | None
    lanes: set[Lane]

    def handler(self) -> EdgeRequestHandler:
        handler = EdgeRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.metrics = self.metrics
        handler.grpc_hint = self.grpc_hint
        return handler

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        return self.handler() if self.lane is None else self.lane(self)

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        for lane in list(self.lanes):
            lane.close()

    async def shutdown(self, timeout: float | None = None) -> None:
        lanes = [lane.shutdown(timeout if timeout is not None else 60.0) for lane in list(self.lanes)]
        await asyncio.gather(super().shutdown(timeout), *lanes)


class EdgeRunner(web.AppRunner):
    """An AppRunner whose server makes :class:`EdgeRequestHandler` connections, or the
    ``lane``'s, which hand to those what they do not serve."""

    def __init__(
        self,
        app: web.Application,
        *,
        metrics: Metrics,
        grpc_hint: str,
        lane: LaneFactory | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(app, **kwargs)  # type: ignore[arg-type]
        self._metrics = metrics
        self._grpc_hint = grpc_hint
        self._lane = lane

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = EdgeServer  # same object and state; only how it makes handlers changes
        server.metrics = self._metrics  # type: ignore[attr-defined]
        server.grpc_hint = self._grpc_hint  # type: ignore[attr-defined]
        server.lane = self._lane  # type: ignore[attr-defined]
        server.lanes = set()  # type: ignore[attr-defined]
        return server


def guard(metrics: Metrics) -> Middleware:
    """A middleware: an exception no handler expected becomes a generic 500 (reason
    ``internal-error``), logged by type only — never a traceback, which could quote a
    token — and counted in ``tracegate_unhandled_errors_total``."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except ConnectionError:
            # The client broke off while we read or wrote: its doing, not a bug of ours.
            metrics.child(metrics.protocol_errors, "client-disconnected").inc()
            return _closing(400)
        except Exception as exc:  # noqa: BLE001 - the one place that catches what nothing else expected
            return response(internal_error(metrics, exc, request.path))

    return middleware


def internal_error(metrics: Metrics, exc: BaseException, path: str) -> Answer:
    """What the guard answers for an exception nothing expected: logged by type only, counted."""
    metrics.unhandled_errors.inc()
    log.error("unhandled error", extra={"error_type": type(exc).__name__, "path": path})
    return Answer(500, b'{"accepted": false, "reason": "internal-error"}', {"Content-Type": "application/json"}, True)


def expect_refusal(
    refuses: Callable[[web.Request], Awaitable[bool]], limit: Callable[[web.Request], int]
) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    """An ``Expect: 100-continue`` handler that invites the body only if the route would take
    it. When ``refuses(request)`` is true — no credential, a bad one, missing headers — or the
    declared Content-Length is over ``limit(request)``, the route's own handler answers at
    once: each handler refuses those cases before reading the body, so the refusal is the
    same answer, audit line and count as without ``Expect``, and the body is never invited."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        declared = request.content_length
        if await refuses(request) or (declared is not None and declared > limit(request)):
            response = await request.match_info.handler(request)
            response.force_close()
            return response
        return await send_continue(request)

    return expect


async def send_continue(request: web.BaseRequest) -> web.StreamResponse | None:
    """What aiohttp's default ``Expect`` handler does: ``100 Continue`` for HTTP/1.1
    ``100-continue``, 417 for any other expectation. A client gone by then is no error."""
    if request.version != (1, 1):
        return None
    if request.headers.get("Expect", "").lower() != "100-continue":
        return _closing(417)
    try:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    except ConnectionError:
        return _closing(400)  # the client is gone; this answer will not be delivered either
    request.writer.output_size = 0  # the answer proper has not begun
    return None


def _closing(status: int) -> web.Response:
    response = web.Response(status=status, text=HTTPStatus(status).phrase)
    response.force_close()
    return response
