"""The OTLP/HTTP door's own server for exports: one client connection, parsed by httptools.

aiohttp's server costs about 35 µs of CPU per request here (its request, router, middleware
and response objects) — a third of tracegate's whole per-request cost. An export needs none
of that: its head decides everything (``admit`` in ``ingest.export``), its body is streamed
upstream untouched, and its answer is one ``write``. So every ingest connection starts here,
and a request this module does not serve is handed, with the connection, to aiohttp:

* An export is ``POST /v1/traces|metrics|logs`` (no query string), HTTP/1.1 or 1.0, within
  the listener's header limits, with no ``Upgrade`` and no transfer coding but ``chunked``.
  It is identified, decided and forwarded by the same code as on aiohttp's route
  (``ingest.export``); ``Expect: 100-continue`` is refused or invited after the admission,
  as there.
* Anything else — a webhook, ``/v1/traceparent``, a malformed head, an HTTP/2 preface — is
  *handed off*: the bytes of that request, kept from the first byte of its head, are given
  to an aiohttp connection handler that takes over the transport, so it is answered (or
  refused, with its protocol-error count) exactly as before. A hand-off waits until this
  connection's earlier exports are answered.
* A request pipelined behind another in one read cannot be handed off (its first byte is
  somewhere in the middle of that read): when it is not an export, or is malformed, the
  connection is closed after the earlier answers — RFC 9112 §9.3.2 lets a server close a
  connection with pipelined requests unanswered, and the client retries them on a new one.

Body bytes go to an ``aiohttp.StreamReader`` that pauses this transport past 64 KiB, so an
upload streams upstream with backpressure, as on aiohttp's server. An answer given before
the body ended (a refusal) closes the connection after a short lingering read, so that the
client reads the answer rather than a reset.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, NoReturn, cast

import httptools
from aiohttp import StreamReader
from aiohttp.http_exceptions import TransferEncodingError
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.admission import Refused, admit
from proxy.answers import Answer
from proxy.errors import BodyError
from proxy.forward import declared_length
from proxy.ingest import export, refused_answer
from proxy.policy.model import SIGNALS
from proxy.protocol import Lane, internal_error

if TYPE_CHECKING:
    from proxy.runtime import Runtime

#: The export paths this server takes, by their exact bytes; the signal each names.
EXPORTS = {f"/v1/{signal}".encode(): signal for signal in SIGNALS}
#: A body's buffered bytes past which the transport pauses (aiohttp's StreamReader doubles it).
BODY_BUFFER = 64 * 1024
#: Exports parsed ahead of the one being answered (pipelining) before reading pauses.
MAX_QUEUED = 8
#: Bytes a head may take here; a longer one is handed to aiohttp, whose parser applies the
#: listener's per-line limits as the bytes come (httptools would gather a field first).
HEAD_LIMIT = 64 * 1024
#: After an answer given before the body ended: how long, and how much, is read and dropped
#: before the connection closes (closing with unread input would reset it under the answer).
LINGER_SECONDS = 2.0
LINGER_BYTES = 4 << 20
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_NO_QUERY: dict[str, str] = {}


class _Escape(Exception):
    """Raised in a parser callback to stop parsing; the connection's ``_escape`` says why."""


class Limits:
    """The listener's header limits (aiohttp's, so a head over them is handed to aiohttp,
    which refuses it with the same answer and protocol-error kind as always)."""

    def __init__(self, max_line: int, max_field: int, max_headers: int, idle_timeout: float) -> None:
        self.max_line, self.max_field, self.max_headers = max_line, max_field, max_headers
        self.idle_timeout = idle_timeout


class _Export:
    """One export's head and body; what ``forward`` reads (``forward.Upload``)."""

    __slots__ = ("complete", "content", "content_length", "headers", "http10", "keep_alive", "signal")

    def __init__(
        self, signal: str, headers: CIMultiDictProxy[str], content: StreamReader, keep_alive: bool, http10: bool
    ) -> None:
        self.signal, self.headers, self.content = signal, headers, content
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and "Transfer-Encoding" not in headers else None
        self.keep_alive, self.http10 = keep_alive, http10
        self.complete = False


