"""Hostile HTTP, beyond each feature's own tests: smuggling, header injection, oversized
and trickling requests, spoofed header spellings, tokens in odd places and odd shapes.
Each is refused (or ignored) with nothing reaching the upstream and no token in the logs."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import aiohttp
import pytest

from proxy.dev.standins import Sink, StandInIssuer, gitlab_claims
from tests.conftest import PAYMENTS_KEY, Tracegate, assert_no_secrets, policy_yaml


async def raw(tg: Tracegate, data: bytes, *, wait: float = 5.0) -> bytes:
    """Send raw bytes on a fresh connection; return everything read until EOF or ``wait``."""
    port = int(tg.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = b""
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(wait):
            while not _complete(out) and (chunk := await reader.read(65536)):
                out += chunk
    except (TimeoutError, ConnectionResetError, BrokenPipeError):
        pass  # refused mid-send: the server closed (RST) while we were still writing
    writer.close()
    return out


def _complete(response: bytes) -> bool:
    """True once ``response`` holds a whole HTTP response (headers and Content-Length body)."""
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def request(token: str, *headers: str, body: bytes = b"0123456789", extra: bytes = b"") -> bytes:
    lines = [
        "POST /v1/traces HTTP/1.1",
        "Host: tracegate",
        f"Authorization: Bearer {token}",
        "Content-Type: application/x-protobuf",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + extra + body


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) else 0


@pytest.mark.parametrize(
    ("name", "headers", "body"),
    [
        ("content-length-with-chunked", ("Content-Length: 10", "Transfer-Encoding: chunked"), b"0\r\n\r\n"),
        ("two-content-lengths", ("Content-Length: 10", "Content-Length: 4"), b"0123456789"),
        ("chunked-not-last", ("Transfer-Encoding: chunked, gzip",), b"0\r\n\r\n"),
        ("obs-fold-header", ("Content-Length: 10", "X-A: a\r\n b"), b"0123456789"),
        ("cr-in-value", ("Content-Length: 10", "X-A: a\rb"), b"0123456789"),
        ("nul-in-value", ("Content-Length: 10", "X-A: a\x00b"), b"0123456789"),
        ("space-before-colon", ("Content-Length : 10",), b"0123456789"),
        ("too-many-headers", ("Content-Length: 10", *[f"X-H{i}: v" for i in range(150)]), b"0123456789"),
        ("huge-header", ("Content-Length: 10", "X-Big: " + "a" * 20000), b"0123456789"),
    ],
)
async def test_malformed_http_is_refused_before_anything_is_forwarded(
    name: str,
    headers: tuple[str, ...],
    body: bytes,
    tracegate: Tracegate,
    issuer: StandInIssuer,
    sink: Sink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = issuer.mint()
    response = await raw(tracegate, request(token, *headers, body=body))
    assert status_of(response) in (400, 413, 431) or response == b"", response[:200]
    assert response == b"" or response.endswith((b"Bad Request", b"Request Header Fields Too Large")), response
    await asyncio.sleep(0.1)
    assert sink.received == []
    assert_no_secrets(caplog.text + "".join(tracegate.audit_lines), token)


async def test_a_one_megabyte_token_is_refused_unlogged(
    tracegate: Tracegate, issuer: StandInIssuer, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    big = issuer.mint(project_path="payments/" + "a" * (1 << 20))
    response = await raw(tracegate, request(big, "Content-Length: 10"))
    assert status_of(response) in (400, 431) or response == b""
    assert sink.received == []
    assert big[:64] not in caplog.text and big[-64:] not in caplog.text


async def test_a_token_over_6_KiB_that_fits_the_header_limit_is_refused(
    tracegate: Tracegate, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    token = issuer.mint(project_path="payments/" + "a" * 4800)
    assert 6144 < len(token) < 8000
    async with client.post(tracegate.url + "/v1/traces", data=b"x", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 401
    assert tracegate.audit()[-1]["reason"] == "token-too-large"
    assert sink.received == []


async def test_slow_headers_are_cut_off(start_tracegate: Any, issuer: StandInIssuer, sink: Sink) -> None:
    tg = await start_tracegate(policy_yaml(issuer.url), idle_timeout="1")
    port = int(tg.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\n")
    closed = False
    for _ in range(40):  # trickle a header byte every 100 ms
        try:
            writer.write(b"X")
            await writer.drain()
        except ConnectionError:
            closed = True
            break
        if reader.at_eof():
            closed = True
            break
        try:
            async with asyncio.timeout(0.1):
                if await reader.read(1024) == b"":
                    closed = True
                    break
        except TimeoutError:
            pass
    writer.close()
    assert closed
    assert time.monotonic() - started < 3.5
    assert sink.received == []


async def test_slow_body_gets_408_and_nothing_complete_upstream(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink
) -> None:
    tg = await start_tracegate(policy_yaml(issuer.url), body_timeout="0.5")
    await tg.keys_ready()
    started = time.monotonic()
    response = await raw(tg, request(issuer.mint(), "Content-Length: 1000", body=b"x" * 10), wait=5)
    assert status_of(response) == 408
    assert time.monotonic() - started < 3
    await asyncio.sleep(0.2)
    assert sink.received == []
    assert tg.audit()[-1]["reason"] == "body-timeout"


async def test_underscore_and_case_spellings_of_credentials_never_reach_upstream(
    tracegate: Tracegate, issuer: StandInIssuer, sink: Sink
) -> None:
    token = issuer.mint()
    response = await raw(
        tracegate,
        request(
            token,
            "Content-Length: 10",
            "X_Forwarded_For: 10.0.0.9",
            "LIGHTSTEP_ACCESS_TOKEN: stolen-key",
            "X-Forwarded-Host: evil",
            "Proxy-Authorization: Basic eA==",
            "Connection: keep-alive, X-Custom",
            "X-Custom: dropped-because-named-by-connection",
            "TE: trailers",
        ),
        wait=1,
    )
    assert status_of(response) == 200
    got = sink.received[0].headers
    assert got.getall("lightstep-access-token") == [PAYMENTS_KEY]
    for name in got:
        assert "_" not in name
        assert name.lower() not in (
            "x-forwarded-for",
            "x-forwarded-host",
            "proxy-authorization",
            "x-custom",
            "te",
            "authorization",
        )


async def test_token_in_query_string_is_refused_and_never_logged(
    tracegate: Tracegate,
    issuer: StandInIssuer,
    sink: Sink,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = issuer.mint()
    for query in (f"?access_token={token}", f"?x={token}", f"?jwt={token}"):
        async with client.post(tracegate.url + "/v1/traces" + query, data=b"x") as resp:
            assert resp.status == 401
    assert sink.received == []
    assert_no_secrets(caplog.text + "".join(tracegate.audit_lines), token)


def _forge(issuer: StandInIssuer, payload: bytes) -> str:
    """A token whose payload segment is exactly ``payload`` (bytes), signed by the issuer."""
    import jwt

    head = base64.urlsafe_b64encode(json.dumps({"alg": "RS256", "kid": issuer.rsa_kid}).encode()).rstrip(b"=")
    body = base64.urlsafe_b64encode(payload).rstrip(b"=")
    signing_input = head + b"." + body
    algorithm = jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256)
    signature = algorithm.sign(signing_input, issuer.rsa_key)
    return (signing_input + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()


@pytest.mark.parametrize(
    ("payload", "status", "reason"),
    [
        (b'{"iss": "\xff\xfe not utf-8"}', 401, "malformed-token"),
        (b"[" * 2500 + b"]" * 2500, 401, "token-too-large"),
        (b"[" * 1500 + b"]" * 1500, 401, "malformed-token"),  # deeper than the JSON parser goes
    ],
)
async def test_odd_claims_are_refused(
    payload: bytes,
    status: int,
    reason: str,
    tracegate: Tracegate,
    issuer: StandInIssuer,
    sink: Sink,
    client: aiohttp.ClientSession,
) -> None:
    token = _forge(issuer, payload)
    async with client.post(tracegate.url + "/v1/traces", data=b"x", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == status
    assert tracegate.audit()[-1]["reason"] == reason
    assert sink.received == []


async def test_nested_claims_in_a_valid_token_never_match_and_are_cut_in_the_audit(
    tracegate: Tracegate, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    nested: Any = "payments/api"
    for _ in range(200):
        nested = [nested]
    claims = gitlab_claims(issuer.url, project_path=nested, user_login="u" * 3000)
    token = _forge(issuer, json.dumps(claims).encode())
    async with client.post(tracegate.url + "/v1/traces", data=b"x", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 403
    record = tracegate.audit()[-1]
    assert record["reason"] == "no-rule-matched"
    assert record["project_path"] == "list"
    assert len(record["user_login"]) == 256
    assert sink.received == []
