"""The upstream pool's health against real, small HTTP servers on loopback whose answers each
test writes byte for byte: keep-alive reuse, content-length, chunked and EOF-delimited
answers, 100 Continue, idle connections the upstream closed or half-closed, an answer before
the request body ended, garbage, TLS with verification and SNI, timeouts and pool limits."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httptools
import pytest
from aiohttp import web
from yarl import URL

from proxy.dev.standins import StandInIssuer
from proxy.errors import UpstreamError
from proxy.observe.metrics import Metrics
from proxy.policy.model import ServiceAccount, Where
from proxy.secrets import Secret, SecretRef
from proxy.upstream.forward import Forwarder
from proxy.upstream.headers import HeaderPolicy
from proxy.upstream.pool import UpstreamPool
from tests.certs import TestCA
from tests.conftest import PAYMENTS_KEY, policy_yaml

RELAYED = {b"content-type": "Content-Type", b"content-encoding": "Content-Encoding", b"retry-after": "Retry-After"}
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Seen:
    """One request as the upstream parsed it."""

    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False


class Upstream:
    """An HTTP/1.1 server parsing requests with httptools; ``reply`` says what to write back
    for each request (called on headers when ``early``, else when the request is complete)
    and may act on the connection itself (close it, half-close it, wait)."""

    def __init__(self, reply: Callable[[Seen, asyncio.StreamWriter], Awaitable[None]], *, early: bool = False) -> None:
        self.reply = reply
        self.early = early
        self.requests: list[Seen] = []
        self.connections = 0
        self.concurrent = 0
        self.peak = 0
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> Upstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1/traces"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.concurrent += 1
        self.peak = max(self.peak, self.concurrent)
        ready: asyncio.Queue[Seen] = asyncio.Queue()
        upstream = self

        class Parse:
            seen = Seen()

            def on_message_begin(self) -> None:
                self.seen = Seen()
                upstream.requests.append(self.seen)

            def on_header(self, name: bytes, value: bytes) -> None:
                self.seen.headers[name.decode().lower()] = value.decode()

            def on_headers_complete(self) -> None:
                if upstream.early:
                    ready.put_nowait(self.seen)

            def on_body(self, body: bytes) -> None:
                self.seen.body += body

            def on_message_complete(self) -> None:
                self.seen.complete = True
                if not upstream.early:
                    ready.put_nowait(self.seen)

        parser = httptools.HttpRequestParser(Parse())
        try:
            while data := await reader.read(65536):
                parser.feed_data(data)
                while not ready.empty():
                    await self.reply(ready.get_nowait(), writer)
                if writer.is_closing():
                    break
        except (ConnectionError, httptools.HttpParserError):
            pass
        finally:
            self.concurrent -= 1
            writer.close()


async def answer_ok(_seen: Seen, writer: asyncio.StreamWriter) -> None:
    writer.write(OK)


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    started: list[Upstream] = []

    async def make(reply: Callable[[Seen, asyncio.StreamWriter], Awaitable[None]], **kw: Any) -> Upstream:
        upstream = await Upstream(reply, **kw).start()
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        await upstream.stop()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    made = UpstreamPool(connect_timeout=2.0)
    yield made
    await made.close()


async def post(pool: UpstreamPool, url: str, body: bytes | AsyncIterator[bytes] = b"hello", **kw: Any) -> Any:
    headers = kw.pop("headers", [("Content-Type", "application/x-protobuf")])
    return await pool.post(
        URL(url), headers, body, timeout=kw.pop("timeout", 5.0), relayed=RELAYED, max_answer=1 << 20, **kw
    )


async def pieces(total: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        yield b"b" * piece
        sent += piece
        await asyncio.sleep(0)


async def test_content_length_answers_reuse_one_connection(upstreams: Any, pool: UpstreamPool) -> None:
    upstream = await upstreams(answer_ok)
    for n in range(3):
        answer = await post(pool, upstream.url, b"body-%d" % n)
        assert (answer.status, answer.body, answer.headers) == (200, b"ok", {"Content-Type": "application/x-protobuf"})
    assert upstream.connections == 1
    assert [bytes(r.body) for r in upstream.requests] == [b"body-0", b"body-1", b"body-2"]
    assert upstream.requests[0].headers["content-length"] == "6"
    assert upstream.requests[0].headers["host"] == upstream.url.split("/")[2]


async def test_chunked_answer_is_read_whole_and_the_connection_reused(upstreams: Any, pool: UpstreamPool) -> None:
    async def chunked(_seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\nRetry-After: 3\r\n\r\n")
        writer.write(b"5\r\nhello\r\n")
        await writer.drain()
        writer.write(b"6\r\n world\r\n0\r\n\r\n")

    upstream = await upstreams(chunked)
    for _ in range(2):
        answer = await post(pool, upstream.url)
        assert (answer.status, answer.body, answer.headers) == (202, b"hello world", {"Retry-After": "3"})
    assert upstream.connections == 1


async def test_answer_ending_at_eof_is_read_to_eof_and_not_reused(upstreams: Any, pool: UpstreamPool) -> None:
    async def until_eof(_seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial ")
        await writer.drain()
        writer.write(b"and the rest")
        writer.close()

    upstream = await upstreams(until_eof)
    assert (await post(pool, upstream.url)).body == b"partial and the rest"
    assert (await post(pool, upstream.url)).body == b"partial and the rest"
    assert upstream.connections == 2


async def test_100_continue_is_skipped(upstreams: Any, pool: UpstreamPool) -> None:
    async def interim(_seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + OK)

    upstream = await upstreams(interim)
    for _ in range(2):
        answer = await post(pool, upstream.url)
        assert (answer.status, answer.body) == (200, b"ok")
    assert upstream.connections == 1


async def test_upstream_closing_idle_connections_costs_no_request(upstreams: Any, pool: UpstreamPool) -> None:
    async def answer_then_close(_seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(OK)  # keep-alive promised, then the upstream's idle timeout strikes
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    upstream = await upstreams(answer_then_close)
    for _ in range(3):
        assert (await post(pool, upstream.url)).status == 200
        await asyncio.sleep(0.2)
        assert pool.idle_connections() == 0  # the closed connection left the pool
    assert upstream.connections == 3
    assert len(upstream.requests) == 3  # each request sent once


async def test_half_closed_connection_is_never_reused(upstreams: Any, pool: UpstreamPool) -> None:
    async def answer_then_half_close(_seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(OK)
        await writer.drain()
        writer.transport.get_extra_info("socket").shutdown(socket.SHUT_WR)  # FIN, still reading

    upstream = await upstreams(answer_then_half_close)
    assert (await post(pool, upstream.url)).status == 200
    await asyncio.sleep(0.1)
    assert (await post(pool, upstream.url)).status == 200
    assert upstream.connections == 2
    assert len(upstream.requests) == 2


async def test_reused_connection_closed_just_now_is_not_written_to(upstreams: Any) -> None:
    """Idle past a second: the pool looks at the connection once more before writing."""
    pool = UpstreamPool()
    try:

        async def answer_then_close_later(_seen: Seen, writer: asyncio.StreamWriter) -> None:
            writer.write(OK)
            await writer.drain()
            await asyncio.sleep(1.0)
            writer.close()

        upstream = await upstreams(answer_then_close_later)
        assert (await post(pool, upstream.url)).status == 200
        await asyncio.sleep(1.2)
        assert (await post(pool, upstream.url)).status == 200
        assert (upstream.connections, len(upstream.requests)) == (2, 2)
    finally:
        await pool.close()


async def test_answer_before_the_request_body_ended_is_relayed(upstreams: Any, pool: UpstreamPool) -> None:
    async def refuse_at_headers(_seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 7\r\n\r\ntoo big")
        await writer.drain()

    upstream = await upstreams(refuse_at_headers, early=True)
    total = 32 << 20  # far more than the socket buffers hold: the upstream stops reading
    answer = await post(pool, upstream.url, pieces(total), content_length=total, timeout=10)
    assert (answer.status, answer.body) == (413, b"too big")
    assert not upstream.requests[0].complete
    assert pool.idle_connections() == 0  # the request was not written whole: never reused
    answer = await post(pool, upstream.url, b"x")
    assert answer.status == 413


async def test_early_2xx_gets_the_rest_of_the_body_and_keeps_the_connection(upstreams: Any, pool: UpstreamPool) -> None:
    """nginx's ``return 200`` answers at the headers and discards the body; the request is
    still written whole, so the connection is reused."""
    upstream = await upstreams(answer_ok, early=True)
    for _ in range(2):
        answer = await post(pool, upstream.url, pieces(1 << 20), content_length=1 << 20)
        assert (answer.status, answer.body) == (200, b"ok")
    await asyncio.sleep(0.05)
    assert [len(r.body) for r in upstream.requests] == [1 << 20, 1 << 20]
    assert all(r.complete for r in upstream.requests) and upstream.connections == 1


async def test_chunked_and_content_length_requests(upstreams: Any, pool: UpstreamPool) -> None:
    upstream = await upstreams(answer_ok)
    await post(pool, upstream.url, pieces(200_000))
    await post(pool, upstream.url, pieces(200_000), content_length=200_000)
    chunked, sized = upstream.requests
    assert chunked.headers.get("transfer-encoding") == "chunked" and "content-length" not in chunked.headers
    assert sized.headers.get("content-length") == "200000" and "transfer-encoding" not in sized.headers
    assert bytes(chunked.body) == bytes(sized.body) == b"b" * 200_000
    assert upstream.connections == 1


async def test_body_error_never_completes_the_upstream_request(upstreams: Any, pool: UpstreamPool) -> None:
    upstream = await upstreams(answer_ok)

    async def breaks() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        raise ValueError("the client went away")

    for length in (None, 5000):
        with pytest.raises(ValueError):
            await post(pool, upstream.url, breaks(), content_length=length)
    await asyncio.sleep(0.1)
    assert len(upstream.requests) == 2 and not any(r.complete for r in upstream.requests)


@pytest.mark.parametrize(
    "garbage",
    [
        b"this is not http\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # then EOF
    ],
)
async def test_garbage_answer_is_502(upstreams: Any, pool: UpstreamPool, garbage: bytes) -> None:
    async def reply(_seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(garbage)
        await writer.drain()
        writer.close()

    upstream = await upstreams(reply)
    with pytest.raises(UpstreamError) as caught:
        await post(pool, upstream.url)
    assert (caught.value.reason, caught.value.status) == ("upstream-unreachable", 502)
    assert pool.open_connections == 0 or pool.idle_connections() == 0


async def test_answer_over_the_limit_is_502(upstreams: Any, pool: UpstreamPool) -> None:
    async def huge(_seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3000000\r\n\r\n" + b"x" * 3_000_000)

    upstream = await upstreams(huge)
    with pytest.raises(UpstreamError) as caught:
        await post(pool, upstream.url)
    assert caught.value.reason == "upstream-answer-too-large"


async def test_reset_after_bytes_were_sent_is_502_and_never_resent(upstreams: Any, pool: UpstreamPool) -> None:
    async def reset(_seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    upstream = await upstreams(reset)
    with pytest.raises(UpstreamError) as caught:
        await post(pool, upstream.url)
    assert caught.value.status == 502
    assert len(upstream.requests) == 1


async def test_silent_upstream_is_504_within_the_timeout_and_the_connection_closed(
    upstreams: Any, pool: UpstreamPool
) -> None:
    async def silent(_seen: Seen, writer: asyncio.StreamWriter) -> None:
        pass

    upstream = await upstreams(silent)
    started = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamError) as caught:
        await post(pool, upstream.url, timeout=0.3)
    assert (caught.value.reason, caught.value.status) == ("upstream-timeout", 504)
    assert asyncio.get_running_loop().time() - started < 1.5
    await asyncio.sleep(0.05)
    assert upstream.concurrent == 0 and pool.open_connections == 0


async def test_nothing_listening_is_502(pool: UpstreamPool) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(UpstreamError) as caught:
        await post(pool, f"http://127.0.0.1:{port}/v1/traces")
    assert caught.value.reason == "upstream-unreachable"


async def test_pool_limit_bounds_open_connections(upstreams: Any) -> None:
    async def slow(_seen: Seen, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.05)
        writer.write(OK)

    upstream = await upstreams(slow)
    pool = UpstreamPool(max_connections=2)
    try:
        answers = await asyncio.gather(*(post(pool, upstream.url) for _ in range(8)))
    finally:
        await pool.close()
    assert [a.status for a in answers] == [200] * 8
    assert upstream.peak <= 2 and len(upstream.requests) == 8


async def test_tls_is_verified_and_sends_sni(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    leaf = ca.issue("upstream")
    names: list[str | None] = []
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(leaf.cert, leaf.key)
    server_context.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[func-returns-value]

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    port = runner.addresses[0][1]
    trusting = UpstreamPool(ssl_context=ssl.create_default_context(cafile=str(ca.cert)))
    default = UpstreamPool()  # the system's trust store: does not know this CA
    try:
        answer = await post(trusting, f"https://localhost:{port}/v1/traces", b"over tls")
        assert (answer.status, answer.body) == (200, b"over tls")
        assert names == ["localhost"]
        with pytest.raises(UpstreamError) as caught:
            await post(default, f"https://localhost:{port}/v1/traces")
        assert caught.value.status == 502
    finally:
        await trusting.close()
        await default.close()
        await runner.cleanup()


async def test_garbage_through_tracegate_is_502_with_nothing_unhandled(
    start_tracegate: Any, issuer: StandInIssuer, upstreams: Any, client: aiohttp.ClientSession
) -> None:
    async def garbage(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 2OO OK\r\n\r\n")

    upstream = await upstreams(garbage)
    tg = await start_tracegate(policy_yaml(issuer.url), upstream=upstream.url.rsplit("/v1", 1)[0])
    await tg.keys_ready()
    async with client.post(
        tg.url + "/v1/traces", data=b"x" * 3000, headers={"Authorization": f"Bearer {issuer.mint()}"}
    ) as resp:
        assert resp.status == 502
        assert PAYMENTS_KEY not in await resp.text()
    assert upstream.requests[0].headers["lightstep-access-token"] == PAYMENTS_KEY
    assert tg.metric("tracegate_upstream_responses_total", signal="traces", status="unreachable") == 1


def tagged(seen: Seen) -> bytes:
    """An answer that names its own request (its body), so a test sees whose answer it got."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(seen.body), bytes(seen.body))


