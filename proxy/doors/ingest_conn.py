"""The OTLP/HTTP door's own server for exports: one client connection, parsed by httptools.

aiohttp's server costs about 35 µs of CPU per request here (its request, router, middleware
and response objects) — a third of tracegate's whole per-request cost. An export needs none
of that: its head decides everything (``admit`` in ``ingest.export``), its body is streamed
upstream untouched, and its answer is one ``write``. So every ingest connection starts here,
and a request this module does not serve is handed, with the connection, to aiohttp:

* An export is ``POST /v1/traces|metrics|logs`` (no query string), within the listener's
  header limits, with no ``Upgrade``. It is identified, decided and forwarded by the same
  code as on aiohttp's route (``ingest.export``); ``Expect: 100-continue`` is refused or
  invited after the admission, as there.
* Anything else — a webhook, ``/v1/traceparent``, a malformed head, an HTTP/2 preface — is
  *handed off*: the bytes of that request, kept from the first byte of its head, are given
  to an aiohttp connection handler that takes over the transport, so it is answered (or
  refused, with its protocol-error count) exactly as before. A hand-off waits until this
  connection's earlier exports are answered.
* A request pipelined behind another in one read cannot be handed off (its first byte is
  somewhere in the middle of that read): when it is not an export, or is malformed, the
  connection is closed after the earlier answers — RFC 9112 §9.3.2 lets a server close a
  connection with pipelined requests unanswered, and the client retries them on a new one.

**At least as strict as aiohttp, input by input**: every head that ends here is checked
by :mod:`proxy.doors.head_rules` before it is served *or handed off*, so nothing reaches
aiohttp unchecked but what its own parser refuses (that module lists the rules).

**Every buffer is bounded** (a read is at most 256 KiB):

* A head: its URL, each field and their count are held to the listener's limits (8190,
  8190 and 100; over them it is handed to aiohttp, whose parser refuses it on the same
  sums). httptools gathers a field before calling back, so the reads given whole to a head
  are counted too: past ``HEAD_LIMIT`` (64 KiB), 431. Held: 64 KiB and two reads, the
  bytes kept for a hand-off included.
* A chunked body's trailer section: each field, and their count with the head's, are held
  to aiohttp's limits (8190 bytes, 100 fields); the reads given whole to one field (or one
  chunk-size line) to 8190 bytes, as the field arrives (one that never ended grew to 162
  MiB, in quadratic time). Over them the export fails, 400 and closing, as aiohttp refuses
  it (``line-too-long``, ``bad-message``). Held: 8190 bytes and a read.
* A body: its ``StreamReader`` pauses reading past twice :data:`BODY_BUFFER`, and reading
  resumes only for the export being answered. Held: 128 KiB and a read, an export.
* The pipeline: reading pauses past :data:`MAX_QUEUED` exports; a read holding more
  requests than :data:`MAX_PIPELINED` (aiohttp's queue) closes the connection after their
  answers (``pipeline-overflow``). Held: 32 parsed requests (about 2 KB each).
* Answers: past the transport's high-water mark, writing pauses reading; a client that
  takes no byte for the idle timeout while writing is paused, or while the connection is
  closing, is cut off (``send-timeout``). Held: 64 KiB and one answer (4 MiB at most).
* After a refusal, what the client still sends is read and dropped (4 MiB, 2 s), not held.

Body bytes go to an ``aiohttp.StreamReader``, so an upload streams upstream with
backpressure, as on aiohttp's server. An answer given before the body ended (a refusal)
closes the connection after a short lingering read, so that the client reads the answer
rather than a reset. No exception of the parser or a callback leaves ``data_received``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, NoReturn, cast

import httptools
from aiohttp import StreamReader
from aiohttp.http_exceptions import BadHttpMessage, TransferEncodingError
from aiohttp.streams import EMPTY_PAYLOAD
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.answers import Answer, refusal_answer
from proxy.doors.head_rules import BAD_CODING, REFUSALS, TRANSFER_ENCODING, Limits, refusal_of, says_close
from proxy.doors.ingest import export, refused_answer
from proxy.doors.protocol import Lane, internal_error
from proxy.errors import BodyError
from proxy.gate.admission import Refused, admit
from proxy.policy.model import SIGNALS
from proxy.upstream.forward import declared_length

if TYPE_CHECKING:
    from proxy.gate.runtime import Runtime

log = logging.getLogger("tracegate")

#: The export paths this server takes, by their exact bytes; the signal each names.
EXPORTS = {f"/v1/{signal}".encode(): signal for signal in SIGNALS}
#: A body's buffered bytes past which the transport pauses (aiohttp's StreamReader doubles it).
BODY_BUFFER = 64 * 1024
#: Exports parsed ahead of the one being answered (pipelining) before reading pauses.
MAX_QUEUED = 8
#: Requests parsed ahead in one read (aiohttp's queue); one more closes the connection.
MAX_PIPELINED = 32
#: Bytes of reads given whole to a head before it is refused (431): httptools gathers a
#: field before calling back, so a field still arriving is only seen as reads.
HEAD_LIMIT = 64 * 1024
#: After an answer given before the body ended: how long, and how much, is read and dropped
#: before the connection closes (closing with unread input would reset it under the answer).
LINGER_SECONDS = 2.0
LINGER_BYTES = 4 << 20
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_NO_QUERY: dict[str, str] = {}
_NO_HEADERS: Final = CIMultiDictProxy(CIMultiDict[str]())


class _Escape(Exception):
    """Raised in a parser callback to stop parsing; the connection's ``_escape`` says why."""


