"""The ingest listener's own export server (proxy/ingest_conn.py), over raw sockets: what it
serves itself, what it hands to aiohttp on the same connection, pipelining, early answers,
broken framing, HTTP/1.0 and drain. The ordinary clients' view of it is the rest of the
suite (the SDK, aiohttp, curl), which runs against it unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httptools
import pytest

from proxy.standins import Sink, StandInIssuer
from tests import gitea_payloads as g
from tests.certs import TestCA
from tests.conftest import Tracegate, policy_yaml
from tests.test_webhooks import OLD_SECRET, WEBHOOKS, hook_env


class Answer:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


class Conn:
    """One raw client connection; answers parsed by httptools' response parser."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._pending: list[Answer] = []
        self._answer = Answer()
        self._parser = httptools.HttpResponseParser(self)

    @classmethod
    async def open(cls, url: str) -> Conn:
        host, port = url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    def on_message_begin(self) -> None:
        self._answer = Answer()

    def on_status(self, _status: bytes) -> None:
        self._answer.status = self._parser.get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._answer.on_header(name, value)

    def on_body(self, body: bytes) -> None:
        self._answer.on_body(body)

    def on_message_complete(self) -> None:
        self._answer.done = True
        if self._answer.status >= 200:
            self._pending.append(self._answer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, timeout: float = 10.0) -> Answer:
        async with asyncio.timeout(timeout):
            while not self._pending:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("closed before an answer")
                self._parser.feed_data(data)
        return self._pending.pop(0)

    async def closed(self, timeout: float = 5.0) -> bool:
        """Whether the server closes the connection (no more answers) within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while data := await self.reader.read(65536):
                    self._parser.feed_data(data)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[str], Awaitable[Conn]]]:
    """Opens raw connections, each closed when the test ends."""
    opened: list[Conn] = []

    async def _open(url: str) -> Conn:
        opened.append(await Conn.open(url))
        return opened[-1]

    yield _open
    for conn in opened:
        await conn.close()


def export(token: str, body: bytes = b"span", *, path: str = "/v1/traces", extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/x-protobuf\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def gitea_push() -> bytes:
    body = g.encode(g.push())
    headers = {**g.gitea_headers("push", body, OLD_SECRET), "Content-Type": "application/json"}
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"POST /webhooks/gitea HTTP/1.1\r\nHost: t\r\n{lines}Content-Length: {len(body)}\r\n\r\n".encode() + body


async def start(start_tracegate: Any, issuer: StandInIssuer, **overrides: str) -> Tracegate:
    tg: Tracegate = await start_tracegate(
        policy_yaml(issuer.url, WEBHOOKS), env=hook_env(), outbox_retry_base="0.05", **overrides
    )
    await tg.keys_ready()
    return tg


def exports(sink: Sink) -> list[bytes]:
    """What reached the sink from the clients' exports (not the webhooks' markers)."""
    return [r.body for r in sink.received if not r.body.startswith(b"\n")]


async def test_one_connection_carries_exports_then_a_webhook_then_exports(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    tg = await start(start_tracegate, issuer)
    token = issuer.mint()
    conn = await connect(tg.url)
    await conn.send(export(token, b"one"))
    assert (await conn.answer()).status == 200
    await conn.send(gitea_push())  # not an export: aiohttp answers it, on this same connection
    hook = await conn.answer()
    assert hook.status == 202, hook.body
    await conn.send(export(token, b"two"))
    assert (await conn.answer()).status == 200
    assert exports(sink) == [b"one", b"two"]
    assert [line["event"] for line in tg.audit()].count("ingest") == 2


async def test_pipelined_exports_are_answered_in_order(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    tg = await start(start_tracegate, issuer)
    good, other = issuer.mint(), "not-a-token"
    conn = await connect(tg.url)
    await conn.send(export(good, b"first") + export(other, b"second") + export(good, b"third", path="/v1/logs"))
    statuses = [(await conn.answer()).status for _ in range(3)]
    assert statuses == [200, 401, 200]
    assert [r.body for r in sink.received] == [b"first", b"third"]
    assert [r.path for r in sink.received] == ["/v1/traces", "/v1/logs"]


async def test_a_request_pipelined_behind_an_export_that_is_not_one_closes_the_connection(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    """Its first byte is mid-read, so it cannot be handed to aiohttp: the export is
    answered, then the connection closes with the webhook unanswered (RFC 9112 §9.3.2: the
    client retries it on a new connection), and the webhook is not stored."""
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    token = issuer.mint()
    await conn.send(export(token, b"first") + export(token, b"second") + gitea_push())
    first, second = await conn.answer(), await conn.answer()  # every export parsed before it
    assert (first.status, second.status) == (200, 200)
    assert "connection" not in first.headers
    assert second.headers["connection"] == "close"
    assert await conn.closed()
    assert tg.metric("tracegate_protocol_errors_total", kind="pipelined-not-export") == 1
    await asyncio.sleep(0.5)
    assert [r.body for r in sink.received] == [b"first", b"second"]  # no marker: the webhook was not taken
    # The retry, on a connection of its own, is served.
    retry = await connect(tg.url)
    await retry.send(gitea_push())
    assert (await retry.answer()).status == 202


async def test_a_malformed_head_pipelined_behind_an_export_closes_after_the_export(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    await conn.send(export(issuer.mint(), b"first") + b"POST /v1/traces HTTP/1.1\r\nBad Header\r\n\r\n")
    assert (await conn.answer()).status == 200
    assert await conn.closed()
    assert tg.metric("tracegate_protocol_errors_total", kind="bad-message") == 1
    assert tg.metric("tracegate_unhandled_errors_total") == 0


async def test_a_malformed_head_on_its_own_read_is_refused_by_aiohttp_as_before(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    await conn.send(export(issuer.mint(), b"first"))
    assert (await conn.answer()).status == 200
    await conn.send(b"POST /v1/traces HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n")
    refused = await conn.answer()
    assert refused.status == 400
    assert refused.body == b"Bad Request"  # the phrase alone: aiohttp's refusal, via protocol.py
    assert (
        tg.metric("tracegate_protocol_errors_total", kind="invalid-header")
        + tg.metric("tracegate_protocol_errors_total", kind="bad-message")
        == 1
    )
    assert [r.body for r in sink.received] == [b"first"]


async def test_a_refusal_before_the_body_ended_is_read_by_the_client_not_reset(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    body = b"x" * (4 << 20)
    head = export("not-a-token", body)[: -len(body)]
    await conn.send(head + body[: 1 << 20])  # a quarter of the body; the 401 comes meanwhile
    refused = await conn.answer()
    assert refused.status == 401
    assert refused.headers["connection"] == "close"
    with contextlib.suppress(ConnectionError):  # the client goes on sending: read and dropped, then closed
        await conn.send(body[1 << 20 :])
    assert await conn.closed()
    assert sink.received == []
    assert tg.audit()[-1]["decision"] == "refused"


async def test_broken_chunked_framing_mid_body_is_a_400_and_nothing_complete_goes_upstream(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    head = (
        f"POST /v1/traces HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {issuer.mint()}\r\n"
        "Content-Type: application/x-protobuf\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    await conn.send(head + b"4\r\nspan\r\nZZ\r\n")
    answer = await conn.answer()
    assert answer.status == 400
    assert await conn.closed()
    assert sink.received == []
    assert tg.audit()[-1]["reason"] == "body-incomplete"
    assert tg.metric("tracegate_unhandled_errors_total") == 0


async def test_http_1_0_keeps_the_connection_only_when_asked(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    tg = await start(start_tracegate, issuer)
    token = issuer.mint()
    conn = await connect(tg.url)
    request = export(token, b"ten").replace(b"HTTP/1.1", b"HTTP/1.0")
    await conn.send(request.replace(b"Host: t\r\n", b"Host: t\r\nConnection: keep-alive\r\n"))
    kept = await conn.answer()
    assert (kept.status, kept.headers["connection"]) == (200, "keep-alive")
    await conn.send(request)
    last = await conn.answer()
    assert (last.status, last.headers["connection"]) == (200, "close")
    assert await conn.closed()
    assert [r.body for r in sink.received] == [b"ten", b"ten"]


async def test_a_query_string_or_an_upgrade_goes_to_aiohttp_which_refuses_a_token_in_the_query(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    await conn.send(export(issuer.mint(), b"q", path=f"/v1/traces?access_token={issuer.mint()}"))
    assert (await conn.answer()).status == 401
    assert tg.audit()[-1]["reason"] == "token-in-query"
    upgrade = await connect(tg.url)
    await upgrade.send(export(issuer.mint(), b"u", extra="Connection: Upgrade\r\nUpgrade: websocket\r\n"))
    answer = await upgrade.answer()  # aiohttp's route: an ordinary export as far as it is concerned
    assert answer.status == 200
    assert [r.body for r in sink.received] == [b"u"]


async def test_an_idle_connection_is_closed_after_the_idle_timeout(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    tg = await start(start_tracegate, issuer, idle_timeout="0.5")
    conn = await connect(tg.url)
    await conn.send(export(issuer.mint()))
    assert (await conn.answer()).status == 200
    assert await conn.closed(timeout=5)


async def test_drain_answers_the_export_in_flight_then_closes(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    tg = await start(start_tracegate, issuer)
    sink.delay = 0.5
    conn = await connect(tg.url)
    await conn.send(export(issuer.mint(), b"in-flight"))
    await asyncio.sleep(0.1)
    stopping = asyncio.ensure_future(tg.runners[0].cleanup())
    answer = await conn.answer()
    assert answer.status == 200
    assert await conn.closed()
    await stopping
    assert [r.body for r in sink.received] == [b"in-flight"]


async def test_chunk_extensions_and_trailer_fields_are_dropped_not_counted_as_headers(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    """Trailer fields come through the parser's header callback after the head: more of
    them than the head may have must not cut the export off."""
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    trailers = "".join(f"X-Trailer-{i}: {i}\r\n" for i in range(150))
    await conn.send(
        (
            f"POST /v1/traces HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {issuer.mint()}\r\n"
            "Content-Type: application/x-protobuf\r\nTransfer-Encoding: chunked\r\n\r\n"
            f"4;ext=1\r\nspan\r\n0\r\n{trailers}\r\n"
        ).encode()
    )
    answer = await conn.answer()
    assert answer.status == 200
    assert "connection" not in answer.headers  # kept alive
    assert [r.body for r in sink.received] == [b"span"]
    assert not any(name.startswith("X-Trailer") for name in sink.received[0].headers)


async def test_a_huge_header_field_is_refused_as_it_comes_not_gathered(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    """httptools gathers a field before its callback: a head past 64 KiB goes to aiohttp,
    whose parser refuses a line over the limit while it is still arriving."""
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    await conn.send(b"POST /v1/traces HTTP/1.1\r\nHost: t\r\nX-Big: ")
    with contextlib.suppress(ConnectionError):
        for _ in range(4):  # 256 KiB of one field, no end of line
            await conn.send(b"a" * 65536)
    refused = await conn.answer()  # before the field (or the head) ended
    assert refused.status in (400, 431)
    assert await conn.closed()
    assert tg.metric("tracegate_protocol_errors_total", kind="line-too-long") == 1
    assert sink.received == []


async def test_a_client_that_does_not_read_its_answers_stops_being_read(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink
) -> None:
    """Pipelined requests whose answers the client never reads: tracegate stops reading
    (its answers wait in bounded buffers) instead of answering all of them into memory."""
    tg = await start(start_tracegate, issuer)
    host, port = tg.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.setblocking(False)
    _reader, writer = await asyncio.open_connection(sock=sock)
    batch = b"POST /v1/traces HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n" * 1000
    sent, stalled = 0, False
    try:
        while sent < 400_000:
            writer.write(batch)
            try:
                await asyncio.wait_for(writer.drain(), 2)
            except TimeoutError:
                stalled = True
                break
            sent += 1000
        answered = len(tg.audit())
        assert stalled, "tracegate read 400,000 requests whose answers were never read"
        assert answered < 100_000
    finally:
        writer.transport.abort()
    assert sink.received == []


async def test_a_tls_client_closing_cleanly_logs_nothing(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, tmp_path: Any, caplog: Any
) -> None:
    ca = TestCA(tmp_path / "pki")
    server = ca.issue("tracegate")
    tg = await start(start_tracegate, issuer, tls_cert=str(server.cert), tls_key=str(server.key))
    host, port = tg.url.removeprefix("http://").split(":")
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        context = ssl.create_default_context(cafile=str(ca.cert))
        reader, writer = await asyncio.open_connection(host, int(port), ssl=context)
        writer.write(export(issuer.mint(), b"tls"))
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
        writer.close()  # close_notify: the server sees the end of the stream
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    await asyncio.sleep(0.2)
    assert [r.body for r in sink.received] == [b"tls"] * 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
