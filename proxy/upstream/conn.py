"""One upstream HTTP/1.1 connection of :mod:`proxy.upstream.pool`: an asyncio protocol whose
answers httptools (llhttp) parses, with the state of the one exchange in flight.

It keeps only the answer headers it is told to relay (first value of each), the status and
the body up to a limit; ``1xx`` interim answers are skipped; an answer without
Content-Length or chunked framing ends at EOF; bytes nobody asked for, a parse error or an
EOF mid-answer fail the exchange as ``upstream-unreachable`` (502). Writing stops while the
transport is over its high-water mark (``pause_writing``) until it drains.

The rules that keep one client's answer from reaching another (SECURITY.md, "The two
HTTP/1.1 legs"), each at least as strict as aiohttp's client, which this replaced:

* **One answer per exchange, then nothing.** Once the final answer is complete, any byte
  after it — in the same read (a body longer than its Content-Length, a 204 or 304 with a
  body, a second answer appended) or in a later one — ends the connection: the answer
  already complete is relayed alone and the connection is never pooled again. The next
  answer is never parsed into the one in flight (llhttp's ``on_message_begin`` would start
  it over). Before a pooled connection is written to again, :meth:`stale` looks at the
  socket: a byte or an EOF waiting there closes it instead (RFC 9112 §9.3: an answer can
  only follow a request).
* **A valid status or none.** A final status outside 100–599 (RFC 9110 §15: three digits,
  first 1–5) and a ``101 Switching Protocols`` nobody asked for (RFC 9110 §15.2.2) are a
  502; no status line is relayed that tracegate did not validate.
* **Bounded heads.** An answer head (status line and fields) over :data:`HEAD_LIMIT`, a
  line over :data:`MAX_LINE` or more than :data:`MAX_FIELDS` fields is a 502
  (``upstream-answer-too-large``), as aiohttp's client refuses them (8190 bytes a line,
  128 fields). httptools gathers a field before calling back, so the head is also counted
  read by read: memory held for a head is at most ``HEAD_LIMIT`` plus one read.
* **Nothing escapes ``data_received``.** Every exception llhttp or a callback can raise
  (``HttpParserError`` and its kinds, ``HttpParserUpgrade``) fails the exchange there.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, cast

import httptools

from proxy.errors import UpstreamError

#: Bytes an answer head may take (status line and every field), and one line of it, and the
#: number of fields: aiohttp's client allows 8190 bytes a line and 128 fields; the whole
#: head is held here to 64 KiB (nginx's ``proxy_buffer_size`` is 4 or 8 KiB).
HEAD_LIMIT: Final = 64 * 1024
MAX_LINE: Final = 8190
MAX_FIELDS: Final = 128
_PEEK: Final = socket.MSG_PEEK | socket.MSG_DONTWAIT

#: Answer headers kept (lower-cased name → the spelling relayed).
Relayed = Mapping[bytes, str]


def unreachable() -> UpstreamError:
    return UpstreamError("upstream-unreachable", 502)


def too_large() -> UpstreamError:
    return UpstreamError("upstream-answer-too-large", 502)


class _Trailing(Exception):
    """Raised in a parser callback when a second message starts after the final answer."""


@dataclass(frozen=True)
class PoolAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


class UpstreamConnection(asyncio.Protocol):
    """One upstream connection: a transport, an llhttp response parser, and the state of
    the one exchange in flight (HTTP/1.1 without pipelining)."""

    def __init__(
        self, key: tuple[str, int, bool], on_lost: Callable[[UpstreamConnection], None], sock: socket.socket
    ) -> None:
        self._on_lost = on_lost
        self._sock = sock
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self.paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._relayed: Relayed = {}
        self._max_answer = 0
        # The exchange in flight.
        self.busy = False
        self.done = False
        self.failure: UpstreamError | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._interim = False
        self._eof_body = False
        self._framed = False
        self.keep_alive = False
        # The answer head being parsed: reads given to it after its first, bytes seen by
        # the callbacks, and fields.
        self._in_head = False
        self._head_reads = 0
        self._head_size = 0
        self._fields = 0
        self._coded = False  # a Transfer-Encoding field (faulty framing in HTTP/1.0)
        self._close = False  # a Connection field naming close

    # --- the exchange ---------------------------------------------------------------

    def begin(self, relayed: Relayed, max_answer: int) -> None:
        self.busy, self.done, self.failure = True, False, None
        self.status, self.headers, self._body, self._size = 0, {}, [], 0
        self._relayed, self._max_answer = relayed, max_answer

    def answer(self) -> PoolAnswer:
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        return PoolAnswer(self.status, self.headers, body)

    def stale(self) -> bool:
        """True when an idle connection has something to say before it was asked: bytes
        (never an answer to the request about to be written) or an EOF. One non-blocking
        ``MSG_PEEK`` of the socket; under TLS the peeked bytes are records, so a late
        session ticket costs a new connection, never a mixed answer."""
        if self.closed:
            return True
        try:
            self._sock.recv(1, _PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True  # b"" is an EOF; anything else, bytes nobody asked for

    def finished(self) -> bool:
        return self.done or self.failure is not None

    def refused(self) -> bool:
        """Stop sending the body: the exchange failed, or the upstream answered before the
        body ended with an error or with the connection closing (RFC 9112 §9.3). An early
        2xx on a kept-alive connection (nginx's ``return 200`` discards the body) gets the
        rest of the body, so the connection stays usable."""
        if self.failure is not None or self.closed:
            return True
        return self.done and not (self.keep_alive and 200 <= self.status < 300)

    def write(self, data: bytes) -> None:
        if self.transport is None or self.closed:
            raise ConnectionResetError("upstream connection closed")
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the send buffer is over its high-water mark, unless the answer came
        or the connection ended meanwhile (the caller checks which)."""
        while self.paused and not self.closed and not self.refused():
            self._waiter = self._loop.create_future()
            await self._waiter

    async def wait_answer(self) -> None:
        while not self.finished():
            self._waiter = self._loop.create_future()
            await self._waiter

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, failure: UpstreamError) -> None:
        if not self.done and self.failure is None:
            self.failure = failure
        self.close()
        self._wake()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # create_connection gives a stream transport

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.finished():
            self._fail(unreachable())  # bytes nobody asked for: the connection is unusable
            return
        if self._in_head:
            self._head_reads += len(data)
            if self._head_reads > HEAD_LIMIT:
                self._fail(too_large())
                return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # A callback's own exception comes as the context of a callback error.
            cause = exc.__context__
            if isinstance(cause, _Trailing):  # bytes after the final answer: it stands alone
                self.keep_alive = False
                self.close()
            else:
                self._fail(cause if isinstance(cause, UpstreamError) else unreachable())
                return
        if self.done:
            self._wake()

    def eof_received(self) -> bool:
        # An answer without Content-Length or chunked framing ends at EOF (llhttp has no
        # finish call in httptools); any other EOF mid-answer means the answer is lost.
        if self.busy and self._eof_body and not self.done and self.failure is None:
            self.done, self.keep_alive = True, False
        self._fail(unreachable())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.paused = False
        if self.busy and not self.done:
            if self._eof_body and exc is None and self.failure is None:
                self.done, self.keep_alive = True, False
            else:
                self._fail(unreachable())
        self._wake()
        self._on_lost(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    # --- httptools callbacks -------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done or self.failure is not None:
            raise _Trailing  # never start the next answer over the one in flight
        self.headers, self._body, self._size = {}, [], 0
        self._interim = self._eof_body = self._framed = False
        self._in_head, self._head_reads, self._head_size, self._fields = True, 0, 0, 0
        self._coded = self._close = False

    def on_status(self, status: bytes) -> None:
        self._head_size += len(status) + 13
        if self._head_size > MAX_LINE:
            raise too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        line = len(name) + len(value) + 4
        self._head_size += line
        self._fields += 1
        if line > MAX_LINE or self._fields > MAX_FIELDS or self._head_size > HEAD_LIMIT:
            raise too_large()
        lower = name.lower()
        if lower in (b"content-length", b"transfer-encoding"):
            self._framed = True
            if lower == b"transfer-encoding":
                self._coded = True
        elif lower == b"connection" and b"close" in value.lower():
            self._close = True  # "close" wins over any "keep-alive" beside it (RFC 9112 §9.6)
        spelling = self._relayed.get(lower)
        if spelling is not None and spelling not in self.headers:
            self.headers[spelling] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._in_head = False
        status = self._parser.get_status_code()
        if not 100 <= status <= 599 or status == 101:
            raise unreachable()
        self._interim = 100 <= status < 200
        if not self._interim:
            self.status = status
            self._eof_body = not self._framed and status not in (204, 304)

    def on_body(self, body: bytes) -> None:
        if self._interim or self.failure is not None:
            return
        self._size += len(body)
        if self._size > self._max_answer:
            self._fail(UpstreamError("upstream-answer-too-large", 502))
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._interim:  # 100 Continue and other 1xx: the real answer follows
            self._interim = False
            return
        if self.failure is None:
            self.done = True
            # An HTTP/1.0 answer with Transfer-Encoding has faulty framing: close after it
            # (RFC 9112 §6.1), whatever its Connection header says.
            faulty = self._coded and self._parser.get_http_version() == "1.0"
            self.keep_alive = self._parser.should_keep_alive() and not self._close and not faulty