class _Export:
    """One export's head and body; what ``forward`` reads (``forward.Upload``). A request
    refused at the door is one too, answered with ``refusal``."""

    __slots__ = ("complete", "content", "content_length", "headers", "http10", "keep_alive", "refusal", "signal")

    def __init__(
        self,
        signal: str,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
        keep_alive: bool,
        http10: bool,
        refusal: Answer | None = None,
    ) -> None:
        self.signal, self.headers, self.content = signal, headers, content
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and "Transfer-Encoding" not in headers else None
        self.keep_alive, self.http10 = keep_alive, http10
        self.refusal = refusal
        self.complete = refusal is not None


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
        self._trailers = 0  # trailer fields of the body being parsed
        self._framing = 0  # reads given whole to one chunk-size line or trailer field
        self._raw: list[bytes] | None = None
        self._between = True  # no request is being parsed
        self._fresh = False  # the read being parsed began between requests
        self._read: bytes = b""
        self._escape: str | None = None  # "hand-off" or "close"
        self._kind: str | None = None  # the protocol-error kind of a "close"
        self._handoff: list[bytes] | None = None
        self._closing = False  # take no more requests: answer what is queued, then close
        self._dead = False  # the parser stopped: read nothing more
        self._tls = False
        self._reading_paused = False
        self._writing_paused = False
        self._paused_at = 0.0  # loop time writing paused at
        self._drained: asyncio.Future[None] | None = None
        # Idle since (loop time), while no request is being answered and no head is complete;
        # one timer per connection checks it (and the send timeout), so a request costs no timer.
        self._idle_since: float | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._cutoff: asyncio.TimerHandle | None = None
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
        if self._worker is None:
            self._shut()
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
        parsing, in_head, heads = self._parsing, not self._between and self._parsing is None, self._heads
        if parsing is not None:
            body, trailers = parsing.content.total_bytes, self._trailers
        else:
            body = trailers = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._stop("hand-off", "upgrade")  # not reached: on_headers_complete hands Upgrade off
            return
        except httptools.HttpParserCallbackError as exc:
            if self._escape is None:
                if isinstance(exc.__context__, httptools.HttpParserError):  # httptools' own check
                    self._malformed()
                    return
                # A callback of ours raised: a bug, guarded as on aiohttp's server.
                internal_error(self._runtime.metrics, exc.__context__ or exc, "/v1/*")
            self._stop(self._escape, self._kind)
            return
        except httptools.HttpParserError:
            self._malformed()
            return
        if parsing is not None:
            if parsing is not self._parsing or parsing.content.total_bytes != body or trailers != self._trailers:
                self._framing = 0
                return
            # All of this read went to a chunked body's framing, none to its body: one chunk-size
            # line or one trailer field, gathered by httptools until it ends.
            self._framing += len(data)
            if self._framing > self._limits.max_field:
                self._fail_body()
                self._stop("close", "line-too-long")
        elif in_head and heads == self._heads and not self._between and self._parsing is None:
            # All of this read went to a head begun before it and still not ended: count it.
            self._head_bytes += len(data)
            if self._head_bytes > HEAD_LIMIT:
                self._refuse(431, "head-too-large", self._parser.get_http_version() == "1.0")
                self._stop("close", "head-too-large")

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
        answers owed, a client not reading its answers, a full pipeline, or a body being
        parsed behind the one being answered (nobody reads it yet)."""
        parsing, queue = self._parsing, self._queue
        if (
            self._reading_paused
            and self.transport is not None
            and self._handoff is None
            and not self._writing_paused
            and len(queue) <= MAX_QUEUED
            and (parsing is None or not queue or parsing is queue[0])
        ):
            self._reading_paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._paused_at = now = self._loop.time()
        self.pause_reading()
        due = now + self._limits.idle_timeout  # the send timeout: see _check_idle
        if self._idle is not None and self._idle.when() > due:
            self._idle.cancel()
            self._idle = self._loop.call_at(due, self._check_idle)

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
        if self._closing:  # after a request that closes the connection, or on drain: read no more
            self._escape_now("close", None)
        self._raw = [self._read] if self._fresh else None
        self._fresh = self._between = False
        self._url, self._fields, self._head_bytes = b"", [], 0
        self._heads += 1

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_line:
            self._escape_now("hand-off")

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self._limits
        if self._parsing is not None:  # a chunked body's trailer field: dropped, as aiohttp's server does
            self._trailers += 1
            if len(name) + len(value) > limits.max_field:
                self._fail_body()
                self._escape_now("close", "line-too-long")
            if len(self._fields) + self._trailers > limits.max_headers:
                self._fail_body()
                self._escape_now("close", "bad-message")
            return
        self._fields.append((name, value))
        if len(name) + len(value) > limits.max_field or len(self._fields) > limits.max_headers:
            self._escape_now("hand-off")  # aiohttp refuses it: the same sums, the same limits

    def on_headers_complete(self) -> None:
        self._idle_since = None  # the idle time also bounds how long a head may take
        parser = self._parser
        version = parser.get_http_version()
        http10 = version == "1.0"
        if not http10 and version != "1.1":
            self._refuse_now(505, "bad-http-version", False)
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in self._fields:
            headers.add(name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        refusal = refusal_of(headers, http10)
        if refusal is not None:
            self._refuse_now(refusal[0], refusal[1], http10)
        coded = http10 and TRANSFER_ENCODING in headers  # RFC 9112 §6.1: close after the answer
        signal = EXPORTS.get(self._url)
        if signal is None or parser.get_method() != b"POST" or parser.should_upgrade():
            if coded:  # aiohttp would keep the connection
                self._refuse_now(*BAD_CODING, http10)
            self._escape_now("hand-off")
        if len(self._queue) >= MAX_PIPELINED:
            self._escape_now("close", "pipeline-overflow")
        self._raw = None
        self._trailers = self._framing = 0
        content = StreamReader(self, BODY_BUFFER, loop=self._loop)  # type: ignore[arg-type]
        keep_alive = parser.should_keep_alive() and not coded
        if keep_alive and http10 and says_close(headers):  # llhttp lets keep-alive win (RFC 9112 §9.3: close does)
            keep_alive = False
        export = _Export(signal, CIMultiDictProxy(headers), content, keep_alive, http10)
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
            if not export.keep_alive:
                self._closing = True

    # -- stopping the parser ------------------------------------------------------------------

    def _escape_now(self, why: str, kind: str | None = "pipelined-not-export") -> NoReturn:
        """Stop parsing: ``hand-off`` when this head's bytes are all kept, else ``close``
        (counting ``kind``)."""
        self._escape = why if why != "hand-off" or self._raw is not None else "close"
        self._kind = kind
        raise _Escape

    def _refuse(self, status: int, kind: str, http10: bool) -> None:
        """Answer ``status`` after the answers owed, then close: the head is refused here and
        nothing of it goes further (the caller stops the parser, counting ``kind``)."""
        self._raw = None
        self._queue.append(_Export("", _NO_HEADERS, EMPTY_PAYLOAD, False, http10, REFUSALS[status]))
        log.warning("malformed request refused", extra={"kind": kind, "status": status})
        if self._worker is None:
            self._worker = self._loop.create_task(self._serve())

    def _refuse_now(self, status: int, kind: str, http10: bool) -> NoReturn:
        self._refuse(status, kind, http10)
        self._escape_now("close", kind)

    def _fail_body(self) -> None:
        """The chunked body being parsed broke aiohttp's limits on trailers: its export
        fails (``body-incomplete``, 400 and closing, as aiohttp refuses it)."""
        export, self._parsing = self._parsing, None
        if export is not None:
            export.content.set_exception(BadHttpMessage("trailer section over the listener's limits"))

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
                refusal = request.refusal
                answer = refusal if refusal is not None else await self._answer(request)
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
        closing, the last one owed says ``Connection: close``). Its status line is written
        only for a final status, 200 to 599 (RFC 9110 §15: a 1xx is interim, and the client
        would take the next answer for this one's); any other answer is a 502."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        status = answer.status
        if status.__class__ is not int or not 200 <= status <= 599:
            log.warning("answer with an invalid status replaced", extra={"status": repr(status)[:8]})
            answer = refusal_answer(502, request.headers.get("Content-Type"), close=True)
            status = 502
        last = self._closing and not self._queue
        keep = request.keep_alive and not answer.close and request.complete and not last
        head = [b"HTTP/1.0 " if request.http10 else b"HTTP/1.1 ", b"%d %s\r\n" % (status, _REASONS.get(status, b""))]
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
            self._shut()
            return
        self._dead = True
        self._linger = self._loop.call_later(LINGER_SECONDS, self._shut)
        self.resume_reading()

    def _drop(self, size: int) -> None:
        self._lingered += size
        if self._lingered > LINGER_BYTES:
            self._shut()

    def _shut(self) -> None:
        """Close once what is written has gone out; a client that takes none of it for the
        idle timeout is cut off (closing waits for the write buffer, for ever)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        if transport.get_write_buffer_size() and self._cutoff is None:
            self._cutoff = self._loop.call_later(self._limits.idle_timeout, self._cut_off)

    def _cut_off(self) -> None:
        """The send timeout: the client has not read its answers for the idle timeout."""
        transport = self.transport
        self._cancel_timers()
        if transport is not None:
            self._runtime.metrics.child(self._runtime.metrics.protocol_errors, "send-timeout").inc()
            transport.abort()

    def _arm_idle(self) -> None:
        now = self._loop.time()
        self._idle_since = now
        if self._idle is None and self.transport is not None:
            self._idle = self._loop.call_at(now + self._limits.idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        """Close a connection idle for the idle timeout; cut off one whose writing has been
        paused that long (the send timeout)."""
        self._idle = None
        transport, since, timeout = self.transport, self._idle_since, self._limits.idle_timeout
        if transport is None:
            return
        now = self._loop.time()
        if self._writing_paused and now >= self._paused_at + timeout:
            self._cut_off()
            return
        if since is not None and now >= since + timeout:
            self._shut()
            return
        # Busy, or idle for less than the timeout since: look again when it could expire.
        after = since if since is not None else now
        if self._writing_paused:
            after = min(after, self._paused_at)
        self._idle = self._loop.call_at(after + timeout, self._check_idle)

    def _cancel_timers(self) -> None:
        for timer in (self._idle, self._linger, self._cutoff):
            if timer is not None:
                timer.cancel()
        self._idle = self._cutoff = None

    # -- the listener's drain (protocol.EdgeServer) -------------------------------------------

    def close(self) -> None:
        """Stop taking requests: close now when idle, else after the answers owed."""
        self._closing = True
        if self._worker is None and self._between:
            self._shut()

    async def shutdown(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the answers owed, then close the connection."""
        worker = self._worker
        if worker is not None:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(worker)
            except TimeoutError:
                worker.cancel()
        self._shut()


_date_cache: tuple[int, bytes] = (0, b"")


def _date() -> bytes:
    """The Date header's value, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode())
    return _date_cache[1]
