"""The authorization listener against each gateway's documented check request.

Envoy and Traefik cannot be installed here, so each test sends the check request that
gateway's documentation describes (Envoy HTTP ext_authz: the original method and path
under ``path_prefix``, no body, the ``allowed_headers``; Traefik ForwardAuth: a GET to the
configured address with ``X-Forwarded-Method``/``X-Forwarded-Uri`` and the client's
headers) over a real socket, and asserts the exact answer headers that gateway acts on.
nginx's check is covered end to end in test_gateway_nginx.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

from proxy.answers import status_protobuf
from proxy.dev.standins import Sink, StandInIssuer
from proxy.errors import ConfigError
from proxy.settings.config import Settings
from tests.certs import TestCA
from tests.conftest import DOCS_KEY, PAYMENTS_KEY, Tracegate, assert_no_secrets, environ, policy_yaml

TRACES_GRPC = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


async def start_authz(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, dialect: str, *, env: Any = None, **flags: str
) -> tuple[Tracegate, str]:
    tg: Tracegate = await start_tracegate(
        policy_yaml(issuer.url), env=env, authz_listen="127.0.0.1:0", authz_dialect=dialect, **flags
    )
    return tg, f"http://127.0.0.1:{tg.runners[2].addresses[0][1]}"


def authz_lines(tg: Tracegate) -> list[dict[str, Any]]:
    return [r for r in tg.audit() if r["event"] == "authz"]


def envoy_check(token: str, **extra: str) -> dict[str, str]:
    """Headers of Envoy's HTTP ext_authz check as deploy/envoy/envoy.yaml configures it."""
    return {
        "Host": "otlp.ci.internal",
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/x-protobuf",
        "Content-Length": "0",
        "x-envoy-expected-rq-timeout-ms": "1000",
        "x-forwarded-proto": "http",
        "x-request-id": "9b1c0f6e-5f7e-4b55-9a53-1d2c1c5b6f0e",
        **extra,
    }


async def test_envoy_check_allow_carries_the_key_and_what_envoy_acts_on(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, client: aiohttp.ClientSession, caplog: Any
) -> None:
    tg, url = await start_authz(start_tracegate, issuer, "envoy", authz_path_prefix="/authz")
    await tg.keys_ready()
    token = issuer.mint()
    async with client.post(url + "/authz/v1/traces", headers=envoy_check(token)) as resp:
        assert resp.status == 200
        assert resp.headers["lightstep-access-token"] == PAYMENTS_KEY
        # Every credential name a Lightstep account does not set (the client's token among them).
        removed = resp.headers["x-envoy-auth-headers-to-remove"].split(",")
        assert "authorization" in removed and "x-honeycomb-team" in removed
        assert "lightstep-access-token" not in removed
        assert resp.headers["x-tracegate-account"] == "payments-ci"
        assert resp.headers["x-tracegate-rule"] == "payments-protected"
        names = [name.decode().lower() for name, _ in resp.raw_headers]
        assert names.index("x-accel-expires") < names.index("cache-control")  # nginx needs this order
        assert await resp.read() == b""
    # gRPC traffic: the same check with the OTLP/gRPC method path.
    async with client.post(
        url + "/authz" + TRACES_GRPC, headers=envoy_check(token, **{"Content-Type": "application/grpc"})
    ) as resp:
        assert resp.status == 200
        assert resp.headers["lightstep-access-token"] == PAYMENTS_KEY
    [first, second] = authz_lines(tg)
    assert (first["decision"], first["signal"], first["transport"], first["project_path"]) == (
        "allowed",
        "traces",
        "authz",
        "payments/api",
    )
    assert second["signal"] == "traces"
    assert_no_secrets(caplog.text + "".join(tg.audit_lines), token)


