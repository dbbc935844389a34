"""The ingest listener's own export server (proxy/doors/ingest_conn.py), over raw sockets: what it
serves itself, what it hands to aiohttp on the same connection, pipelining, early answers,
broken framing, HTTP/1.0 and drain. The ordinary clients' view of it is the rest of the
suite (the SDK, aiohttp, curl), which runs against it unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httptools
import pytest

from proxy.dev.standins import Sink, StandInIssuer
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


def unread_socket(url: str) -> socket.socket:
    """A client socket with a small receive buffer, that is never read."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    return sock


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


async def test_chunk_extensions_and_trailer_fields_are_dropped_not_forwarded(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    """Trailer fields come through the parser's header callback after the head: they are
    not head fields (they cut nothing off and go nowhere), but they count with the head's
    against the listener's 100, as on aiohttp's server (the head has 4 here)."""
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    trailers = "".join(f"X-Trailer-{i}: {i}\r\n" for i in range(96))
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
    """httptools gathers a field before its callback: a head whose reads pass 64 KiB before
    it ends is refused (431) while it is still arriving (one 256 MiB field took 1 GB)."""
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    await conn.send(b"POST /v1/traces HTTP/1.1\r\nHost: t\r\nX-Big: ")
    with contextlib.suppress(ConnectionError):
        for _ in range(4):  # 256 KiB of one field, no end of line
            await conn.send(b"a" * 65536)
    refused = await conn.answer()  # before the field (or the head) ended
    assert refused.status == 431
    assert await conn.closed()
    assert tg.metric("tracegate_protocol_errors_total", kind="head-too-large") == 1
    assert sink.received == []


async def test_a_client_that_does_not_read_its_answers_stops_being_read(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink
) -> None:
    """Pipelined requests whose answers the client never reads: once an answer fills the
    buffers, tracegate stops reading (its answers wait in bounded buffers) instead of
    answering all of them into memory."""
    tg = await start(start_tracegate, issuer)
    sink.answer = b"x" * (3 << 20)  # more than the kernel buffers on either side take
    sock = unread_socket(tg.url)
    sock.setblocking(False)
    _reader, writer = await asyncio.open_connection(sock=sock)
    request = export(issuer.mint())
    writer.write(request)
    while not tg.audit():  # forwarded, and its answer written (and not read) at once
        await asyncio.sleep(0.01)
    sent, stalled = 0, False
    try:
        while sent < 400_000:
            writer.write(request * 8)
            try:
                await asyncio.wait_for(writer.drain(), 2)
            except TimeoutError:
                stalled = True
                break
            sent += 8
        assert stalled, "tracegate read 400,000 requests whose answers were never read"
        assert len(tg.audit()) < 32
    finally:
        writer.transport.abort()


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


# -- at least as strict as aiohttp's server, input by input ------------------------------------


@pytest.fixture(autouse=True)
def _no_error_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """No error-level line, from tracegate or the sink: an exception escaping
    ``data_received`` is logged by asyncio as "Fatal error: protocol.data_received() call
    failed" (and the connection dropped), which the suite's own markers do not catch."""
    yield
    fatal = [r.getMessage() for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not fatal, fatal


def chunked_export(token: str, tail: bytes, *, version: str = "HTTP/1.1", extra: str = "") -> bytes:
    """An export whose body is chunked (four fields in its head); ``tail`` is the framing."""
    return (
        f"POST /v1/traces {version}\r\nHost: t\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/x-protobuf\r\nTransfer-Encoding: chunked\r\n{extra}\r\n"
    ).encode() + tail


async def refused(conn: Conn, status: int) -> Answer:
    """The answer, which must be ``status`` and closing. The client then ends its side, as
    one that read the answer does (else the server lingers 2 s reading what might follow)."""
    answer = await conn.answer()
    assert answer.status == status, (answer.status, answer.body)
    assert answer.headers["connection"] == "close"
    conn.writer.write_eof()
    assert await conn.closed()
    return answer


def trailer_fields(count: int) -> bytes:
    return b"".join(b"X-T-%d: %d\r\n" % (i, i) for i in range(count))


@pytest.mark.parametrize(
    ("trailers", "kind"),
    [
        # The head has 4 fields: with 97 trailers the message has 101, one more than aiohttp takes.
        pytest.param(trailer_fields(97), "bad-message", id="head-and-trailer-fields-over-100"),
        pytest.param(b"X-Big: " + b"a" * 8186 + b"\r\n", "line-too-long", id="one-field-over-8190-bytes"),
    ],
)
async def test_trailers_over_aiohttps_limits_are_refused_and_nothing_goes_upstream(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any, trailers: bytes, kind: str
) -> None:
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    await conn.send(chunked_export(issuer.mint(), b"4\r\nspan\r\n0\r\n" + trailers + b"\r\n"))
    await refused(conn, 400)
    await asyncio.sleep(0.2)
    assert sink.received == []
    assert tg.metric("tracegate_protocol_errors_total", kind=kind) == 1
    assert tg.audit()[-1]["reason"] == "body-incomplete"


async def test_trailers_at_aiohttps_limits_are_taken(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    big = b"X-Big: " + b"a" * 8185 + b"\r\n"  # name and value: 8190 bytes
    await conn.send(chunked_export(issuer.mint(), b"4\r\nspan\r\n0\r\n" + big + trailer_fields(95) + b"\r\n"))
    answer = await conn.answer()
    assert answer.status == 200
    assert "connection" not in answer.headers
    assert [r.body for r in sink.received] == [b"span"]


async def test_an_unterminated_trailer_field_is_refused_as_it_grows_not_gathered(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    """httptools gathers a field before its callback: a trailer field that never ends was
    held whole (one grew to 162 MiB). It is refused once its reads pass aiohttp's 8190 bytes."""
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    await conn.send(chunked_export(issuer.mint(), b"4\r\nspan\r\n0\r\nX-Big: "))
    with contextlib.suppress(ConnectionError):
        for _ in range(32):  # 32 KiB of one field, never ended, in reads of their own
            await conn.send(b"a" * 1024)
            await asyncio.sleep(0.01)
    answer = await conn.answer(timeout=5)
    assert (answer.status, answer.headers["connection"]) == (400, "close")
    assert await conn.closed()
    assert sink.received == []
    assert tg.metric("tracegate_protocol_errors_total", kind="line-too-long") == 1


HOSTLESS = {
    "no-host": b"POST /v1/traces HTTP/1.1\r\n",
    "two-hosts": b"POST /v1/traces HTTP/1.1\r\nHost: t\r\nHost: t\r\n",
    "two-different-hosts-http-1.0": b"POST /v1/traces HTTP/1.0\r\nHost: t\r\nHost: u\r\n",
    "two-content-types": b"POST /v1/traces HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n",
    "two-user-agents": b"POST /v1/traces HTTP/1.1\r\nHost: t\r\nUser-Agent: a\r\nUser-Agent: b\r\n",
}


def head_then(first: bytes, token: str, body: bytes = b"span") -> bytes:
    return (
        first
        + b"Authorization: Bearer "
        + token.encode()
        + b"\r\nContent-Type: application/x-protobuf\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )


@pytest.mark.parametrize("first", HOSTLESS.values(), ids=HOSTLESS.keys())
async def test_a_missing_or_repeated_host_or_other_singleton_field_is_a_400_never_forwarded(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any, first: bytes
) -> None:
    """RFC 9112 §3.2 (Host), and aiohttp's singleton fields: refused, never forwarded."""
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    await conn.send(head_then(first, issuer.mint()))
    answer = await refused(conn, 400)
    assert answer.body == b"Bad Request"
    await asyncio.sleep(0.2)
    assert sink.received == []
    assert tg.metric("tracegate_protocol_errors_total", kind="bad-message") == 1


async def test_a_refusal_pipelined_behind_an_export_is_answered_in_its_turn(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    token = issuer.mint()
    await conn.send(export(token, b"first") + head_then(HOSTLESS["no-host"], token, b"second") + export(token))
    first = await conn.answer()
    assert (first.status, first.headers.get("connection")) == (200, None)
    await refused(conn, 400)
    await asyncio.sleep(0.2)
    assert [r.body for r in sink.received] == [b"first"]


async def test_http_1_0_with_transfer_encoding_closes_the_connection_after_its_answer(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    """RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing; the
    server closes the connection after answering it, whatever Connection says, and reads
    nothing after it."""
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    token = issuer.mint()
    request = chunked_export(token, b"4\r\nspan\r\n0\r\n\r\n", version="HTTP/1.0", extra="Connection: keep-alive\r\n")
    await conn.send(request + export(token, b"after"))
    answer = await conn.answer()
    assert (answer.status, answer.headers["connection"]) == (200, "close")
    assert await conn.closed()
    await asyncio.sleep(0.2)
    assert [r.body for r in sink.received] == [b"span"]


WEBHOOK = b"POST /webhooks/gitea HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize(
    ("coding", "status", "kind"),
    [
        (b"Transfer-Encoding: gzip, chunked\r\n", 501, "bad-transfer-encoding"),
        (b"Transfer-Encoding: identity, chunked\r\n", 501, "bad-transfer-encoding"),
        (b"Transfer-Encoding: gzip, ,chunked\r\n", 501, "bad-transfer-encoding"),
        # Refused by aiohttp too, once handed off; here, at the door, in their turn:
        (b"Transfer-Encoding: gzip\r\n", 400, "bad-transfer-encoding"),
        (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", 400, "bad-message"),
    ],
    ids=["gzip-chunked", "identity-chunked", "gzip-empty-chunked", "gzip", "two-fields"],
)
@pytest.mark.parametrize("first", [b"POST /v1/traces HTTP/1.1\r\nHost: t\r\n", WEBHOOK], ids=["export", "webhook"])
async def test_a_transfer_coding_but_chunked_is_refused_at_the_door_not_handed_to_aiohttp(
    start_tracegate: Any,
    issuer: StandInIssuer,
    sink: Sink,
    connect: Any,
    first: bytes,
    coding: bytes,
    status: int,
    kind: str,
) -> None:
    """RFC 9112 §6.1/§7: a coding the server does not implement is a 501; chunked not last,
    or twice, a 400. aiohttp ignores the gzip of ``gzip, chunked`` and serves the body."""
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    token = issuer.mint()
    await conn.send(
        first + b"Authorization: Bearer " + token.encode() + b"\r\n" + coding + b"\r\n4\r\nspan\r\n0\r\n\r\n"
    )
    await refused(conn, status)
    await asyncio.sleep(0.2)
    assert sink.received == []
    assert tg.metric("tracegate_protocol_errors_total", kind=kind) == 1


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/0.9"])
@pytest.mark.parametrize("path", ["/v1/traces", "/webhooks/gitea"])
async def test_an_http_1_request_line_of_another_version_is_a_505(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any, version: str, path: str
) -> None:
    """aiohttp answers ``POST /v1/traces HTTP/2.0`` as if it were HTTP/1 (RFC 9110 §15.6.6: 505)."""
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    await conn.send(export(issuer.mint(), path=path).replace(b"HTTP/1.1", version.encode(), 1))
    answer = await refused(conn, 505)
    assert answer.body == b"HTTP Version Not Supported"
    await asyncio.sleep(0.2)
    assert sink.received == []
    assert tg.metric("tracegate_protocol_errors_total", kind="bad-http-version") == 1


async def test_a_head_past_64_kib_within_aiohttps_field_limits_is_refused_not_handed_off(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    """A head that arrives in reads: handed to aiohttp past 64 KiB, it skipped the door's
    checks (here: gzip, chunked). One that arrives whole in one read is checked here."""
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    pad = "".join(f"X-Pad-{i}: {'a' * 8000}\r\n" for i in range(10))
    request = chunked_export(issuer.mint(), b"4\r\nspan\r\n0\r\n\r\n", extra=pad)
    request = request.replace(b"chunked", b"gzip, chunked", 1)
    with contextlib.suppress(ConnectionError):
        for at in range(0, len(request), 4096):
            await conn.send(request[at : at + 4096])
            await asyncio.sleep(0.005)
    await refused(conn, 431)
    await asyncio.sleep(0.2)
    assert sink.received == []
    assert tg.metric("tracegate_protocol_errors_total", kind="head-too-large") == 1


async def test_more_pipelined_requests_in_one_read_than_the_queue_takes_close_the_connection(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any
) -> None:
    """A read of 100 small requests made 100 queued exports (about 2 KB each) at once. At most
    32 are parsed ahead, as aiohttp queues; then the connection closes after their answers
    (RFC 9112 §9.3.2: the client retries the rest on a new connection)."""
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    await conn.send(export("not-a-token", b"") * 100)
    answers = []
    with contextlib.suppress(ConnectionError):
        while True:
            answers.append(await conn.answer(timeout=5))
    assert [a.status for a in answers] == [401] * 32
    assert answers[-1].headers["connection"] == "close"
    assert len(tg.audit()) == 32
    assert tg.metric("tracegate_protocol_errors_total", kind="pipeline-overflow") == 1


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"], ids=["kept-alive", "closing"])
async def test_a_client_that_never_reads_its_answer_is_cut_off_after_the_idle_timeout(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, version: str
) -> None:
    """Writing pauses past the transport's high-water mark; a client that never reads held
    the connection (and the answer's bytes) for ever, open or closing (close waits for the
    buffer to drain). Now it is aborted once writing has stalled for the idle timeout."""
    tg = await start(start_tracegate, issuer, idle_timeout="0.5")
    sink.answer = b"x" * (3 << 20)  # larger than what the kernel buffers on either side
    sock = unread_socket(tg.url)
    try:
        sock.sendall(export(issuer.mint()).replace(b"HTTP/1.1", version.encode(), 1))
        for _ in range(100):
            await asyncio.sleep(0.1)
            if tg.metric("tracegate_protocol_errors_total", kind="send-timeout"):
                break
        assert tg.metric("tracegate_protocol_errors_total", kind="send-timeout") == 1
        await asyncio.sleep(0.1)
        assert not tg.runners[0].server.lanes
    finally:
        sock.close()
    assert [r.body for r in sink.received] == [b"span"]


class StatusSwap:
    """The forwarder, whose answers carry ``status`` instead of the upstream's: a status no
    upstream answer can bring (upstream_conn refuses them), to reach the writer's own check."""

    def __init__(self, forwarder: Any, status: int) -> None:
        self._forwarder, self._status = forwarder, status

    async def forward(self, *args: Any, **kwargs: Any) -> Any:
        answer = await self._forwarder.forward(*args, **kwargs)
        return dataclasses.replace(answer, status=self._status)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._forwarder, name)


@pytest.mark.parametrize("status", [0, 99, 600, 999, 1000, 100])
async def test_an_answer_whose_status_is_not_a_final_three_digit_one_is_written_as_a_502(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any, status: int
) -> None:
    """RFC 9110 §15: three digits, 1xx to 5xx; a 1xx is interim and never a final answer
    (the client would take the next answer for this request's)."""
    tg = await start(start_tracegate, issuer)
    tg.runtime.forwarder = StatusSwap(tg.runtime.forwarder, status)
    conn = await connect(tg.url)
    await conn.send(export(issuer.mint()))
    answer = await conn.answer()
    assert answer.status == 502
    assert answer.headers["connection"] == "close"
    assert await conn.closed()


@pytest.mark.parametrize(
    "data",
    [
        b"FOO /v1/traces HTTP/1.1\r\nHost: t\r\n\r\n",  # HttpParserInvalidMethodError
        b"CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\n\r\n",  # an upgrade to llhttp
        b"POST /v1/traces HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 0\r\n\r\n",
        b"POST /v1/traces HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX: \x00\r\n\r\n",
        b"POST /v1/traces HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1;\x01\r\na\r\n0\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
        b"\r\n\r\n\r\n",
    ],
)
@pytest.mark.parametrize("pipelined", [False, True])
async def test_no_parser_error_escapes_data_received(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, connect: Any, data: bytes, pipelined: bool
) -> None:
    tg = await start(start_tracegate, issuer)
    conn = await connect(tg.url)
    await conn.send((export(issuer.mint(), b"first") if pipelined else b"") + data)
    with contextlib.suppress(ConnectionError, TimeoutError, httptools.HttpParserError):
        while True:
            assert (await conn.answer(timeout=1)).status != 500
    assert tg.metric("tracegate_unhandled_errors_total") == 0