@pytest.mark.parametrize(
    "after",
    [
        b"HTTP/1.1 299 Stale\r\nContent-Length: 5\r\n\r\nstale",  # a second answer appended
        b"EXTRA",  # a body longer than its Content-Length
        b"HTTP/1.1 0 \r\n\r\n",  # a malformed second answer
    ],
)
async def test_bytes_after_an_answer_never_reach_the_next_request(
    upstreams: Any, pool: UpstreamPool, after: bytes
) -> None:
    """Issue 18 item 1: leftover bytes in the same read as an answer made the connection go
    back to the pool, and the next export (another client) got the earlier exchange's answer."""

    async def leftover(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(tagged(seen) + after)

    upstream = await upstreams(leftover)
    for n in range(4):
        answer = await post(pool, upstream.url, b"client-%d" % n)
        assert (answer.status, answer.body) == (200, b"client-%d" % n)
    assert upstream.connections == 4  # never reused


async def test_a_204_with_a_body_is_relayed_alone_and_the_connection_closed(upstreams: Any, pool: UpstreamPool) -> None:
    async def no_content_with_body(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n" + tagged(seen))

    upstream = await upstreams(no_content_with_body)
    for _ in range(3):
        answer = await post(pool, upstream.url, b"mine")
        assert (answer.status, answer.body) == (204, b"")
    assert upstream.connections == 3


async def test_an_answer_sent_late_after_the_first_never_answers_the_next_request(
    upstreams: Any, pool: UpstreamPool
) -> None:
    """Bytes that arrive between two exchanges, in a read of their own, while the connection
    sits idle or just before it is reused: never parsed as the next request's answer."""

    async def late_extra(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(tagged(seen))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 299 Stale\r\nContent-Length: 5\r\n\r\nstale")

    upstream = await upstreams(late_extra)
    assert (await post(pool, upstream.url, b"first")).body == b"first"
    await asyncio.sleep(0.2)
    assert (await post(pool, upstream.url, b"second")).body == b"second"
    assert upstream.connections == 2


async def test_an_idle_connection_with_bytes_waiting_is_not_reused(upstreams: Any, pool: UpstreamPool) -> None:
    """The same, with no turn of the event loop between the stale bytes reaching the kernel
    and the reuse: the pool's look at the socket catches them."""
    sent = asyncio.Event()

    async def late_extra(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(tagged(seen))
        await writer.drain()
        if len(upstream.requests) == 1:
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 299 Stale\r\nContent-Length: 5\r\n\r\nstale")
            await writer.drain()
            sent.set()

    upstream = await upstreams(late_extra)
    assert (await post(pool, upstream.url, b"first")).body == b"first"
    await sent.wait()
    time.sleep(0.05)  # the bytes are in the kernel; the loop has not read them
    assert (await post(pool, upstream.url, b"second")).body == b"second"
    assert upstream.connections == 2


@pytest.mark.parametrize(
    "status_line", [b"HTTP/1.1 000 Zero", b"HTTP/1.1 099 Low", b"HTTP/1.1 600 High", b"HTTP/1.1 999 X"]
)
async def test_a_status_outside_100_to_599_is_502(upstreams: Any, pool: UpstreamPool, status_line: bytes) -> None:
    async def bad_status(_seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(status_line + b"\r\nContent-Length: 2\r\n\r\nok")

    upstream = await upstreams(bad_status)
    with pytest.raises(UpstreamError) as caught:
        await post(pool, upstream.url)
    assert (caught.value.reason, caught.value.status) == ("upstream-unreachable", 502)
    assert pool.idle_connections() == 0


async def test_an_unasked_101_is_502_and_nothing_escapes_the_protocol(
    upstreams: Any, pool: UpstreamPool, caplog: pytest.LogCaptureFixture
) -> None:
    async def upgrade(_seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n\x00\x00\x12")

    upstream = await upstreams(upgrade)
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        with pytest.raises(UpstreamError) as caught:
            await post(pool, upstream.url)
        await asyncio.sleep(0.05)
    assert caught.value.status == 502
    assert not [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1 << 20) + b"\r\nContent-Length: 2\r\n\r\nok",  # one huge field
        b"HTTP/1.1 200 OK\r\n" + b"X-Many: b\r\n" * 200 + b"Content-Length: 2\r\n\r\nok",  # too many fields
        b"HTTP/1.1 200 OK\r\n" + b"X-Long: %s\r\n" % (b"c" * 8200) + b"Content-Length: 2\r\n\r\nok",  # one long line
        b"HTTP/1.1 200 " + b"d" * 9000 + b"\r\nContent-Length: 2\r\n\r\nok",  # a long status line
    ],
)
async def test_an_answer_head_over_its_bounds_is_502(upstreams: Any, pool: UpstreamPool, head: bytes) -> None:
    """Issue 18 item 3: a 48 MiB answer header was relayed as 200."""

    async def big_head(_seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(head)

    upstream = await upstreams(big_head)
    with pytest.raises(UpstreamError) as caught:
        await post(pool, upstream.url)
    assert (caught.value.reason, caught.value.status) == ("upstream-answer-too-large", 502)


async def test_a_head_that_never_ends_is_cut_off_at_its_bound_not_at_the_timeout(
    upstreams: Any, pool: UpstreamPool
) -> None:
    """A field that never ends: httptools would gather it without bound; the pool stops it
    once the head's reads pass the limit, long before the exchange's timeout."""

    async def endless(_seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        for _ in range(64):
            writer.write(b"e" * 16384)
            await writer.drain()
            await asyncio.sleep(0)
        await asyncio.sleep(30)

    upstream = await upstreams(endless)
    with pytest.raises(UpstreamError) as caught:
        await post(pool, upstream.url, timeout=20.0)
    assert caught.value.reason == "upstream-answer-too-large"


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 000 Zero", b"HTTP/1.1 600 High", b"HTTP/1.1 999 X"])
async def test_markers_and_bridge_exchanges_refuse_a_status_outside_100_to_599(
    upstreams: Any, status_line: bytes
) -> None:
    """The other place an upstream status becomes an answer (aiohttp's client, for markers
    and bridge mode): aiohttp's parser takes any three digits."""

    async def bad_status(_seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(status_line + b"\r\nContent-Length: 2\r\n\r\nok")

    upstream = await upstreams(bad_status)
    account = ServiceAccount(
        "payments", SecretRef("env", "K"), frozenset({"traces"}), None, Where("p.yaml", 1), access_token=Secret("k")
    )
    async with aiohttp.ClientSession() as session:
        forwarder = Forwarder(session, HeaderPolicy(), Metrics(), upstream=upstream.url.rsplit("/v1", 1)[0])
        with pytest.raises(UpstreamError) as caught:
            await forwarder.exchange(account, "traces", b"x", "application/x-protobuf")
    assert (caught.value.reason, caught.value.status) == ("upstream-unreachable", 502)


async def test_a_bad_upstream_status_through_tracegate_is_502(
    start_tracegate: Any, issuer: StandInIssuer, upstreams: Any, client: aiohttp.ClientSession
) -> None:
    async def bad_status(_seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 000 Zero\r\nContent-Length: 2\r\n\r\nok")

    upstream = await upstreams(bad_status)
    tg = await start_tracegate(policy_yaml(issuer.url), upstream=upstream.url.rsplit("/v1", 1)[0])
    await tg.keys_ready()
    async with client.post(
        tg.url + "/v1/traces", data=b"x" * 30, headers={"Authorization": f"Bearer {issuer.mint()}"}
    ) as resp:
        assert resp.status == 502
    assert tg.metric("tracegate_upstream_responses_total", signal="traces", status="unreachable") == 1


@pytest.mark.parametrize(
    "answer",
    [
        # HTTP/1.0 with Transfer-Encoding: faulty framing, close after it (RFC 9112 §6.1).
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        # "close" wins over a "keep-alive" beside it.
        b"HTTP/1.1 200 OK\r\nConnection: close, keep-alive\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\nok",
    ],
)
async def test_an_answer_that_must_end_its_connection_is_never_reused(
    upstreams: Any, pool: UpstreamPool, answer: bytes
) -> None:
    async def reply(_seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)

    upstream = await upstreams(reply)
    for _ in range(2):
        got = await post(pool, upstream.url)
        assert (got.status, got.body) == (200, b"ok")
    assert upstream.connections == 2
