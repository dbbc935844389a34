"""Peers and the reference for tests/test_http1_differential.py.

h11 is the reference HTTP/1.1 implementation on both legs: it is strict, small and shares no
code with llhttp, which tracegate's export server and its upstream pool both parse with, so
where the two disagree the question is worth asking. Where h11 is laxer or stricter than RFC
9112 on a point that decides framing or persistence, the reference follows the RFC, and says
where (``_must_close``, the version check, ``h11_client``'s HTTP/1.0 keep-alive).

Beside it: a raw client that writes a byte stream to tracegate in pieces and reads every
answer, and a raw upstream that answers each request with the bytes a test chose for it and
tells which connections were reused after an answer that should have ended them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field

import h11
import httptools

# -- the reference: h11 as the server (the client leg) --------------------------------------


@dataclass
class Parsed:
    """One request h11 read to its end."""

    version: bytes
    headers: list[tuple[bytes, bytes]]  # lower-case names, in order
    body: bytes = b""
    must_close: bool = False


@dataclass
class ServerVerdict:
    """What h11, as a server, makes of a client's whole byte stream followed by EOF."""

    requests: list[Parsed]  # read to their end, in order; parsing stops after a must-close one
    error: str | None  # why h11 refused the rest of the stream (None: it did not)

    @property
    def closed(self) -> bool:
        """Whether parsing stopped because a request needs the connection closed after it."""
        return bool(self.requests) and self.requests[-1].must_close


def _tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    return {token.strip().lower() for n, v in headers if n == name for token in v.split(b",")}


