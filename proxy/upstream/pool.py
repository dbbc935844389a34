"""The OTLP/HTTP upstream leg: keep-alive HTTP/1.1 connections over asyncio protocols.

aiohttp's client cost ~137 µs of CPU per forwarded request (FACTS.md); this pool does the
same job with one :class:`asyncio.Protocol` per connection and httptools (llhttp) parsing
the answers — no hand-written parser. It is used by :meth:`Forwarder.forward` only;
markers, bridge mode, JWKS and discovery keep aiohttp's client.

What it guarantees:

* TLS for ``https://`` upstreams with certificate and host name verification and SNI
  (``ssl.create_default_context()``); plain TCP only for ``http://``, which ``proxy.urls``
  allows for loopback hosts alone.
* A request is sent exactly once. A pooled connection the upstream has closed (FIN seen,
  reset, idle past ``idle_timeout``) is dropped before anything is written and the request
  goes out on another one; once one byte of a request was written it is never re-sent.
* Timeouts: ``connect_timeout`` for opening a connection (TCP and TLS), ``timeout`` for the
  whole exchange (waiting for a pool slot, sending, reading) — either expiring is
  ``upstream-timeout`` (504) and the connection is aborted; a refused, reset or garbled
  connection is ``upstream-unreachable`` (502).
* Backpressure: the body is written as it is read from the client, and reading stops while
  the socket's send buffer is over its high-water mark (``pause_writing``). The answer is
  held up to ``max_answer`` bytes (over it: 502), so memory per request stays bounded.
* No redirects: a 3xx is an answer like any other. ``1xx`` interim answers (``100
  Continue``) are skipped. An answer that arrives before the request body ended is relayed:
  an error (or a closing connection) stops the body and the connection is closed; an early
  2xx on a kept-alive connection still gets the rest of the body (RFC 9112 §9.3).
* A connection returns to the pool only after its answer was read to its end with clean
  framing, nothing followed it, and the request was written whole; anything else closes it.
  A pooled connection is written to again only when nothing (no byte, no EOF) waits on its
  socket (``UpstreamConnection.stale``): an answer can only ever be read after its own
  request, so one client's answer never reaches another.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Final

from yarl import URL

from proxy.errors import UpstreamError
from proxy.upstream.conn import PoolAnswer, Relayed, UpstreamConnection, unreachable

_CRLF: Final = b"\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
_BREAKS: Final = frozenset("\r\n")
#: A first body piece up to this size goes out in the same write as the head (one send).
_COALESCE: Final = 64 * 1024


@dataclass(frozen=True)
class _Target:
    """Where one upstream URL's requests go, and their request line and Host header."""

    key: tuple[str, int, bool]
    head: bytes