class IngestConnection(asyncio.Protocol):
    def __init__(
        self, runtime: Runtime, limits: Limits, hand_off: Callable[[], asyncio.Protocol], lanes: set[Lane]
    ) -> None:
        self._runtime = runtime
        self._limits = limits
        self._make_handler = hand_off
        self._lanes = lanes
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._queue: collections.deque[_Export] = collections.deque()
        self._worker: asyncio.Task[None] | None = None
        self._parsing: _Export | None = None  # the export whose body is being parsed
        # The head being parsed: its URL, headers and size, and the raw reads since its
        # first byte when that was the first byte of a read (None for a pipelined head).
        self._url = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0  # reads given whole to the head being parsed (all but its first)
        self._heads = 0  # heads begun on this connection
        self._raw: list[bytes] | None = None
        self._between = True  # no request is being parsed
        self._fresh = False  # the read being parsed began between requests
        self._read: bytes = b""
        self._escape: str | None = None  # "hand-off" or "close"
        self._handoff: list[bytes] | None = None
        self._closing = False  # take no more requests: answer what is queued, then close
        self._dead = False  # the parser stopped: read nothing more
        self._tls = False
        self._reading_paused = False
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None
        # Idle since (loop time), while no request is being answered and no head is complete;
        # one timer per connection checks it, so a request costs no timer of its own.
        self._idle_since: float | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._lingered = 0

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        self._tls = transport.get_extra_info("sslcontext") is not None
        self._lanes.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._lanes.discard(self)
        self._cancel_timers()
        self._raw = self._handoff = None
        self._read = b""
        for request in self._queue:
            if not request.complete:
                request.content.set_exception(ConnectionResetError("the client closed the connection"))
        self._wake_writer()

    def eof_received(self) -> bool | None:
        if self._parsing is not None and not self._parsing.complete:
            self._parsing.content.set_exception(ConnectionResetError("the client ended the request early"))
            self._parsing = None
        self._dead = self._closing = True
        if self._worker is None and self.transport is not None:
            self.transport.close()
        # Over TCP the answers still owed can go out on the half-open connection; TLS closes
        # it whatever this returns (and warns when it is True).
        return None if self._tls else True

    def data_received(self, data: bytes) -> None:
        if self._linger is not None or self._dead:
            self._drop(len(data))
            return
        self._read, self._fresh = data, self._between
        try:
            self._feed(data)
        finally:
            self._read = b""  # only on_message_begin needs it: holding a 256 KiB read per connection costs

    def _feed(self, data: bytes) -> None:
        if self._raw is not None:
            self._raw.append(data)
        in_head, heads = not self._between and self._parsing is None, self._heads
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._stop("hand-off", "upgrade")  # not reached: on_headers_complete hands Upgrade off
            return
        except httptools.HttpParserCallbackError as exc:
            if self._escape is None:  # a callback of ours raised: a bug, guarded as on aiohttp's server
                internal_error(self._runtime.metrics, exc.__context__ or exc, "/v1/*")
            self._stop(self._escape, "pipelined-not-export")
            return
        except httptools.HttpParserError:
            self._malformed()
            return
        if in_head and heads == self._heads and not self._between and self._parsing is None:
            # All of this read went to a head begun before it and still not ended: count it.
            self._head_bytes += len(data)
            if self._head_bytes > HEAD_LIMIT:
                self._stop("hand-off" if self._raw is not None else "close", "pipelined-not-export")

    # -- flow control, as aiohttp.StreamReader expects of its protocol ----------------------

    @property
    def connected(self) -> bool:
        return self.transport is not None

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        """Read again, unless something else still holds reading: a hand-off waiting for the
        answers owed, a client not reading its answers, or a full pipeline."""
        if (
            self._reading_paused
            and self.transport is not None
            and self._handoff is None
            and not self._writing_paused
            and len(self._queue) <= MAX_QUEUED
        ):
            self._reading_paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()
        self.resume_reading()

    def _wake_writer(self) -> None:
        waiter, self._drained = self._drained, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._raw = [self._read] if self._fresh else None
        self._fresh = self._between = False
        self._url, self._fields, self._head_bytes = b"", [], 0
        self._heads += 1

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_line:
            self._escape_now("hand-off")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._parsing is not None:
            return  # a chunked body's trailer fields: dropped, as aiohttp's server does
        self._fields.append((name, value))
        if len(name) + len(value) + 2 > self._limits.max_field or len(self._fields) > self._limits.max_headers:
            self._escape_now("hand-off")

    def on_headers_complete(self) -> None:
        self._idle_since = None  # the idle time also bounds how long a head may take
        parser = self._parser
        signal = EXPORTS.get(self._url)
        version = parser.get_http_version()
        if signal is None or parser.get_method() != b"POST" or version not in ("1.1", "1.0") or parser.should_upgrade():
            self._escape_now("hand-off")
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in self._fields:
            headers.add(name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        coding = headers.getall("Transfer-Encoding", ())
        if coding and (len(coding) > 1 or coding[0].strip().lower() != "chunked"):
            self._escape_now("hand-off")
        self._raw = None
        content = StreamReader(self, BODY_BUFFER, loop=self._loop)  # type: ignore[arg-type]
        export = _Export(signal, CIMultiDictProxy(headers), content, parser.should_keep_alive(), version == "1.0")
        self._parsing = export
        self._queue.append(export)
        if len(self._queue) > MAX_QUEUED:
            self.pause_reading()
        if self._worker is None:
            self._worker = self._loop.create_task(self._serve())

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing.content.feed_data(body)

    def on_message_complete(self) -> None:
        self._between = True
        export = self._parsing
        if export is not None:
            self._parsing = None
            export.complete = True
            export.content.feed_eof()

    # -- stopping the parser ------------------------------------------------------------------

    def _escape_now(self, why: str) -> NoReturn:
        """Stop parsing: ``hand-off`` when this head's bytes are all kept, else ``close``."""
        self._escape = why if self._raw is not None else "close"
        raise _Escape

    def _malformed(self) -> None:
        if self._parsing is not None:  # broken framing inside a body: that export fails (400)
            self._parsing.content.set_exception(TransferEncodingError("malformed body framing"))
            self._parsing = None
            self._stop("close", None)
        else:  # a malformed head: aiohttp refuses it, when its bytes are all kept
            self._stop("hand-off" if self._raw is not None else "close", "bad-message")

    def _stop(self, why: str | None, kind: str | None) -> None:
        """The parser is done with this connection: hand it off, or answer what is owed and
        close it (counting ``kind`` in tracegate_protocol_errors_total)."""
        self._dead = True
        if self._parsing is not None:  # its body will not end now
            self._parsing.content.set_exception(ConnectionResetError("the request was cut off"))
            self._parsing = None
        if why == "hand-off" and self._raw is not None:
            self._handoff, self._raw = self._raw, None
            self.pause_reading()
            if self._worker is None:
                self._hand_off()
            return
        if kind is not None:
            self._runtime.metrics.child(self._runtime.metrics.protocol_errors, kind).inc()
        self._closing = True
        if self._worker is None:
            self._close_lingering()

    def _hand_off(self) -> None:
        """Give the transport, and the head's kept bytes, to an aiohttp connection handler."""
        transport, raw = self.transport, self._handoff or []
        self._lanes.discard(self)
        self._cancel_timers()
        self.transport, self._handoff, self._read = None, None, b""
        if transport is None or transport.is_closing():
            return
        handler = self._make_handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        for chunk in raw:
            handler.data_received(chunk)
        if self._reading_paused:
            transport.resume_reading()

    # -- answering --------------------------------------------------------------------------

    async def _serve(self) -> None:
        keep = True
        try:
            while keep and self._queue:
                request = self._queue[0]
                answer = await self._answer(request)
                self._queue.popleft()
                keep = self._write(request, answer)
                if keep and self._writing_paused:
                    await self._drain()  # the client reads its answers slower than it sends
                if keep and not self._dead:
                    self.resume_reading()
        finally:
            self._worker = None
        if not keep or self._closing:
            self._handoff = None
            self._close_lingering()
        elif self._handoff is not None:
            self._hand_off()
        else:
            self._arm_idle()

    async def _drain(self) -> None:
        while self._writing_paused and self.transport is not None:
            self._drained = self._loop.create_future()
            await self._drained

    async def _answer(self, request: _Export) -> Answer:
        """Admit, then forward: ``ingest.export``, as aiohttp's route does."""
        runtime = self._runtime
        content_type = request.headers.get("Content-Type")
        try:
            admitted = await admit(runtime, request.headers, _NO_QUERY, signal=request.signal, transport="http")
            expect = request.headers.get("Expect")
            if expect is not None and not request.http10:
                if expect.lower() != "100-continue":
                    return Answer(417, b"Expectation Failed", {"Content-Type": "text/plain"}, close=True)
                if isinstance(admitted, Refused):
                    return refused_answer(admitted, content_type, close=True)
                try:
                    declared_length(request, runtime.settings.max_body)
                except BodyError:
                    pass  # export() refuses it (413): the body is never invited
                else:
                    if self.transport is not None and not request.complete:
                        self.transport.write(_CONTINUE)
            if isinstance(admitted, Refused):
                return refused_answer(admitted, content_type)
            return await export(runtime, request, request.signal, admitted)
        except Exception as exc:  # noqa: BLE001 - the guard's one place, as on aiohttp's server
            return internal_error(runtime.metrics, exc, "/v1/" + request.signal)

    def _write(self, request: _Export, answer: Answer) -> bool:
        """Write ``answer``; whether the connection stays open for the next request (when
        closing, the last one owed says ``Connection: close``)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        last = self._closing and not self._queue
        keep = request.keep_alive and not answer.close and request.complete and not last
        head = [
            b"HTTP/1.0 " if request.http10 else b"HTTP/1.1 ",
            b"%d %s\r\n" % (answer.status, _REASONS.get(answer.status, b"")),
        ]
        for name, value in answer.headers.items():
            head.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        head.append(b"Content-Length: %d\r\nDate: %s\r\n" % (len(answer.body), _date()))
        if not keep:
            head.append(b"Connection: close\r\n")
        elif request.http10:
            head.append(b"Connection: keep-alive\r\n")
        head.append(b"\r\n")
        head.append(answer.body)
        transport.write(b"".join(head))
        if keep:
            return True
        self._closing = True
        return False

    # -- closing -------------------------------------------------------------------------------

    def _close_lingering(self) -> None:
        """Close, after reading and dropping what the client still sends for a little while."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for request in self._queue:
            request.content.set_exception(ConnectionResetError("the connection is closing"))
        self._queue.clear()
        if self._between and not self._dead:
            transport.close()
            return
        self._dead = True
        self._linger = self._loop.call_later(LINGER_SECONDS, transport.close)
        self.resume_reading()

    def _drop(self, size: int) -> None:
        self._lingered += size
        if self._lingered > LINGER_BYTES and self.transport is not None:
            self.transport.close()

    def _arm_idle(self) -> None:
        now = self._loop.time()
        self._idle_since = now
        if self._idle is None and self.transport is not None:
            self._idle = self._loop.call_at(now + self._limits.idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        self._idle = None
        transport, since = self.transport, self._idle_since
        if transport is None:
            return
        if since is not None and self._loop.time() >= since + self._limits.idle_timeout:
            transport.close()
            return
        # Busy, or idle for less than the timeout since: look again when it could expire.
        after = since if since is not None else self._loop.time()
        self._idle = self._loop.call_at(after + self._limits.idle_timeout, self._check_idle)

    def _cancel_timers(self) -> None:
        for timer in (self._idle, self._linger):
            if timer is not None:
                timer.cancel()
        self._idle = None

    # -- the listener's drain (protocol.EdgeServer) -------------------------------------------

    def close(self) -> None:
        """Stop taking requests: close now when idle, else after the answers owed."""
        self._closing = True
        if self._worker is None and self.transport is not None and self._between:
            self.transport.close()

    async def shutdown(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the answers owed, then close the connection."""
        worker = self._worker
        if worker is not None:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(worker)
            except TimeoutError:
                worker.cancel()
        if self.transport is not None:
            self.transport.close()


_date_cache: tuple[int, bytes] = (0, b"")


def _date() -> bytes:
    """The Date header's value, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode())
    return _date_cache[1]
