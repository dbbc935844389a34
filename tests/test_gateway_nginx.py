"""Gateway mode with real nginx: the shipped deploy/nginx config, rendered with test ports,
asks tracegate's authorization listener (auth_request) and carries the bytes itself.

Clients are the real OpenTelemetry SDK (OTLP/HTTP and OTLP/gRPC exporters); the upstreams
are the recording HTTP sink and a raw-bytes gRPC sink local to this file.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from multidict import CIMultiDict
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.answers import status_protobuf
from proxy.dev.standins import Sink, StandInIssuer
from tests.conftest import PAYMENTS_KEY, Tracegate, assert_no_secrets, environ, policy_yaml
from tests.nginx_gateway import NginxGateway
from tests.system import require_program
from tests.test_deploy_gateways import (
    BACKEND_CASES,
    GRAFANA_TOKEN,
    HONEYCOMB_KEY,
    backends_environ,
    backends_policy,
    credentials_sent,
    expected_credentials,
    forged_requests,
)
from tests.test_ingest import export_span

TRACES_GRPC = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
LOGS_GRPC = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"


@dataclass
class GrpcCall:
    method: str
    metadata: list[tuple[str, str | bytes]]
    body: bytes


@dataclass
class GrpcSink:
    """An OTLP/gRPC receiver for any of the three Export methods, recording raw bytes and
    metadata (no request deserializer: the handler gets the message bytes)."""

    calls: list[GrpcCall] = field(default_factory=list)
    server: grpc.Server | None = None
    port: int = 0

    def start(self) -> None:
        def handler(method: str) -> grpc.RpcMethodHandler:
            def export(body: bytes, context: grpc.ServicerContext) -> bytes:
                self.calls.append(GrpcCall(method, list(context.invocation_metadata()), body))
                return b""  # an empty Export*ServiceResponse

            return grpc.unary_unary_rpc_method_handler(export)

        services = [
            grpc.method_handlers_generic_handler(
                f"opentelemetry.proto.collector.{s}.v1.{n}Service", {"Export": handler(n)}
            )
            for s, n in (("trace", "Trace"), ("metrics", "Metrics"), ("logs", "Logs"))
        ]
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=services)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None).wait()


@pytest.fixture
def grpc_sink() -> Iterator[GrpcSink]:
    server = GrpcSink()
    server.start()
    yield server
    server.stop()


StartGateway = Callable[..., Any]


@pytest.fixture
async def gateway(
    tmp_path: Path, start_tracegate: Callable[..., Any], issuer: StandInIssuer, sink: Sink, grpc_sink: GrpcSink
) -> AsyncIterator[StartGateway]:
    """Start tracegate with its nginx-dialect authz listener, then nginx from the shipped config."""
    nginx = require_program("nginx", "nginx", "/usr/sbin/nginx")
    running: list[NginxGateway] = []

    async def _start(
        *,
        cache: bool = True,
        env: dict[str, str] | None = None,
        secret: str = "",
        policy: str | None = None,
        **flags: str,
    ) -> tuple[Tracegate, NginxGateway]:
        tg: Tracegate = await start_tracegate(
            policy or policy_yaml(issuer.url), env=env, authz_listen="127.0.0.1:0", authz_dialect="nginx", **flags
        )
        await tg.keys_ready()
        authz_port = tg.runners[2].addresses[0][1]
        gw = NginxGateway(
            nginx,
            tmp_path / f"nginx-{len(running)}",
            authz=f"127.0.0.1:{authz_port}",
            upstream=f"127.0.0.1:{sink.port}",
            grpc_upstream=f"127.0.0.1:{grpc_sink.port}",
            cache=cache,
            secret=secret,
        )
        running.append(gw)
        await asyncio.to_thread(gw.start)
        return tg, gw

    yield _start
    for gw in running:
        await asyncio.to_thread(gw.stop)
        assert "[alert]" not in gw.error_log() and "[emerg]" not in gw.error_log()


def authz_lines(tg: Tracegate) -> list[dict[str, Any]]:
    return [r for r in tg.audit() if r["event"] == "authz"]


async def test_sdk_span_through_nginx_reaches_sink_with_the_account_key_only(
    gateway: StartGateway, issuer: StandInIssuer, sink: Sink, caplog: Any
) -> None:
    tg, gw = await gateway()
    token = issuer.mint()
    result = await asyncio.to_thread(export_span, gw.url + "/v1/traces", {"authorization": f"Bearer {token}"})
    assert result is SpanExportResult.SUCCESS
    assert len(sink.received) == 1
    got = sink.received[0]
    assert got.path == "/v1/traces"
    assert got.headers.getall("lightstep-access-token") == [PAYMENTS_KEY]
    assert "Authorization" not in got.headers
    assert token not in str(got.headers)
    span = ExportTraceServiceRequest.FromString(got.body).resource_spans[0].scope_spans[0].spans[0]
    assert span.name == "build-and-test"
    [line] = authz_lines(tg)
    assert (line["decision"], line["reason"], line["service_account"], line["transport"]) == (
        "allowed",
        "authorized",
        "payments-ci",
        "authz",
    )
    assert (
        tg.metric(
            "tracegate_requests_total",
            signal="traces",
            service_account="payments-ci",
            decision="allowed",
            reason="authorized",
            transport="authz",
        )
        == 1
    )
    # The exporter's Lightstep-style header carrying the ID token is replaced by the key, not duplicated.
    result = await asyncio.to_thread(export_span, gw.url + "/v1/traces", {"lightstep-access-token": token})
    assert result is SpanExportResult.SUCCESS
    assert sink.received[1].headers.getall("lightstep-access-token") == [PAYMENTS_KEY]
    assert_no_secrets(caplog.text + "".join(tg.audit_lines) + gw.error_log(), token)


async def test_each_backends_credentials_through_nginx_and_no_client_copy(
    gateway: StartGateway, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession, caplog: Any
) -> None:
    """A Honeycomb and a Grafana Cloud account (and a Lightstep one) through one nginx: the sink
    gets exactly the account's credential headers. The client sends its token and its own copy
    of every other credential header; none survives, including a name the answer did not set
    (Honeycomb traces carry no x-honeycomb-dataset: the client's is not taken either)."""
    tg, gw = await gateway(policy=backends_policy(issuer.url), env=backends_environ())
    tokens = []
    for project, signal in BACKEND_CASES:
        token = issuer.mint(project_path=project)
        tokens.append(token)
        for request in forged_requests(token):
            async with client.post(gw.url + f"/v1/{signal}", data=b"\x0a\x00", headers=request) as resp:
                assert resp.status == 200, (project, signal)
            got = sink.received[-1]
            assert got.path == f"/v1/{signal}"
            assert credentials_sent(got.headers) == expected_credentials(project, signal), (project, signal)
            assert token not in str(got.headers) and "client-" not in str(got.headers)
    assert len(sink.received) == 2 * len(BACKEND_CASES)
    accounts = {line["service_account"] for line in authz_lines(tg)}
    assert accounts == {"lightstep-ci", "honeycomb-ci", "grafana-ci"}
    logged = caplog.text + "".join(tg.audit_lines) + gw.error_log()
    assert HONEYCOMB_KEY not in logged and GRAFANA_TOKEN not in logged
    assert_no_secrets(logged, *tokens)


async def test_honeycomb_credentials_through_nginx_grpc_and_no_client_copy(
    gateway: StartGateway, issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    _tg, gw = await gateway(policy=backends_policy(issuer.url), env=backends_environ())
    token = issuer.mint(project_path="honeycomb/app")
    for request in forged_requests(token):
        metadata = tuple((k, v) for k, v in request.items() if k != "content-type")
        assert await asyncio.to_thread(raw_grpc_call, gw.grpc_target, TRACES_GRPC, metadata) == grpc.StatusCode.OK
        sent = [(k, v) for k, v in grpc_sink.calls[-1].metadata if isinstance(v, str)]
        assert credentials_sent(CIMultiDict(sent)) == expected_credentials("honeycomb/app", "traces")
        assert token not in str(sent) and "client-" not in str(sent)
    assert len(grpc_sink.calls) == 2


async def test_refusals_through_nginx_are_otlp_answers_and_reach_nothing(
    gateway: StartGateway, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    tg, gw = await gateway()
    head, payload, sig = issuer.mint().split(".")
    forged = f"{head}.{payload}.{sig[:-6]}AAAAAA"
    expired = issuer.mint(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)
    denied = issuer.mint(project_path="marketing/site")
    docs = issuer.mint(project_path="docs/site")  # docs-ci may send traces only
    smuggler = issuer.mint(project_path="docs/handbook")  # a fresh token: no cached decision to hide behind
    cases = [
        ("/v1/traces", {"Authorization": f"Bearer {forged}"}, 401, 16, "bad-signature"),
        ("/v1/traces", {"Authorization": f"Bearer {expired}"}, 401, 16, "token-expired"),
        ("/v1/traces", {}, 401, 16, "missing-token"),
        ("/v1/traces", {"Authorization": f"Bearer {denied}"}, 403, 7, "no-rule-matched"),
        ("/v1/logs", {"Authorization": f"Bearer {docs}"}, 403, 7, "signal-not-allowed"),
        ("/v1/traces?access_token=x", {"Authorization": f"Bearer {issuer.mint()}"}, 401, 16, "token-in-query"),
        # A client's own X-Original-* headers are overwritten by nginx: decided for what it really posts to.
        (
            "/v1/logs",
            {"Authorization": f"Bearer {smuggler}", "X-Original-URI": "/v1/traces", "X-Original-Method": "POST"},
            403,
            7,
            "signal-not-allowed",
        ),
    ]
    for path, headers, status, code, reason in cases:
        for content_type in ("application/x-protobuf", "application/json"):
            async with client.post(
                gw.url + path, data=b"\x0a\x00", headers={**headers, "Content-Type": content_type}
            ) as resp:
                body = await resp.read()
                assert resp.status == status, (path, reason)
                assert resp.headers["Content-Type"] == content_type
                if content_type == "application/json":
                    assert (await resp.json())["code"] == code
                else:
                    assert body[:2] == status_protobuf(code, "")[:2]
                if status == 401:
                    assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
                else:
                    assert "WWW-Authenticate" not in resp.headers
        assert authz_lines(tg)[-1]["reason"] == reason
    # A path tracegate does not know is not proxied at all.
    async with client.post(gw.url + "/v2/traces", data=b"x", headers={"Authorization": "Bearer x"}) as resp:
        assert resp.status == 404
    assert sink.received == []
    assert [line["transport"] for line in authz_lines(tg)] == ["authz"] * len(authz_lines(tg))


async def test_cached_allow_is_not_honoured_past_the_tokens_exp(
    gateway: StartGateway, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    tg, gw = await gateway(leeway="0")
    exp = int(time.time()) + 3
    token = issuer.mint(exp=exp)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-protobuf"}
    for _ in range(3):
        async with client.post(gw.url + "/v1/traces", data=b"\x0a\x00", headers=headers) as resp:
            assert resp.status == 200
    assert len(sink.received) == 3
    assert len(authz_lines(tg)) == 1  # the cache is on: nginx asked once for three requests
    await asyncio.sleep(max(0.0, exp + 1.2 - time.time()))
    async with client.post(gw.url + "/v1/traces", data=b"\x0a\x00", headers=headers) as resp:
        assert resp.status == 401
    assert len(sink.received) == 3
    assert authz_lines(tg)[-1]["reason"] == "token-expired"


async def test_without_the_cache_every_request_is_decided(
    gateway: StartGateway, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    tg, gw = await gateway(cache=False)
    headers = {"Authorization": f"Bearer {issuer.mint()}"}
    for _ in range(3):
        async with client.post(gw.url + "/v1/metrics", data=b"\x0a\x00", headers=headers) as resp:
            assert resp.status == 200
    assert [r.path for r in sink.received] == ["/v1/metrics"] * 3
    assert len(authz_lines(tg)) == 3


async def test_a_rotated_key_reaches_nginx_within_the_cache_lifetime(
    gateway: StartGateway, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    env = environ()
    tg, gw = await gateway(env=env, authz_max_age="2")
    headers = {"Authorization": f"Bearer {issuer.mint()}"}

    async def send() -> str:
        async with client.post(gw.url + "/v1/traces", data=b"\x0a\x00", headers=headers) as resp:
            assert resp.status == 200
        return sink.received[-1].headers["lightstep-access-token"]

    assert await send() == PAYMENTS_KEY
    new_key = "ls-key-payments-rotated-00112233"
    env["LS_TOKEN_PAYMENTS"] = new_key
    assert await tg.runtime.reload()  # what SIGHUP runs
    rotated = time.monotonic()
    while await send() != new_key:
        assert time.monotonic() - rotated < 2 + 1.5, "nginx kept the old key past TRACEGATE_AUTHZ_MAX_AGE_SECONDS"
        await asyncio.sleep(0.1)
    for _ in range(3):
        assert await send() == new_key


async def test_nginx_sends_the_shared_secret_tracegate_requires(
    gateway: StartGateway, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    secret = "nginx-to-tracegate-3b9f7e21c4d8"
    env = {**environ(), "AUTHZ_SECRET": secret}
    tg, right = await gateway(env=env, secret=secret, authz_secret="env:AUTHZ_SECRET")
    headers = {"Authorization": f"Bearer {issuer.mint()}", "X-Tracegate-Authz-Secret": "client-guess"}
    async with client.post(right.url + "/v1/traces", data=b"\x0a\x00", headers=headers) as resp:
        assert resp.status == 200  # nginx replaced the client's copy with the configured secret
    assert len(sink.received) == 1
    assert (
        "X-Tracegate-Authz-Secret" not in sink.received[0].headers
        or sink.received[0].headers["X-Tracegate-Authz-Secret"] != secret
    )
    _tg, wrong = await gateway(env=env, secret="not-the-secret", authz_secret="env:AUTHZ_SECRET")
    async with client.post(wrong.url + "/v1/traces", data=b"\x0a\x00", headers=headers) as resp:
        assert resp.status == 403
    assert len(sink.received) == 1
    assert secret not in "".join(tg.audit_lines) + right.error_log()


async def test_authz_unreachable_is_a_retryable_503(
    gateway: StartGateway, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    tg, gw = await gateway()
    await tg.runners[2].cleanup()  # the authorization listener goes away
    async with client.post(
        gw.url + "/v1/traces", data=b"\x0a\x00", headers={"Authorization": f"Bearer {issuer.mint()}"}
    ) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "5"
        assert await resp.read() == status_protobuf(14, "authorization unavailable; retry")
    assert sink.received == []


# --- OTLP/gRPC through nginx (grpc_pass) ---------------------------------------------------


def export_span_grpc(target: str, metadata: tuple[tuple[str, str], ...]) -> SpanExportResult:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("tests").start_as_current_span("build-and-test"):
        pass
    provider.shutdown()
    exporter = GrpcSpanExporter(endpoint=target, insecure=True, headers=metadata, timeout=10)
    try:
        return exporter.export(memory.get_finished_spans())
    finally:
        exporter.shutdown()


def raw_grpc_call(target: str, method: str, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method)
        try:
            call(ExportTraceServiceRequest().SerializeToString(), metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK


async def test_sdk_grpc_export_through_nginx_reaches_the_grpc_sink_with_the_key(
    gateway: StartGateway, issuer: StandInIssuer, grpc_sink: GrpcSink, caplog: Any
) -> None:
    tg, gw = await gateway()
    token = issuer.mint()
    result = await asyncio.to_thread(export_span_grpc, gw.grpc_target, (("authorization", f"Bearer {token}"),))
    assert result is SpanExportResult.SUCCESS
    [call] = grpc_sink.calls
    assert call.method == "Trace"
    keys = [v for k, v in call.metadata if k == "lightstep-access-token"]
    assert keys == [PAYMENTS_KEY]
    assert "authorization" not in [k for k, _ in call.metadata]
    span = ExportTraceServiceRequest.FromString(call.body).resource_spans[0].scope_spans[0].spans[0]
    assert span.name == "build-and-test"
    assert authz_lines(tg)[-1]["decision"] == "allowed"
    assert_no_secrets(caplog.text + "".join(tg.audit_lines) + gw.error_log(), token)


async def test_grpc_refusals_through_nginx_carry_grpc_status_and_reach_nothing(
    gateway: StartGateway, issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    tg, gw = await gateway()
    head, payload, sig = issuer.mint().split(".")
    forged = f"{head}.{payload}.{sig[:-6]}AAAAAA"
    docs = issuer.mint(project_path="docs/site")
    cases = [
        (TRACES_GRPC, (("authorization", f"Bearer {forged}"),), grpc.StatusCode.UNAUTHENTICATED),
        (TRACES_GRPC, (), grpc.StatusCode.UNAUTHENTICATED),
        (
            TRACES_GRPC,
            (("authorization", f"Bearer {issuer.mint(project_path='x/forks/y')}"),),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        (LOGS_GRPC, (("authorization", f"Bearer {docs}"),), grpc.StatusCode.PERMISSION_DENIED),
        ("/opentelemetry.proto.collector.trace.v1.TraceService/Other", (), grpc.StatusCode.UNIMPLEMENTED),
    ]
    for method, metadata, expected in cases:
        assert await asyncio.to_thread(raw_grpc_call, gw.grpc_target, method, metadata) == expected
    assert grpc_sink.calls == []
    # The same token that is refused logs is accepted for traces, over the same connection type.
    ok = (("authorization", f"Bearer {docs}"),)
    assert await asyncio.to_thread(raw_grpc_call, gw.grpc_target, TRACES_GRPC, ok) == grpc.StatusCode.OK
    assert [c.method for c in grpc_sink.calls] == ["Trace"]
    reasons = ["bad-signature", "missing-token", "rule-denied", "signal-not-allowed", "authorized"]
    assert [r["reason"] for r in authz_lines(tg)] == reasons