async def _open_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected TCP socket to the first of ``host``'s addresses that answers. The pool
    opens it itself (``create_connection`` would too) to keep the socket object: a pooled
    connection peeks at it before reuse (``UpstreamConnection.stale``), and asyncio's
    transport only lends a wrapper without ``recv``."""
    failure: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise failure


class UpstreamPool:
    """Keep-alive connections to the upstreams, by (host, port, tls). No module state: the
    runtime makes one at start and closes it at shutdown."""

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        idle_timeout: float = 30.0,
        max_connections: int = 1024,
        max_idle_per_origin: int = 256,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle_per_origin = max_idle_per_origin
        self._ssl = ssl_context
        self._max_connections = max_connections
        self._opening = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._idle: dict[tuple[str, int, bool], list[UpstreamConnection]] = {}
        self._open: set[UpstreamConnection] = set()
        self._targets: dict[URL, _Target] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False

    # --- public ---------------------------------------------------------------------

    async def post(
        self,
        url: URL,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterator[bytes],
        *,
        timeout: float,
        relayed: Relayed,
        max_answer: int,
        content_length: int | None = None,
    ) -> PoolAnswer:
        """POST ``body`` to ``url`` with ``headers`` (already filtered, without Host,
        Content-Length or Transfer-Encoding: the framing is added here). ``body`` as bytes
        is sent with its Content-Length; an iterator with ``content_length`` (the client's
        declared length) as it comes, else chunked. Raises UpstreamError, or whatever the
        iterator raises."""
        target = self._target(url)
        # The server's parser refuses CR and LF in headers already; never split one here.
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers if not _BREAKS.intersection(name + value))
        stream = None if isinstance(body, bytes) else body
        if isinstance(body, bytes):
            framing = b"Content-Length: %d\r\n\r\n" % len(body)
        elif content_length is None:
            framing = b"Transfer-Encoding: chunked\r\n\r\n"
        else:
            framing = b"Content-Length: %d\r\n\r\n" % content_length
        head = target.head + lines.encode("utf-8", "surrogateescape") + framing
        conn: UpstreamConnection | None = None
        try:
            async with asyncio.timeout(timeout):
                first = body if isinstance(body, bytes) else await anext(body, b"")
                conn = await self._acquire(target.key)
                conn.begin(relayed, max_answer)
                complete = await self._send(conn, head, first, stream, content_length)
                await conn.wait_answer()
        except OSError as exc:  # TimeoutError is one
            if conn is not None:
                conn.abort()
            if conn is None or not conn.done or conn.failure is not None:
                raise (
                    UpstreamError("upstream-timeout", 504) if isinstance(exc, TimeoutError) else unreachable()
                ) from None
            complete = False  # answered (2xx), but the rest of the body could not follow
        except BaseException:
            if conn is not None:
                conn.abort()
            raise
        if conn.failure is not None:
            raise conn.failure
        answer = conn.answer()
        self._release(conn, reusable=complete and conn.keep_alive)
        return answer

    async def close(self) -> None:
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports' connection_lost run

    # --- sending --------------------------------------------------------------------

    async def _send(
        self,
        conn: UpstreamConnection,
        head: bytes,
        first: bytes,
        stream: AsyncIterator[bytes] | None,
        content_length: int | None,
    ) -> bool:
        """Write the request; True if it was written whole, False if the answer came first."""
        chunked = stream is not None and content_length is None
        if chunked and first:
            conn.write(head + b"%x\r\n" % len(first) + first + _CRLF)
        elif len(first) <= _COALESCE:
            conn.write(head + first)
        else:
            conn.write(head)
            conn.write(first)
        sent = len(first)
        if stream is not None and first:
            async for chunk in stream:
                if conn.paused:
                    await conn.drain()
                if conn.refused():
                    return False  # answered early (or failed): stop sending
                conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                sent += len(chunk)
        if conn.refused():
            return False
        if content_length is not None and sent != content_length:
            raise unreachable()  # the body did not match its declared length: never complete it
        if chunked:
            conn.write(_LAST_CHUNK)
        return True

    # --- connections ----------------------------------------------------------------

    def _target(self, url: URL) -> _Target:
        found = self._targets.get(url)
        if found is None:
            tls = url.scheme == "https"
            host = url.raw_host or ""
            port = url.port or (443 if tls else 80)
            host_header = f"[{host}]" if ":" in host else host
            if not url.is_default_port():
                host_header += f":{port}"
            path = url.raw_path_qs or "/"
            head = f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\n".encode("ascii")
            found = self._targets[url] = _Target((host, port, tls), head)
        return found

    async def _acquire(self, key: tuple[str, int, bool]) -> UpstreamConnection:
        """A pooled connection to ``key`` that is still open, else a new one; at the
        connection limit, the next one released (or an idle one of another origin closed)."""
        while True:
            idle = self._idle.get(key)
            while idle:
                conn = idle.pop()
                if time.monotonic() - conn.idle_since < self.idle_timeout and not conn.stale():
                    return conn
                conn.close()
            if self._closing:
                raise unreachable()
            if self._opening + len(self._open) < self._max_connections:
                return await self._connect(key)
            if not self._close_one_idle():
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                try:
                    await waiter
                except BaseException:
                    if waiter.done() and not waiter.cancelled():
                        self._wake_one()  # woken, then cancelled: pass the turn on
                    raise
                finally:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
            else:
                await asyncio.sleep(0)  # its connection_lost frees the place

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self, key: tuple[str, int, bool]) -> UpstreamConnection:
        host, port, tls = key
        context = None
        if tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        loop = asyncio.get_running_loop()
        self._opening += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                sock = await _open_socket(loop, host, port)
                try:
                    _, conn = await loop.create_connection(
                        lambda: UpstreamConnection(key, self._lost, sock),
                        sock=sock,
                        ssl=context,
                        server_hostname=host if tls else None,
                    )
                except BaseException:
                    sock.close()
                    raise
        finally:
            self._opening -= 1
        self._open.add(conn)
        if self._closing:
            conn.abort()
            raise unreachable()
        return conn

    def _close_one_idle(self) -> bool:
        for idle in self._idle.values():
            if idle:
                idle.pop(0).close()
                return True
        return False

    def _release(self, conn: UpstreamConnection, *, reusable: bool) -> None:
        conn.busy = False
        idle = self._idle.setdefault(conn.key, [])
        if not reusable or conn.closed or self._closing or len(idle) >= self.max_idle_per_origin:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)
        self._wake_one()
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle_timeout / 2, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle past ``idle_timeout`` (the upstream would soon anyway)."""
        self._sweeper = None
        horizon = time.monotonic() - self.idle_timeout
        remaining = 0
        for idle in self._idle.values():
            while idle and idle[0].idle_since < horizon:
                idle.pop(0).close()
            remaining += len(idle)
        if remaining and not self._closing:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle_timeout / 2, self._sweep)

    def _lost(self, conn: UpstreamConnection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._wake_one()
        idle = self._idle.get(conn.key)
        if idle and not conn.busy and conn in idle:
            idle.remove(conn)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())