async def test_envoy_check_denials_are_relayable_otlp_answers_without_a_key(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    tg, url = await start_authz(start_tracegate, issuer, "envoy", authz_path_prefix="/authz")
    await tg.keys_ready()
    head, payload, sig = issuer.mint().split(".")
    cases = [
        ("/authz/v1/traces", f"{head}.{payload}.{sig[:-6]}AAAAAA", 401, 16, "bad-signature"),
        ("/authz/v1/traces", issuer.mint(project_path="payments/forks/api"), 403, 7, "rule-denied"),
        ("/authz/v1/logs", issuer.mint(project_path="docs/site"), 403, 7, "signal-not-allowed"),
        ("/authz/v1/profiles", issuer.mint(), 403, 7, "authz-unknown-path"),
        ("/v1/traces", issuer.mint(), 403, 7, "authz-no-original-request"),  # outside the prefix
    ]
    for path, token, status, code, reason in cases:
        async with client.post(url + path, headers=envoy_check(token)) as resp:
            assert resp.status == status, reason
            assert "lightstep-access-token" not in resp.headers
            assert resp.headers["Content-Type"] == "application/x-protobuf"
            assert (await resp.read())[:2] == status_protobuf(code, "")[:2]
            assert resp.headers["Cache-Control"] == "private, max-age=5"
            assert resp.headers["X-Accel-Expires"] == "5"
            assert ("WWW-Authenticate" in resp.headers) == (status == 401)
        assert authz_lines(tg)[-1]["reason"] == reason
    # The original method is the check's method: anything but POST is refused.
    async with client.get(url + "/authz/v1/traces", headers=envoy_check(issuer.mint())) as resp:
        assert resp.status == 403
    assert authz_lines(tg)[-1]["reason"] == "authz-method-not-allowed"
    assert (
        tg.metric(
            "tracegate_requests_total",
            signal="unknown",
            service_account="",
            decision="refused",
            reason="authz-unknown-path",
            transport="authz",
        )
        == 1
    )


async def test_traefik_forwardauth_check_reads_the_forwarded_uri_and_method(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    tg, url = await start_authz(start_tracegate, issuer, "traefik")
    await tg.keys_ready()
    docs = issuer.mint(project_path="docs/site")

    def forward_auth(uri: str, method: str = "POST", **extra: str) -> dict[str, str]:
        # What Traefik's ForwardAuth sends (trustForwardHeader false): a GET to its address with
        # the client's headers (authRequestHeaders) and X-Forwarded-* describing the original.
        return {
            "Authorization": f"Bearer {docs}",
            "Content-Type": "application/json",
            "X-Forwarded-Method": method,
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "otlp.ci.internal",
            "X-Forwarded-Uri": uri,
            "X-Forwarded-For": "10.1.2.3",
            **extra,
        }

    async with client.get(url + "/traefik-check", headers=forward_auth("/v1/traces")) as resp:
        assert resp.status == 200
        assert resp.headers["lightstep-access-token"] == DOCS_KEY
    # The nginx dialect's header means nothing here: a client cannot pick its own signal.
    headers = forward_auth("/v1/logs", **{"X-Original-URI": "/v1/traces"})
    async with client.get(url + "/traefik-check", headers=headers) as resp:
        assert resp.status == 403
        assert resp.headers["Content-Type"] == "application/json"
        assert await resp.json() == {"code": 7, "message": "this token may not send this telemetry"}
        assert "lightstep-access-token" not in resp.headers
    async with client.get(url + "/traefik-check", headers=forward_auth("/v1/traces", method="GET")) as resp:
        assert resp.status == 403
    async with client.get(url + "/traefik-check", headers={"Authorization": f"Bearer {docs}"}) as resp:
        assert resp.status == 403  # no X-Forwarded-Uri: not a ForwardAuth check
    assert [r["reason"] for r in authz_lines(tg)] == [
        "authorized",
        "signal-not-allowed",
        "authz-method-not-allowed",
        "authz-no-original-request",
    ]


async def test_allow_is_cacheable_only_until_the_tokens_exp(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    tg, url = await start_authz(start_tracegate, issuer, "nginx", authz_key_header="x-ls-key")
    await tg.keys_ready()

    async def max_age(token: str) -> tuple[int, int]:
        headers = {"Authorization": f"Bearer {token}", "X-Original-URI": "/v1/traces", "X-Original-Method": "POST"}
        async with client.post(url + "/check", headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["x-ls-key"] == PAYMENTS_KEY
            assert "lightstep-access-token" not in resp.headers
            cache = resp.headers["Cache-Control"]
            assert cache.startswith("private, max-age=")
            return int(cache.rsplit("=", 1)[1]), int(resp.headers["X-Accel-Expires"])

    assert await max_age(issuer.mint(exp=int(time.time()) + 3600)) == (30, 30)
    short, accel = await max_age(issuer.mint(exp=int(time.time()) + 10))
    assert 8 <= short <= 10 and accel == short
    # Expired but inside the leeway: allowed, and not cacheable at all.
    assert await max_age(issuer.mint(exp=int(time.time()) - 5)) == (0, 0)
    # An infinite exp is not a time: refused (malformed-claims), never cached as an allow.
    headers = {"Authorization": f"Bearer {issuer.mint(exp=float('inf'))}", "X-Original-URI": "/v1/traces"}
    async with client.post(url + "/check", headers={**headers, "X-Original-Method": "POST"}) as resp:
        assert resp.status == 401
        assert "x-ls-key" not in resp.headers


async def test_issuer_keys_not_ready_is_503_and_never_cached(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    issuer.available = False
    _tg, url = await start_authz(start_tracegate, issuer, "nginx")
    headers = {"Authorization": f"Bearer {issuer.mint()}", "X-Original-URI": "/v1/traces", "X-Original-Method": "POST"}
    async with client.post(url + "/", headers=headers) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "5"
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["X-Accel-Expires"] == "0"
        assert "lightstep-access-token" not in resp.headers


async def test_the_gateways_shared_secret_is_required_and_compared_whole(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, client: aiohttp.ClientSession, caplog: Any
) -> None:
    secret = "gateway-secret-5f0c8e1b2a7d4c39"
    env = {**environ(), "AUTHZ_SECRET": secret}
    tg, url = await start_authz(start_tracegate, issuer, "nginx", env=env, authz_secret="env:AUTHZ_SECRET")
    await tg.keys_ready()
    token = issuer.mint()
    base = {"Authorization": f"Bearer {token}", "X-Original-URI": "/v1/traces", "X-Original-Method": "POST"}
    for presented in ([], [secret[:-1]], [secret + "x"], [secret, secret]):
        headers = CIMultiDict(base)
        for value in presented:
            headers.add("X-Tracegate-Authz-Secret", value)
        async with client.post(url + "/", headers=headers) as resp:
            assert resp.status == 403
            assert "lightstep-access-token" not in resp.headers
    async with client.post(url + "/", headers={**base, "X-Tracegate-Authz-Secret": secret}) as resp:
        assert resp.status == 200
    reasons = [r["reason"] for r in authz_lines(tg)]
    assert reasons == ["authz-gateway-unauthenticated"] * 4 + ["authorized"]
    assert secret not in caplog.text + "".join(tg.audit_lines)


async def test_bad_authz_settings_stop_tracegate_with_the_setting_named(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer
) -> None:
    with pytest.raises(ConfigError, match="TRACEGATE_AUTHZ_SECRET: environment variable MISSING"):
        await start_authz(start_tracegate, issuer, "nginx", authz_secret="env:MISSING")
    with pytest.raises(ConfigError, match="TRACEGATE_UPSTREAM_PATH_TRACES"):
        await start_authz(start_tracegate, issuer, "nginx", path_traces="/v1/logs")
    problems = {
        "authz_listen": ("127.0.0.1:4319", "TRACEGATE_AUTHZ_DIALECT must be set"),
        "authz_dialect": ("istio", "expected one of nginx, envoy, traefik"),
        "authz_key_header": ("authorization", "header name"),
        "authz_max_age": ("3600", "between 0 and 300"),
        "authz_secret": ("s3cr3t", "env:NAME or file:/path"),
        "authz_path_prefix": ("authz", "must start with /"),
    }
    for field, (value, message) in problems.items():
        with pytest.raises(ConfigError, match=message):
            Settings.load({field: value}, {})


async def test_the_authz_listener_requires_the_gateways_client_certificate_under_mtls(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, tmp_path: Any
) -> None:
    import ssl

    ca = TestCA(tmp_path)
    server, client = ca.issue("tracegate"), ca.issue("gateway", server=False)
    certs = {"ca": str(ca.cert), "client": str(client.cert), "client_key": str(client.key)}
    tg, url = await start_authz(
        start_tracegate, issuer, "nginx", tls_cert=str(server.cert), tls_key=str(server.key), tls_client_ca=certs["ca"]
    )
    await tg.keys_ready()
    url = url.replace("http://", "https://")
    headers = {"Authorization": f"Bearer {issuer.mint()}", "X-Original-URI": "/v1/traces", "X-Original-Method": "POST"}
    anonymous = ssl.create_default_context(cafile=certs["ca"])
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.post(url + "/", headers=headers, ssl=anonymous) as resp:
                await resp.read()
    gateway = ssl.create_default_context(cafile=certs["ca"])
    gateway.load_cert_chain(certs["client"], certs["client_key"])
    async with aiohttp.ClientSession() as session, session.post(url + "/", headers=headers, ssl=gateway) as resp:
        assert resp.status == 200
        assert resp.headers["lightstep-access-token"] == PAYMENTS_KEY
    assert [r["decision"] for r in authz_lines(tg)] == ["allowed"]  # the refused handshake never reached a decision


async def test_a_non_utf8_shared_secret_header_is_refused_not_a_500(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer
) -> None:
    env = {**environ(), "AUTHZ_SECRET": "gateway-secret-5f0c8e1b2a7d4c39"}
    tg, url = await start_authz(start_tracegate, issuer, "nginx", env=env, authz_secret="env:AUTHZ_SECRET")
    await tg.keys_ready()
    head = (
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Original-URI: /v1/traces\r\nX-Original-Method: POST\r\n"
        b"Authorization: Bearer " + issuer.mint().encode() + b"\r\n"
        b"X-Tracegate-Authz-Secret: \xff\xfe\r\nConnection: close\r\n\r\n"
    )
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 403"), answer[:100]
    assert tg.metric("tracegate_unhandled_errors_total") == 0


def stamping_policy(issuer_url: str) -> str:
    """The shared policy with payments-ci stamping verified identity (docs-ci does not)."""
    plain = "access_token: {env: LS_TOKEN_PAYMENTS}\n"
    policy = policy_yaml(issuer_url)
    assert plain in policy
    return policy.replace(plain, plain + "    stamp: default\n")


@pytest.mark.parametrize("path", ["/v1/traces", TRACES_GRPC])
async def test_a_stamping_account_is_refused_at_the_gateway_door_never_given_its_key(
    start_tracegate: Callable[..., Any],
    issuer: StandInIssuer,
    sink: Sink,
    client: aiohttp.ClientSession,
    caplog: Any,
    path: str,
) -> None:
    """Issue 18 (9): the gateway sends the client's body as it came, so an account whose
    exports must carry tracegate's stamp cannot be served by an authz answer; its key would
    let the client's forged identity attributes through unstamped. 403, as the door's
    other policy refusals (nginx's auth_request takes only 2xx, 401 and 403 as answers)."""
    tg: Tracegate = await start_tracegate(
        stamping_policy(issuer.url), authz_listen="127.0.0.1:0", authz_dialect="nginx"
    )
    url = f"http://127.0.0.1:{tg.runners[2].addresses[0][1]}"
    await tg.keys_ready()
    token = issuer.mint()
    check = {"Authorization": f"Bearer {token}", "X-Original-URI": path, "X-Original-Method": "POST"}
    async with client.post(url + "/check", headers=check) as resp:
        assert resp.status == 403
        assert "lightstep-access-token" not in resp.headers
        assert resp.headers["Cache-Control"] == "private, max-age=5"
        answer = await resp.read()
        assert answer[:2] == status_protobuf(7, "")[:2]
        assert_no_secrets(answer.decode(errors="replace") + str(resp.headers), token)
    [line] = authz_lines(tg)
    assert (line["decision"], line["reason"], line["service_account"]) == ("denied", "stamp-needs-proxy", "payments-ci")
    labels = {"signal": "traces", "service_account": "payments-ci", "transport": "authz"}
    assert tg.metric("tracegate_requests_total", **labels, decision="denied", reason="stamp-needs-proxy") == 1
    # An account without stamp: is still answered with its key...
    docs = {**check, "Authorization": f"Bearer {issuer.mint(project_path='docs/site')}"}
    async with client.post(url + "/check", headers=docs) as resp:
        assert resp.status == 200
        assert resp.headers["lightstep-access-token"] == DOCS_KEY
    # ...and the stamping one is served where the stamp is applied: through the proxy.
    export = ExportTraceServiceRequest(resource_spans=[ResourceSpans()]).SerializeToString()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-protobuf"}
    async with client.post(tg.url + "/v1/traces", data=export, headers=headers) as resp:
        assert resp.status == 200
    (got,) = sink.received
    assert got.headers["lightstep-access-token"] == PAYMENTS_KEY
    assert ExportTraceServiceRequest.FromString(got.body).resource_spans[0].resource.attributes
    assert_no_secrets(caplog.text + "".join(tg.audit_lines), token)
