"""Regression tests for the defects an outside review found (issue 8), each written to fail
before its fix, and for the class of bug behind each one."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import struct
from typing import Any
from urllib.parse import urlencode

import aiohttp
import jwt
import pytest

from proxy.dev.standins import Sink, StandInIssuer, gitlab_claims
from proxy.errors import PolicyLoadError
from proxy.observe.logs import JsonFormatter, RedactAiohttp
from proxy.policy import load_policy
from proxy.untrusted import MAX_LOGGED_CHARS, loads, log_text
from tests import gitea_payloads as g
from tests.conftest import PAYMENTS_KEY, Tracegate, environ, policy_yaml

GLOB_SECRET = "glob-entry-secret-abcdef"
GLOB_WEBHOOKS = """
webhooks:
  - name: payments-all
    source: gitea
    repository: "payments/*"
    secret: [{env: GLOB_SECRET}]
    events: [push]
    service_account: payments-ci
    services: [payments-api]
"""


@pytest.fixture
async def hooked(start_tracegate: Any, issuer: StandInIssuer) -> Tracegate:
    tg: Tracegate = await start_tracegate(
        policy_yaml(issuer.url, GLOB_WEBHOOKS), env={**environ(), "GLOB_SECRET": GLOB_SECRET}
    )
    await tg.keys_ready()
    return tg


async def post_hook(
    client: aiohttp.ClientSession,
    tg: Tracegate,
    body: bytes,
    secret: str | None,
    content_type: str = "application/json",
) -> tuple[int, dict[str, Any]]:
    headers = {**g.gitea_headers("push", body, secret), "Content-Type": content_type}
    async with client.post(tg.url + "/webhooks/gitea", data=io.BytesIO(body), headers=headers) as resp:
        return resp.status, await resp.json()


# 1. Every attacker-controlled value that reaches a log, audit line or metric is bounded.


async def test_unsigned_webhook_with_huge_repository_name_writes_a_bounded_audit_line(
    hooked: Tracegate, client: aiohttp.ClientSession
) -> None:
    name = "payments/" + "x\n\x1b[31m" * 60_000  # ~500 KB, matches the glob, control characters inside
    payload = g.push(repo="payments/api")
    payload["repository"]["full_name"] = name
    status, _ = await post_hook(client, hooked, json.dumps(payload).encode(), "wrong-secret")
    assert status == 401
    line = hooked.audit_lines[-1]
    assert len(line) < 2 * MAX_LOGGED_CHARS + 1024
    record = json.loads(line)
    assert record["reason"] == "bad-signature"
    assert len(record["repository"]) == MAX_LOGGED_CHARS
    assert "\n" not in record["repository"] and "\x1b" not in record["repository"]


async def test_token_claims_and_headers_in_audit_lines_are_bounded(
    tracegate: Tracegate, issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    token = issuer.mint(project_path="payments/api", ref="r" * 3000 + "\r\n{forged}", user_login=["a"] * 5)
    async with client.post(tracegate.url + "/v1/traces", data=b"", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200
    record = tracegate.audit()[-1]
    assert len(record["ref"]) == MAX_LOGGED_CHARS
    assert record["user_login"] == "list"
    assert "\r" not in "".join(tracegate.audit_lines[-1:])[:-1]


def test_log_fields_and_messages_are_bounded_and_escaped() -> None:
    record = logging.LogRecord("tracegate", logging.WARNING, __file__, 1, "m" * 5000 + "\n", (), None)
    record.repository = "r\x00" * 1000
    out = json.loads(JsonFormatter().format(record))
    assert len(out["msg"]) <= 1024 and "\n" not in out["msg"]
    assert len(out["repository"]) == MAX_LOGGED_CHARS and "\x00" not in out["repository"]
    assert log_text("a\tb") == "a\\x09b"


# 2. A form body with too many fields: 400, never 500.


async def test_form_body_with_many_fields_is_400_not_500(
    hooked: Tracegate, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    body = urlencode([(f"f{i}", "v") for i in range(50)] + [("payload", "{}")]).encode()
    status, answer = await post_hook(client, hooked, body, GLOB_SECRET, "application/x-www-form-urlencoded")
    assert (status, answer["reason"]) == (400, "bad-form")
    assert hooked.metric("tracegate_unhandled_errors_total") == 0


# 3. Time claims: finite JSON numbers in range, or malformed-claims.


def _signed(issuer: StandInIssuer, raw_claims: bytes) -> str:
    return jwt.PyJWS().encode(raw_claims, issuer.rsa_key, algorithm="RS256", headers={"kid": issuer.rsa_kid})


@pytest.mark.parametrize(
    "name,value",
    [
        ("exp", "null"),
        ("exp", "NaN"),
        ("exp", "Infinity"),
        ("exp", "1e400"),
        ("exp", "true"),
        ("exp", '"4102444800"'),
        ("iat", "null"),
        ("iat", "-Infinity"),
        ("iat", "-1"),
        ("nbf", "NaN"),
        ("nbf", "null"),
    ],
)
async def test_time_claims_that_are_not_finite_numbers_are_malformed_claims(
    tracegate: Tracegate, issuer: StandInIssuer, client: aiohttp.ClientSession, sink: Sink, name: str, value: str
) -> None:
    claims = gitlab_claims(issuer.url, project_path="payments/api")
    claims[name] = 0  # placeholder, replaced in the raw JSON below
    raw = json.dumps(claims).replace(f'"{name}": 0', f'"{name}": {value}').encode()
    token = _signed(issuer, raw)
    async with client.post(tracegate.url + "/v1/traces", data=b"x", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 401
    assert tracegate.audit()[-1]["reason"] == "malformed-claims"
    assert sink.received == []


@pytest.mark.parametrize(
    "document",
    [
        b'{"a": "\\udcff"}',  # an escaped lone surrogate
        b'{"a": "\xed\xb3\xbf"}',  # the same, written raw in UTF-8 (json.loads accepts it)
        '{"a": "\\udcff"}'.encode("utf-16"),  # escaped, in UTF-16 (json.loads detects it)
    ],
)
def test_untrusted_json_refuses_lone_surrogates_however_written(document: bytes) -> None:
    with pytest.raises(ValueError):
        loads(document)
    assert loads(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}  # a pair is a character


def test_untrusted_json_refuses_non_finite_constants() -> None:
    for text in ("NaN", '{"exp": Infinity}', "[-Infinity]"):
        with pytest.raises(ValueError):
            loads(text)
    assert loads('{"exp": 1.5}') == {"exp": 1.5}


# 4. A marker's repository identity comes from the value the entry matched.


async def test_marker_identity_comes_from_full_name_not_other_fields(
    hooked: Tracegate, client: aiohttp.ClientSession, sink: Sink
) -> None:
    payload = g.push(repo="payments/api")
    payload["repository"]["name"] = "billing-core"
    payload["repository"]["owner"]["login"] = "finance"
    status, _ = await post_hook(client, hooked, json.dumps(payload).encode(), GLOB_SECRET)
    assert status == 202
    for _ in range(200):
        if sink.received:
            break
        await asyncio.sleep(0.02)
    span = json.loads(sink.received[0].body)["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    attrs = {a["key"]: a["value"]["stringValue"] for a in span["attributes"]}
    assert attrs["vcs.repository.name"] == "api"
    assert attrs["vcs.owner.name"] == "payments"
    assert attrs["vcs.repository.url.full"] == "https://gitea.example.com/payments/api"


async def test_html_url_naming_another_repository_is_refused(hooked: Tracegate, client: aiohttp.ClientSession) -> None:
    payload = g.push(repo="payments/api")
    payload["repository"]["html_url"] = "https://gitea.example.com/finance/billing-core"
    status, answer = await post_hook(client, hooked, json.dumps(payload).encode(), GLOB_SECRET)
    assert (status, answer["reason"]) == (400, "repository-mismatch")


# 5. Markers are traces: the account must allow them.


def test_webhook_entry_whose_account_cannot_send_traces_fails_to_load(tmp_path: Any) -> None:
    policy = policy_yaml("https://gitlab.example.com", GLOB_WEBHOOKS).replace(
        "access_token: {env: LS_TOKEN_PAYMENTS}", "access_token: {env: LS_TOKEN_PAYMENTS}\n    signals: [metrics]"
    )
    (tmp_path / "p.yaml").write_text(policy)
    with pytest.raises(PolicyLoadError) as caught:
        load_policy(tmp_path, environ={}, resolve_secrets=False)
    assert "may not send traces" in str(caught.value)


async def test_deployment_by_metrics_only_account_is_403(
    start_tracegate: Any, issuer: StandInIssuer, client: aiohttp.ClientSession, sink: Sink
) -> None:
    policy = policy_yaml(issuer.url).replace(
        "access_token: {env: LS_TOKEN_PAYMENTS}", "access_token: {env: LS_TOKEN_PAYMENTS}\n    signals: [metrics]"
    )
    tg: Tracegate = await start_tracegate(policy)
    await tg.keys_ready()
    token = issuer.mint(project_path="payments/api", sha="a" * 40)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with client.post(tg.url + "/v1/deployments", data=b"{}", headers=headers) as resp:
        assert resp.status == 403
        assert (await resp.json())["reason"] == "signal-not-allowed"
    await asyncio.sleep(0.2)
    assert sink.received == []


# 6. Expect: 100-continue is answered only once the credential is known to be good.


async def _raw_exchange(url: str, head: bytes, body: bytes | None = None) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head)
    await writer.drain()
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    rest = b""
    if body is not None and first.startswith(b"HTTP/1.1 100"):
        writer.write(body)
        await writer.drain()
        rest = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    return first + rest


async def test_expect_continue_without_token_is_refused_before_continue(tracegate: Tracegate, sink: Sink) -> None:
    head = (
        b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
        b"Content-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    answer = await _raw_exchange(tracegate.url, head, b"abcd")
    assert answer.startswith(b"HTTP/1.1 401"), answer
    assert b"100 Continue" not in answer
    assert sink.received == []


async def test_expect_continue_with_good_token_continues_and_forwards(
    tracegate: Tracegate, issuer: StandInIssuer, sink: Sink
) -> None:
    token = issuer.mint(project_path="payments/api")
    head = (
        b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    answer = await _raw_exchange(tracegate.url, head, b"abcd")
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"), answer
    assert [r.body for r in sink.received] == [b"abcd"]
    assert len([r for r in tracegate.audit() if r["event"] == "ingest"]) == 1  # admitted once, audited once


async def test_expect_continue_on_webhook_without_headers_is_refused_before_continue(hooked: Tracegate) -> None:
    head = b"POST /webhooks/gitea HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    answer = await _raw_exchange(hooked.url, head, b"abcd")
    assert answer.startswith(b"HTTP/1.1 400"), answer


# 7. Malformed requests: counted, one short warning, no format placeholders, never error level.


@pytest.mark.parametrize(
    "raw,kind",
    [
        (b"GET /v1/traces HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", "bad-message"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "line-too-long"),
        (b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n", "bad-message"),
    ],
)
async def test_malformed_requests_are_counted_and_logged_as_one_warning(
    tracegate: Tracegate, caplog: pytest.LogCaptureFixture, raw: bytes, kind: str
) -> None:
    host, port = tracegate.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.split(b" ", 2)[1].startswith(b"4")  # aiohttp answers an unparsed request as HTTP/1.0
    assert tracegate.metric("tracegate_protocol_errors_total", kind=kind) == 1
    ours = [r for r in caplog.records if r.name.startswith(("tracegate", "aiohttp"))]
    assert all(r.levelno < logging.ERROR for r in ours)
    assert all("%s" not in r.getMessage() for r in ours)


def test_redaction_filter_leaves_no_format_placeholder() -> None:
    record = logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s", ("1.2.3.4",), None
    )
    RedactAiohttp().filter(record)
    assert "%" not in record.getMessage()
    assert record.getMessage() == "Error handling request"


# 8. An HTTP/2 (gRPC) client on the HTTP port is told where to go.


async def test_h2_preface_gets_goaway_naming_the_grpc_port(tracegate: Tracegate) -> None:
    host, port = tracegate.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    frames = []
    while data:
        length = int.from_bytes(data[:3], "big")
        frames.append((data[3], data[9 : 9 + length]))
        data = data[9 + length :]
    assert [kind for kind, _ in frames] == [0x4, 0x7]  # SETTINGS, GOAWAY
    _last_stream, error = struct.unpack(">II", frames[1][1][:8])
    assert error == 0xD  # HTTP_1_1_REQUIRED
    assert b"4317" in frames[1][1]
    assert tracegate.metric("tracegate_protocol_errors_total", kind="grpc-or-h2-on-http-port") == 1


# 9. The upstream compresses only for a client that asked.


@pytest.mark.parametrize("sent,upstream_sees", [(None, "identity"), ("gzip", "gzip")])
async def test_accept_encoding_is_the_clients_or_identity(
    tracegate: Tracegate, issuer: StandInIssuer, sink: Sink, sent: str | None, upstream_sees: str
) -> None:
    token = issuer.mint(project_path="payments/api")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-protobuf"}
    if sent:
        headers["Accept-Encoding"] = sent
    session = aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=("Accept-Encoding",))
    async with session, session.post(tracegate.url + "/v1/traces", data=b"x", headers=headers) as resp:
        assert resp.status == 200
    assert sink.received[-1].headers.getall("Accept-Encoding") == [upstream_sees]
    assert sink.received[-1].headers["lightstep-access-token"] == PAYMENTS_KEY


# Second outside review (issue 8 follow-up): each finding, and its class.


def test_globs_match_in_linear_time_on_hostile_names() -> None:
    # A backtracking regex took 12 s for 512 characters against this pattern; the names
    # come from unsigned webhook bodies and from branch names a job's author picks.
    from proxy.policy.matchers import Matcher

    matcher = Matcher(["*-*-*-*-api", "*/*/*-api"])
    assert not matcher.match_text("-" * 200_000)
    assert not matcher.match_text("/" * 200_000)
    assert matcher.match_text("-" * 200_000 + "api")


async def test_unsigned_webhook_with_pathological_name_against_a_many_star_glob(
    start_tracegate: Any, issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    tg: Tracegate = await start_tracegate(
        policy_yaml(issuer.url, GLOB_WEBHOOKS.replace('"payments/*"', '"*/*-*-*-api"')),
        env={**environ(), "GLOB_SECRET": GLOB_SECRET},
    )
    payload = g.push(repo="payments/api")
    payload["repository"]["full_name"] = "/" + "-" * 500_000
    status, answer = await post_hook(client, tg, json.dumps(payload).encode(), "wrong")
    assert (status, answer["reason"]) == (401, "bad-signature")  # answered as a wrong signature


async def _abort_after(url: str, data: bytes, *, linger_reset: bool = False) -> None:
    host, port = url.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    if linger_reset:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def _settle(tg: Tracegate, reason: str) -> None:
    for _ in range(200):
        if any(r["reason"] == reason for r in tg.audit()):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {reason!r} in the audit")


@pytest.mark.parametrize("path", ["/webhooks/gitea", "/webhooks/gitlab"])
async def test_client_closing_mid_body_is_body_incomplete_not_an_unhandled_error(hooked: Tracegate, path: str) -> None:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"
        "X-Gitea-Event: push\r\nX-Gitea-Delivery: d-1\r\nX-Gitea-Signature: abc\r\nX-Gitlab-Token: t\r\n\r\n"
    ).encode()
    await _abort_after(hooked.url, head + b"{" * 50)
    await _settle(hooked, "body-incomplete")
    assert hooked.metric("tracegate_unhandled_errors_total") == 0


async def test_expect_continue_then_reset_is_no_unhandled_error(hooked: Tracegate, issuer: StandInIssuer) -> None:
    token = issuer.mint(project_path="payments/api")
    heads = [
        b"POST /webhooks/gitea HTTP/1.1\r\nHost: x\r\nX-Gitea-Event: push\r\nX-Gitea-Delivery: d\r\n"
        b"X-Gitea-Signature: abc\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n",
        b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode() + b"\r\n"
        b"Content-Length: 10\r\nExpect: 100-continue\r\n\r\n",
    ]
    for _ in range(10):
        for head in heads:
            await _abort_after(hooked.url, head, linger_reset=True)
    await asyncio.sleep(0.3)
    assert hooked.metric("tracegate_unhandled_errors_total") == 0


async def test_expect_continue_with_oversized_declared_body_is_413_before_continue(
    hooked: Tracegate, issuer: StandInIssuer, sink: Sink
) -> None:
    token = issuer.mint(project_path="payments/api")
    head = (
        b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode() + b"\r\n"
        b"Content-Length: 209715200\r\nExpect: 100-continue\r\n\r\n"
    )
    answer = await _raw_exchange(hooked.url, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    hook_head = (
        b"POST /webhooks/gitea HTTP/1.1\r\nHost: x\r\nX-Gitea-Event: push\r\nX-Gitea-Delivery: d\r\n"
        b"X-Gitea-Signature: abc\r\nContent-Length: 209715200\r\nExpect: 100-continue\r\n\r\n"
    )
    assert (await _raw_exchange(hooked.url, hook_head)).startswith(b"HTTP/1.1 413")
    assert [r["reason"] for r in hooked.audit()[-2:]] == ["body-too-large", "body-too-large"]
    assert sink.received == []


async def test_delivery_header_that_is_not_a_token_is_400_not_500(hooked: Tracegate) -> None:
    body = json.dumps(g.push(repo="payments/api")).encode()
    head = (
        b"POST /webhooks/gitea HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Gitea-Event: push\r\n"
        b"X-Gitea-Delivery: d\xff1\r\nX-Gitea-Signature: " + g.sign(body, GLOB_SECRET).encode() + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    answer = await _raw_exchange(hooked.url, head)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert hooked.audit()[-1]["reason"] == "bad-header"


async def test_json_with_a_lone_surrogate_is_bad_json(hooked: Tracegate, client: aiohttp.ClientSession) -> None:
    body = json.dumps(g.push(repo="payments/api")).replace('"main"', '"ma\\udcffin"', 1).encode()
    status, answer = await post_hook(client, hooked, body, GLOB_SECRET)
    assert (status, answer["reason"]) == (400, "bad-json")
    assert hooked.metric("tracegate_unhandled_errors_total") == 0


async def test_malformed_request_on_the_admin_listener_is_a_counted_warning(
    tracegate: Tracegate, caplog: pytest.LogCaptureFixture
) -> None:
    await _abort_after(tracegate.admin_url, b"GET /metrics HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
    for _ in range(100):
        if tracegate.metric("tracegate_protocol_errors_total", kind="bad-message"):
            break
        await asyncio.sleep(0.02)
    assert tracegate.metric("tracegate_protocol_errors_total", kind="bad-message") == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_jwks_entry_with_a_structured_kty_is_skipped(
    start_tracegate: Any, issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    document = issuer.jwks()
    document["keys"].insert(0, {"kid": "odd", "kty": {}})
    document["keys"].insert(0, {"kid": "odder", "kty": ["RSA"], "use": []})
    issuer.jwks_body = json.dumps(document).encode()
    tg: Tracegate = await start_tracegate(policy_yaml(issuer.url))
    await tg.keys_ready()
    headers = {"Authorization": f"Bearer {issuer.mint(project_path='payments/api')}"}
    async with client.post(tg.url + "/v1/traces", data=b"x", headers=headers) as resp:
        assert resp.status == 200


def test_log_text_escapes_c1_controls_bidi_overrides_and_separators() -> None:
    out = log_text("a\x9b31m\u202eevil\u2028x\x85y")
    assert out == "a\\x9b31m\\u202eevil\\u2028x\\x85y"
    assert out.isprintable()
    assert log_text("ünïcødé stays") == "ünïcødé stays"