def close_reason(request: Parsed) -> str:
    """Why a request must close its connection, in a word (for a failure's name)."""
    names = {name for name, _ in request.headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        return "content-length+transfer-encoding"
    if b"close" in _tokens(request.headers, b"connection"):
        return "connection-close"
    if request.version == b"1.0":
        return "http/1.0+transfer-encoding" if b"transfer-encoding" in names else "http/1.0"
    return "other"


def _must_close(request: Parsed, h11_closes: bool) -> bool:
    """h11's keep-alive verdict, with the two differences RFC 9112 makes: a request with both
    Content-Length and Transfer-Encoding must close the connection after its answer (§6.3,
    item 3; h11 reads it by Transfer-Encoding and keeps the connection), and an HTTP/1.0
    request that asks for keep-alive may keep it (§9.3; h11 closes every 1.0 connection),
    unless it has a Transfer-Encoding, whose framing §6.1 calls faulty in 1.0."""
    names = {name for name, _ in request.headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        return True
    if not h11_closes:
        return False
    connection = _tokens(request.headers, b"connection")
    asks = request.version == b"1.0" and b"keep-alive" in connection and b"close" not in connection
    return not (asks and b"transfer-encoding" not in names)


def h11_server(stream: bytes) -> ServerVerdict:
    """Parse ``stream`` (then EOF) as h11 does on a server, answering each request it reads
    with an empty 200 so that it reads the next one."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(stream)
    conn.receive_data(b"")
    done: list[Parsed] = []
    current = Parsed(b"", [])
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return ServerVerdict(done, str(exc))
        if isinstance(event, h11.Request):
            if not event.http_version.startswith(b"1."):
                # h11 takes any digit.digit; RFC 9112 §2.3: HTTP/1.x syntax is major version 1,
                # and a server answers another one 505 (HTTP/2.0 here is not HTTP/2).
                return ServerVerdict(done, f"HTTP version {event.http_version.decode()} is not HTTP/1.x")
            current = Parsed(event.http_version, [(name, value) for name, value in event.headers])
        elif isinstance(event, h11.Data):
            current.body += event.data
        elif isinstance(event, h11.EndOfMessage):
            done.append(current)
            conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
            conn.send(h11.EndOfMessage())
            h11_closes = conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE
            if _must_close(current, h11_closes):
                current.must_close = True
                return ServerVerdict(done, None)
            if h11_closes:  # an HTTP/1.0 keep-alive: go on where h11 would have stopped
                rest, ended = conn.trailing_data
                conn = h11.Connection(h11.SERVER)
                conn.receive_data(rest)
                if ended:
                    conn.receive_data(b"")
            else:
                conn.start_next_cycle()
        else:  # ConnectionClosed: the stream ended between requests
            return ServerVerdict(done, None)


# -- the reference: h11 as the client (the upstream leg) -------------------------------------


@dataclass
class ClientVerdict:
    """What h11, as a client that sent one POST, makes of the answer bytes."""

    status: int | None
    headers: dict[bytes, bytes]
    body: bytes
    error: str | None  # None: a whole answer was read
    clean: bool  # read whole, keep-alive, and not one byte more: the connection may be reused


#: The most an answer's head may take: the pool's own limit. A reader must refuse a longer
#: one as it comes (h11 only measures a head it has not yet seen the end of: fed whole, it
#: takes any size, so the reference is fed in pieces).
HEAD_LIMIT = 64 * 1024


def h11_client(answer: bytes, *, eof: bool) -> ClientVerdict:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=HEAD_LIMIT)
    conn.send(h11.Request(method=b"POST", target=b"/v1/traces", headers=[(b"host", b"u"), (b"content-length", b"1")]))
    conn.send(h11.Data(data=b"x"))
    conn.send(h11.EndOfMessage())
    pieces = [answer[i : i + 4096] for i in range(0, len(answer), 4096)]
    status: int | None = None
    version = b""
    headers: dict[bytes, bytes] = {}
    body = b""
    while True:
        try:
            event = conn.next_event()
            if event is h11.NEED_DATA and pieces:
                conn.receive_data(pieces.pop(0))
                continue
            if event is h11.NEED_DATA and eof:
                conn.receive_data(b"")
                eof = False
                continue
        except h11.RemoteProtocolError as exc:
            return ClientVerdict(status, headers, body, str(exc), clean=False)
        if event is h11.NEED_DATA:
            return ClientVerdict(status, headers, body, "the answer never ended", clean=False)
        if isinstance(event, h11.Response):
            status, version = event.status_code, event.http_version
            for name, value in event.headers:
                headers.setdefault(name, value)
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            rest, ended = conn.trailing_data
            reusable = conn.their_state is h11.DONE and conn.our_state is h11.DONE
            if not reusable and version == b"1.0":
                # h11 closes every HTTP/1.0 connection; RFC 9112 §9.3 keeps one whose answer
                # asks for keep-alive (with a Content-Length: §6.1 calls 1.0 chunking faulty).
                connection = {t.strip().lower() for t in headers.get(b"connection", b"").split(b",")}
                framed = b"content-length" in headers and b"transfer-encoding" not in headers
                reusable = framed and b"keep-alive" in connection and b"close" not in connection
            rest += b"".join(pieces)  # not fed yet: bytes after the answer all the same
            return ClientVerdict(status, headers, body, None, reusable and not rest and not ended and not eof)
        elif isinstance(event, h11.ConnectionClosed):
            return ClientVerdict(status, headers, body, "closed before the answer", clean=False)
        # InformationalResponse: the answer follows


# -- a raw client of tracegate ----------------------------------------------------------------


@dataclass
class Answer:
    status: int
    version: str
    headers: dict[str, str]
    body: bytes = b""

    def keeps_alive(self) -> bool:
        """Whether this answer tells the client that the connection stays open."""
        connection = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "1.0":
            return "keep-alive" in connection
        return "close" not in connection


class Answers:
    """Final answers read from a connection (1xx skipped), parsed by httptools; a parse error
    ends the reading and is kept."""

    def __init__(self) -> None:
        self.done: list[Answer] = []
        self.error: str | None = None
        self.arrived = asyncio.Event()
        self._parser = httptools.HttpResponseParser(self)
        self._current = Answer(0, "", {})

    def feed(self, data: bytes) -> None:
        if self.error is None:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError as exc:
                self.error = f"{type(exc).__name__}: {exc}"
        self.arrived.set()

    def on_message_begin(self) -> None:
        self._current = Answer(0, "", {})

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current.headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self._current.status = self._parser.get_status_code()
        self._current.version = self._parser.get_http_version()

    def on_body(self, body: bytes) -> None:
        self._current.body += body

    def on_message_complete(self) -> None:
        if self._current.status >= 200:
            self.done.append(self._current)


@dataclass
class Exchange:
    answers: list[Answer]
    parse_error: str | None
    closed_by_server: bool  # the server closed before the client's EOF


async def exchange(url: str, pieces: list[bytes], *, enough: int, quiet: float = 0.1, limit: float = 5.0) -> Exchange:
    """Write ``pieces`` on one connection to ``url`` (one write each, a pause between so that
    each is a read of its own), wait for ``enough`` answers, the server's close or ``quiet``
    seconds without a byte, then send EOF and read until the server closes (``limit`` s)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    answers = Answers()

    async def pump() -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                answers.feed(data)

    reading = asyncio.ensure_future(pump())
    try:
        with contextlib.suppress(ConnectionError):
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.001)
        while not reading.done() and len(answers.done) < enough and answers.error is None:
            answers.arrived.clear()
            try:
                await asyncio.wait_for(answers.arrived.wait(), quiet)
            except TimeoutError:
                break
        closed_by_server = reading.done()
        with contextlib.suppress(ConnectionError, OSError):
            if not writer.is_closing():
                writer.write_eof()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reading), limit)
    finally:
        reading.cancel()
        writer.transport.abort()
    return Exchange(answers.done, answers.error, closed_by_server)


# -- a raw upstream ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """The upstream's bytes for one request: ``writes`` in order, ``pause`` seconds before
    each; then the connection is closed when ``close``. ``late`` is written ``pause`` + 5 ms
    after the answer, when the pool may already have reused the connection: only bytes that
    cannot be taken for an answer belong there (nothing can tell a late answer from the next)."""

    writes: tuple[bytes, ...]
    pause: float = 0.0
    close: bool = False
    late: bytes = b""

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)


@dataclass(repr=False)
class RawUpstream:
    """Answers each request (its body is the key) with ``replies[body]``; records, per
    connection, the bodies it served, and every request that arrived on a connection after
    an answer in ``unclean`` (one h11 would not reuse the connection after)."""

    replies: dict[bytes, Reply] = field(default_factory=dict)
    unclean: set[bytes] = field(default_factory=set)
    reused_after: list[tuple[bytes, bytes]] = field(default_factory=list)
    connections: int = 0
    url: str = ""
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.transport.abort()
            await self._server.wait_closed()

    async def hang_up(self) -> None:
        """Reset every open connection, so that the next requests come on new ones (a
        pool's idle connection must not carry one example's bytes into the next)."""
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.sleep(0.01)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        bodies: list[bytes] = []
        ready: list[bytes] = []

        class Requests:
            def on_message_begin(self) -> None:
                bodies.append(b"")

            def on_body(self, body: bytes) -> None:
                bodies[-1] += body

            def on_message_complete(self) -> None:
                ready.append(bodies[-1])

        parser = httptools.HttpRequestParser(Requests())
        tainted: bytes | None = None
        try:
            while data := await reader.read(65536):
                parser.feed_data(data)
                while ready:
                    body = ready.pop(0)
                    if tainted is not None:
                        self.reused_after.append((tainted, body))
                    reply = self.replies.get(body, Reply((b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",)))
                    for piece in reply.writes:
                        if reply.pause:
                            await asyncio.sleep(reply.pause)
                        writer.write(piece)
                        await writer.drain()
                    if reply.close:
                        return
                    if body in self.unclean:
                        tainted = body
                    if reply.late:
                        await asyncio.sleep(reply.pause + 0.005)
                        writer.write(reply.late)
        except (ConnectionError, httptools.HttpParserError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
