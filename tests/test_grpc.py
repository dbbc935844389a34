"""OTLP/gRPC: the real OpenTelemetry SDK gRPC exporters through tracegate to a recording
gRPC sink; every refusal class with its gRPC status and nothing sent upstream."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from proxy.dev.standins import GrpcSink, Sink, StandInIssuer, free_port
from proxy.grpc_status import status_details
from tests.conftest import DOCS_KEY, PAYMENTS_KEY, Tracegate, assert_no_secrets, policy_yaml
from tests.grpc_clients import METHOD, ThrowawayCA, call, sdk_export


@pytest.fixture
async def grpc_sink() -> AsyncIterator[GrpcSink]:
    server = GrpcSink()
    await server.start()
    yield server
    await server.stop()


def grpc_port(tg: Tracegate) -> int:
    assert tg.runtime.grpc_address is not None
    return tg.runtime.grpc_address[1]


async def start_grpc(
    start_tracegate: Callable[..., Any], policy: str, grpc_sink: GrpcSink, **overrides: str
) -> tuple[Tracegate, int]:
    settings = {"grpc_listen": "127.0.0.1:0", "grpc_upstream": grpc_sink.target, **overrides}
    tg: Tracegate = await start_tracegate(policy, **settings)
    await tg.keys_ready()
    return tg, grpc_port(tg)


@pytest.fixture
async def grpc_tg(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> tuple[Tracegate, int]:
    return await start_grpc(start_tracegate, policy_yaml(issuer.url), grpc_sink)


def retry_delay(trailers: tuple[tuple[str, str | bytes], ...]) -> float | None:
    """The RetryInfo delay in grpc-status-details-bin, or None without one."""
    for name, value in trailers:
        if name == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("signal", ["traces", "metrics", "logs"])
async def test_sdk_export_reaches_sink_with_exact_bytes_and_account_key(
    grpc_tg: tuple[Tracegate, int],
    issuer: StandInIssuer,
    grpc_sink: GrpcSink,
    caplog: pytest.LogCaptureFixture,
    signal: str,
    gzip: bool,
) -> None:
    tg, port = grpc_tg
    token = issuer.mint()
    ok, sent = await asyncio.to_thread(
        sdk_export, signal, f"http://127.0.0.1:{port}", {"authorization": f"Bearer {token}"}, gzip=gzip
    )
    assert ok
    assert len(grpc_sink.received) == 1
    got = grpc_sink.received[0]
    assert got.method == METHOD[signal]
    assert got.body == sent
    assert got.values("lightstep-access-token") == [PAYMENTS_KEY]
    assert got.values("authorization") == []
    assert token not in repr(got.metadata)
    line = tg.audit()[-1]
    assert (line["decision"], line["reason"], line["transport"], line["signal"]) == (
        "allowed",
        "forwarded",
        "grpc",
        signal,
    )
    assert line["upstream_status"] == "OK"
    assert (
        tg.metric(
            "tracegate_requests_total",
            signal=signal,
            service_account="payments-ci",
            decision="allowed",
            reason="forwarded",
            transport="grpc",
        )
        == 1
    )
    assert_no_secrets(caplog.text + "".join(tg.audit_lines), token)


@pytest.mark.parametrize("signal", ["traces", "metrics", "logs"])
async def test_sdk_export_over_tls(
    start_tracegate: Callable[..., Any],
    issuer: StandInIssuer,
    grpc_sink: GrpcSink,
    tmp_path: Path,
    signal: str,
) -> None:
    ca = ThrowawayCA.create(tmp_path)
    _, port = await start_grpc(
        start_tracegate, policy_yaml(issuer.url), grpc_sink, tls_cert=str(ca.cert), tls_key=str(ca.key)
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.ca_pem)
    ok, sent = await asyncio.to_thread(
        sdk_export,
        signal,
        f"https://127.0.0.1:{port}",
        {"authorization": f"Bearer {issuer.mint()}"},
        gzip=True,
        credentials=credentials,
    )
    assert ok
    assert [r.body for r in grpc_sink.received] == [sent]
    assert grpc_sink.received[0].values("lightstep-access-token") == [PAYMENTS_KEY]
    # A plaintext client does not get through a TLS listener.
    plain = await call(port, [("authorization", f"Bearer {issuer.mint()}")], timeout=3)
    assert plain.code is grpc.StatusCode.UNAVAILABLE
    assert len(grpc_sink.received) == 1


async def test_mtls_requires_a_client_certificate_from_the_client_ca(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, grpc_sink: GrpcSink, tmp_path: Path
) -> None:
    ca = ThrowawayCA.create(tmp_path)
    _, port = await start_grpc(
        start_tracegate,
        policy_yaml(issuer.url),
        grpc_sink,
        tls_cert=str(ca.cert),
        tls_key=str(ca.key),
        tls_client_ca=str(ca.ca_file),
    )
    headers = {"authorization": f"Bearer {issuer.mint()}"}
    endpoint = f"https://127.0.0.1:{port}"
    without = grpc.ssl_channel_credentials(root_certificates=ca.ca_pem)
    ok, _ = await asyncio.to_thread(sdk_export, "traces", endpoint, headers, credentials=without, timeout=3)
    assert not ok
    assert grpc_sink.received == []
    stranger = ThrowawayCA.create(tmp_path / "..").client_pair()  # a client certificate from another CA
    foreign = grpc.ssl_channel_credentials(ca.ca_pem, private_key=stranger[0], certificate_chain=stranger[1])
    ok, _ = await asyncio.to_thread(sdk_export, "traces", endpoint, headers, credentials=foreign, timeout=3)
    assert not ok
    assert grpc_sink.received == []
    key, cert = ca.client_pair()
    with_cert = grpc.ssl_channel_credentials(ca.ca_pem, private_key=key, certificate_chain=cert)
    ok, sent = await asyncio.to_thread(sdk_export, "traces", endpoint, headers, credentials=with_cert)
    assert ok
    assert [r.body for r in grpc_sink.received] == [sent]


async def test_tls_certificate_reloads_on_sighup_for_grpc(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, grpc_sink: GrpcSink, tmp_path: Path
) -> None:
    first = ThrowawayCA.create(tmp_path)
    tg, port = await start_grpc(
        start_tracegate, policy_yaml(issuer.url), grpc_sink, tls_cert=str(first.cert), tls_key=str(first.key)
    )

    def served_certificate() -> bytes:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        import socket

        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw) as tls_socket,
        ):
            der = tls_socket.getpeercert(binary_form=True)
            assert der is not None
            return der

    before = await asyncio.to_thread(served_certificate)
    second = ThrowawayCA.create(tmp_path / "..")  # new files, then moved over the served ones
    first.cert.write_bytes(second.cert.read_bytes())
    first.key.write_bytes(second.key.read_bytes())
    assert await tg.runtime.reload()
    after = await asyncio.to_thread(served_certificate)
    assert before != after
    assert after == ssl.PEM_cert_to_DER_cert(second.cert.read_text())
    ok, _ = await asyncio.to_thread(
        sdk_export,
        "traces",
        f"https://127.0.0.1:{port}",
        {"authorization": f"Bearer {issuer.mint()}"},
        credentials=grpc.ssl_channel_credentials(root_certificates=second.ca_pem),
    )
    assert ok


async def test_lightstep_access_token_metadata_carries_the_jwt(
    grpc_tg: tuple[Tracegate, int], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    _, port = grpc_tg
    token = issuer.mint()
    outcome = await call(port, [("lightstep-access-token", token)], b"exact bytes")
    assert outcome.code is grpc.StatusCode.OK
    assert [r.body for r in grpc_sink.received] == [b"exact bytes"]
    assert grpc_sink.received[0].values("lightstep-access-token") == [PAYMENTS_KEY]


async def test_extra_metadata_is_dropped_unless_listed(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    _, port = await start_grpc(start_tracegate, policy_yaml(issuer.url), grpc_sink, forward_headers="x-tenant")
    token = issuer.mint()
    metadata = [
        ("authorization", f"Bearer {token}"),
        ("x-tenant", "blue"),
        ("x-other", "dropped"),
        ("cookie", "session=1"),
    ]
    assert (await call(port, metadata)).code is grpc.StatusCode.OK
    got = grpc_sink.received[0]
    assert got.values("x-tenant") == ["blue"]
    assert got.values("x-other") == got.values("cookie") == got.values("authorization") == []
    assert got.values("lightstep-access-token") == [PAYMENTS_KEY]


def _refusal_cases(issuer: StandInIssuer) -> dict[str, tuple[list[tuple[str, str]], str, grpc.StatusCode, str]]:
    token = issuer.mint()
    head, _, sig = token.split(".")
    other = issuer.mint(project_path="payments/other")
    return {
        "missing": ([], "traces", grpc.StatusCode.UNAUTHENTICATED, "missing-token"),
        "bad-signature": (
            [("authorization", f"Bearer {head}.{issuer.mint(project_path='x/y').split('.')[1]}.{sig}")],
            "traces",
            grpc.StatusCode.UNAUTHENTICATED,
            "bad-signature",
        ),
        "two-tokens": (
            [("authorization", f"Bearer {token}"), ("lightstep-access-token", other)],
            "traces",
            grpc.StatusCode.UNAUTHENTICATED,
            "conflicting-tokens",
        ),
        "not-a-jwt": (
            [("lightstep-access-token", PAYMENTS_KEY)],
            "traces",
            grpc.StatusCode.UNAUTHENTICATED,
            "malformed-token",
        ),
        "basic-auth": ([("authorization", "Basic dXNlcjpwYXNz")], "traces", grpc.StatusCode.UNAUTHENTICATED, ""),
        "expired": (
            [("authorization", f"Bearer {issuer.mint(exp=int(time.time()) - 3600)}")],
            "traces",
            grpc.StatusCode.UNAUTHENTICATED,
            "token-expired",
        ),
        "denied": (
            [("authorization", f"Bearer {issuer.mint(project_path='payments/forks/x')}")],
            "traces",
            grpc.StatusCode.PERMISSION_DENIED,
            "",
        ),
        "no-rule": (
            [("authorization", f"Bearer {issuer.mint(project_path='elsewhere/x')}")],
            "traces",
            grpc.StatusCode.PERMISSION_DENIED,
            "",
        ),
        "signal-not-allowed": (
            [("authorization", f"Bearer {issuer.mint(project_path='docs/site')}")],
            "metrics",
            grpc.StatusCode.PERMISSION_DENIED,
            "",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "bad-signature",
        "two-tokens",
        "not-a-jwt",
        "basic-auth",
        "expired",
        "denied",
        "no-rule",
        "signal-not-allowed",
    ],
)
async def test_refusals_get_their_grpc_status_and_send_nothing(
    grpc_tg: tuple[Tracegate, int],
    issuer: StandInIssuer,
    grpc_sink: GrpcSink,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    case: str,
) -> None:
    tg, port = grpc_tg
    metadata, signal, code, reason = _refusal_cases(issuer)[case]
    outcome = await call(port, metadata, signal=signal)
    assert outcome.code is code
    assert retry_delay(outcome.trailers) is None
    assert grpc_sink.received == []
    line = tg.audit()[-1]
    assert line["transport"] == "grpc"
    assert line["decision"] == ("refused" if code is grpc.StatusCode.UNAUTHENTICATED else "denied")
    if reason:
        assert line["reason"] == reason
    tokens = [v for _, v in metadata]
    printed = capfd.readouterr()  # gRPC's C core writes to the process's stderr directly
    text = caplog.text + "".join(tg.audit_lines) + outcome.details + printed.out + printed.err
    assert_no_secrets(text, *[t.removeprefix("Bearer ") for t in tokens])


async def test_refusal_comes_before_the_message_is_read(
    grpc_tg: tuple[Tracegate, int], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    """A client that sends its metadata and then holds its message back is refused at once:
    admission runs on the metadata, as on OTLP/HTTP where it runs on the headers."""
    _, port = grpc_tg
    held = asyncio.Event()

    async def never_sent() -> AsyncIterator[bytes]:
        await held.wait()
        yield b"never"

    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = channel.stream_unary(METHOD["traces"])
        with pytest.raises(aio.AioRpcError) as info:
            await stub(never_sent(), metadata=(("authorization", "Bearer not.a.token"),), timeout=10)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert not held.is_set() and grpc_sink.received == []


async def test_keys_not_yet_available_is_unavailable_with_retry_info(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    issuer.available = False
    tg: Tracegate = await start_tracegate(
        policy_yaml(issuer.url), grpc_listen="127.0.0.1:0", grpc_upstream=grpc_sink.target
    )
    port = grpc_port(tg)
    outcome = await call(port, [("authorization", f"Bearer {issuer.mint()}")])
    assert outcome.code is grpc.StatusCode.UNAVAILABLE
    assert retry_delay(outcome.trailers) == 5
    assert grpc_sink.received == []


async def test_too_large_is_resource_exhausted_without_retry_info(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    tg, port = await start_grpc(start_tracegate, policy_yaml(issuer.url), grpc_sink, max_body="4096")
    token = issuer.mint()
    for compression in (None, grpc.Compression.Gzip):  # the limit is on the decompressed message
        outcome = await call(port, [("authorization", f"Bearer {token}")], b"\0" * 8192, compression=compression)
        assert outcome.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry_delay(outcome.trailers) is None
    assert (await call(port, [("authorization", f"Bearer {token}")], b"\0" * 4000)).code is grpc.StatusCode.OK
    assert len(grpc_sink.received) == 1
    refused = [line for line in tg.audit() if line["reason"] == "body-too-large"]
    assert [(line["decision"], line["transport"]) for line in refused] == [("failed", "grpc")] * 2


async def test_unknown_method_is_unimplemented(
    grpc_tg: tuple[Tracegate, int], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    _, port = grpc_tg
    outcome = await call(port, [("authorization", f"Bearer {issuer.mint()}")], method="/some.Service/Export")
    assert outcome.code is grpc.StatusCode.UNIMPLEMENTED
    assert grpc_sink.received == []


async def test_upstream_status_details_trailers_and_partial_success_are_relayed(
    grpc_tg: tuple[Tracegate, int], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    tg, port = grpc_tg
    metadata = [("authorization", f"Bearer {issuer.mint()}")]
    answer = ExportTraceServiceResponse()
    answer.partial_success.rejected_spans = 2
    answer.partial_success.error_message = "2 spans too old"
    grpc_sink.answer = answer.SerializeToString()
    outcome = await call(port, metadata)
    assert outcome.code is grpc.StatusCode.OK and outcome.body == grpc_sink.answer

    details = status_details(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", 3.5)
    grpc_sink.code, grpc_sink.details = grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down"
    grpc_sink.trailers = (("grpc-status-details-bin", details), ("x-upstream-internal", "dropped"))
    outcome = await call(port, metadata)
    assert (outcome.code, outcome.details) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down")
    assert ("grpc-status-details-bin", details) in outcome.trailers
    assert all(name != "x-upstream-internal" for name, _ in outcome.trailers)
    assert retry_delay(outcome.trailers) == 3.5

    grpc_sink.code, grpc_sink.details, grpc_sink.trailers = grpc.StatusCode.INVALID_ARGUMENT, "bad span", ()
    outcome = await call(port, metadata)
    assert (outcome.code, outcome.details) == (grpc.StatusCode.INVALID_ARGUMENT, "bad span")
    line = tg.audit()[-1]
    assert (line["decision"], line["reason"], line["upstream_status"]) == (
        "allowed",
        "upstream-invalid-argument",
        "INVALID_ARGUMENT",
    )
    assert len(grpc_sink.received) == 3


async def test_upstream_unreachable_is_unavailable_with_a_generic_message(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    nowhere = free_port()
    tg, port = await start_grpc(
        start_tracegate, policy_yaml(issuer.url), grpc_sink, grpc_upstream=f"http://127.0.0.1:{nowhere}"
    )
    outcome = await call(port, [("authorization", f"Bearer {issuer.mint()}")])
    assert outcome.code is grpc.StatusCode.UNAVAILABLE
    assert outcome.details == "upstream unavailable"
    assert str(nowhere) not in outcome.details
    assert (tg.audit()[-1]["decision"], tg.audit()[-1]["reason"]) == ("failed", "upstream-unreachable")


async def test_short_client_deadline_against_slow_upstream_cancels_the_upstream_call(
    grpc_tg: tuple[Tracegate, int], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    tg, port = grpc_tg
    grpc_sink.delay = 30
    started = time.monotonic()
    outcome = await call(port, [("authorization", f"Bearer {issuer.mint()}")], timeout=0.5)
    elapsed = time.monotonic() - started
    assert outcome.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 5  # the client's deadline (0.5 s), not the upstream's 30 s
    for _ in range(100):
        if grpc_sink.cancelled:
            break
        await asyncio.sleep(0.05)
    assert grpc_sink.cancelled == 1  # the upstream call was abandoned, not left running
    for _ in range(100):
        if tg.audit() and tg.audit()[-1]["reason"] in ("client-cancelled", "upstream-timeout"):
            break
        await asyncio.sleep(0.05)
    assert tg.audit()[-1]["reason"] in ("client-cancelled", "upstream-timeout")


async def test_client_deadline_is_propagated_and_bounded_by_the_upstream_timeout(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    _, port = await start_grpc(start_tracegate, policy_yaml(issuer.url), grpc_sink, upstream_timeout="20")
    metadata = [("authorization", f"Bearer {issuer.mint()}")]
    assert (await call(port, metadata, timeout=8)).code is grpc.StatusCode.OK
    assert (await call(port, metadata, timeout=120)).code is grpc.StatusCode.OK
    short, long = (r.time_remaining for r in grpc_sink.received)
    assert short is not None and 4 < short <= 8.5  # grpc-timeout is sent rounded up
    assert long is not None and 15 < long <= 20.5


async def test_policy_reload_applies_to_grpc_calls(
    grpc_tg: tuple[Tracegate, int], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    tg, port = grpc_tg
    metadata = [("authorization", f"Bearer {issuer.mint()}")]
    assert (await call(port, metadata)).code is grpc.StatusCode.OK
    policy = tg.policy_dir / "10-main.yaml"
    policy.write_text(policy.read_text().replace('project_path: "payments/*"', 'project_path: "payments-moved/*"'))
    assert await tg.runtime.reload()
    assert (await call(port, metadata)).code is grpc.StatusCode.PERMISSION_DENIED
    assert len(grpc_sink.received) == 1


async def test_upstream_timeout_bounds_the_call(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    tg, port = await start_grpc(start_tracegate, policy_yaml(issuer.url), grpc_sink, upstream_timeout="0.5")
    grpc_sink.delay = 30
    outcome = await call(port, [("authorization", f"Bearer {issuer.mint()}")], timeout=20)
    assert outcome.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert outcome.details == "upstream timed out"
    assert (tg.audit()[-1]["decision"], tg.audit()[-1]["reason"]) == ("failed", "upstream-timeout")


async def test_upstream_killed_under_load_never_acknowledges_a_lost_call(
    grpc_tg: tuple[Tracegate, int], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    _, port = grpc_tg
    token = issuer.mint()
    outcomes: dict[bytes, grpc.StatusCode] = {}

    async def client(n: int) -> None:
        for i in range(60):
            body = f"client-{n}-call-{i}".encode()
            outcomes[body] = (await call(port, [("authorization", f"Bearer {token}")], body, timeout=3)).code

    clients = [asyncio.ensure_future(client(n)) for n in range(8)]
    while len(grpc_sink.received) < 40:
        await asyncio.sleep(0.01)
    await grpc_sink.stop(0)  # Lightstep goes away mid-load
    await asyncio.gather(*clients)
    at_sink = {r.body for r in grpc_sink.received}
    ok = {body for body, code in outcomes.items() if code is grpc.StatusCode.OK}
    assert ok and ok <= at_sink
    others = {code for code in outcomes.values() if code is not grpc.StatusCode.OK}
    assert others and others <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


BRIDGE = """\
  bridged-ci:
    access_token: {env: LS_TOKEN_DOCS}
    upstream_protocol: http
  other-grpc-ci:
    access_token: {env: LS_TOKEN_DOCS}
    grpc_upstream: TARGET
"""


def _bridge_policy(issuer_url: str, target: str) -> str:
    policy = policy_yaml(issuer_url).replace("rules:\n", BRIDGE.replace("TARGET", target) + "rules:\n", 1)
    return policy + (
        "  - name: bridged\n    issuer: gitlab\n    when: {project_path: bridge/*}\n    service_account: bridged-ci\n"
        "  - name: other\n    issuer: gitlab\n    when: {project_path: other/*}\n    service_account: other-grpc-ci\n"
    )


async def test_bridge_mode_sends_the_protobuf_to_the_http_upstream(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, grpc_sink: GrpcSink, sink: Sink
) -> None:
    tg, port = await start_grpc(start_tracegate, _bridge_policy(issuer.url, grpc_sink.target), grpc_sink)
    token = issuer.mint(project_path="bridge/app")
    ok, sent = await asyncio.to_thread(
        sdk_export, "traces", f"http://127.0.0.1:{port}", {"authorization": f"Bearer {token}"}, gzip=True
    )
    assert ok
    assert grpc_sink.received == []
    assert len(sink.received) == 1
    got = sink.received[0]
    assert (got.path, got.body) == ("/v1/traces", sent)
    assert got.headers["Content-Type"] == "application/x-protobuf"
    assert got.headers.getall("lightstep-access-token") == [DOCS_KEY]
    assert "Authorization" not in got.headers
    assert got.headers["Accept-Encoding"] == "identity"  # the answer becomes the gRPC response as it is

    answer = ExportTraceServiceResponse()
    answer.partial_success.rejected_spans = 1
    sink.answer = answer.SerializeToString()
    outcome = await call(port, [("authorization", f"Bearer {token}")], b"raw")
    assert (outcome.code, outcome.body) == (grpc.StatusCode.OK, sink.answer)

    sink.status, sink.retry_after = 503, "7"
    outcome = await call(port, [("authorization", f"Bearer {token}")], b"raw")
    assert outcome.code is grpc.StatusCode.UNAVAILABLE
    assert retry_delay(outcome.trailers) == 7
    sink.status, sink.retry_after = 403, None
    outcome = await call(port, [("authorization", f"Bearer {token}")], b"raw")
    assert outcome.code is grpc.StatusCode.PERMISSION_DENIED
    assert tg.audit()[-1]["reason"] == "upstream-403"
    assert tg.metric("tracegate_upstream_responses_total", signal="traces", status="200") == 2
    assert tg.metric("tracegate_upstream_responses_total", signal="traces", status="503") == 1


async def test_per_account_grpc_upstream(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    other = GrpcSink()
    await other.start()
    try:
        _, port = await start_grpc(start_tracegate, _bridge_policy(issuer.url, other.target), grpc_sink)
        outcome = await call(port, [("authorization", f"Bearer {issuer.mint(project_path='other/app')}")], b"o")
        assert outcome.code is grpc.StatusCode.OK
        assert [r.body for r in other.received] == [b"o"]
        assert other.received[0].values("lightstep-access-token") == [DOCS_KEY]
        assert grpc_sink.received == []
    finally:
        await other.stop()


async def test_readyz_reflects_the_grpc_listener_and_drain_finishes_in_flight_calls(
    grpc_tg: tuple[Tracegate, int], issuer: StandInIssuer, grpc_sink: GrpcSink, client: Any
) -> None:
    tg, port = grpc_tg
    async with client.get(tg.admin_url + "/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["listeners"] == {"http": True, "grpc": True}
    token = issuer.mint()
    grpc_sink.delay = 1.0
    in_flight = [
        asyncio.ensure_future(call(port, [("authorization", f"Bearer {token}")], f"{i}".encode())) for i in range(3)
    ]
    while len(grpc_sink.received) < 3:
        await asyncio.sleep(0.01)
    tg.runtime.draining = True
    await tg.runners[0].app.shutdown()  # what SIGTERM's drain does first: both listeners stop taking requests
    assert tg.runtime.grpc_serving is False
    async with client.get(tg.admin_url + "/readyz") as resp:
        assert resp.status == 503
    late = await call(port, [("authorization", f"Bearer {token}")], b"late", timeout=3)
    assert late.code is grpc.StatusCode.UNAVAILABLE
    assert late.details == "tracegate is shutting down; retry"
    assert [o.code for o in await asyncio.gather(*in_flight)] == [grpc.StatusCode.OK] * 3
    assert b"late" not in {r.body for r in grpc_sink.received}
    assert [line["transport"] for line in tg.audit() if line["reason"] == "draining"] == ["grpc"]


async def test_stamped_account_gets_verified_attributes_over_grpc_too(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue

    policy = policy_yaml(issuer.url).replace(
        "access_token: {env: LS_TOKEN_PAYMENTS}", "access_token: {env: LS_TOKEN_PAYMENTS}\n    stamp: default"
    )
    tg, port = await start_grpc(start_tracegate, policy, grpc_sink)
    await tg.keys_ready()
    sent = ExportTraceServiceRequest()
    resource = sent.resource_spans.add().resource
    resource.attributes.append(KeyValue(key="service.name", value={"string_value": "checkout"}))
    resource.attributes.append(KeyValue(key="vcs.ref.head.revision", value={"string_value": "forged"}))
    token = issuer.mint(sha="c" * 40)
    outcome = await call(port, [("authorization", f"Bearer {token}")], sent.SerializeToString())
    assert outcome.code == grpc.StatusCode.OK
    got = ExportTraceServiceRequest.FromString(grpc_sink.received[0].body)
    attrs = [(a.key, a.value.string_value) for a in got.resource_spans[0].resource.attributes]
    assert ("service.name", "checkout") in attrs
    assert [v for k, v in attrs if k == "vcs.ref.head.revision"] == ["c" * 40]  # verified, once
    # A message that cannot be parsed for stamping is refused, never forwarded unstamped.
    bad = await call(port, [("authorization", f"Bearer {token}")], b"\x0a\xff\xff\xff")
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(grpc_sink.received) == 1
    assert tg.audit()[-1]["reason"] == "stamp-bad-protobuf"


async def _stream_call(port: int, token: str, messages: Any) -> grpc.StatusCode:
    """An Export sent as a client stream (the same wire format as unary), so a test can send
    two messages, or none and hold the stream open."""
    from tests.grpc_clients import METHOD

    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = channel.stream_unary(METHOD["traces"])
        try:
            await stub(messages, metadata=aio.Metadata(("authorization", f"Bearer {token}")), timeout=20)
        except aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


async def test_a_second_message_on_one_export_is_refused_not_dropped(
    grpc_tg: tuple[Tracegate, int], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    tg, port = grpc_tg

    async def two() -> Any:
        yield b"\x0a\x00"
        yield b"\x0a\x00"

    assert await _stream_call(port, issuer.mint(), two()) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_sink.received == []
    assert tg.audit()[-1]["reason"] == "more-than-one-message"


async def test_an_admitted_call_that_never_sends_its_message_times_out(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    tg, port = await start_grpc(start_tracegate, policy_yaml(issuer.url), grpc_sink, body_timeout="0.5")
    await tg.keys_ready()
    never = asyncio.Event()

    async def silent() -> Any:
        await never.wait()  # the client holds the stream open and sends nothing
        yield b""

    assert await _stream_call(port, issuer.mint(), silent()) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert tg.audit()[-1]["reason"] == "body-timeout"
    assert grpc_sink.received == []


async def test_an_export_without_a_message_is_invalid_argument_not_too_large(
    grpc_tg: tuple[Tracegate, int], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    tg, port = grpc_tg

    async def none() -> Any:
        return
        yield b""  # an async generator that sends nothing, then half-closes

    assert await _stream_call(port, issuer.mint(), none()) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_sink.received == []
    line = tg.audit()[-1]
    assert (line["decision"], line["reason"], line["transport"]) == ("failed", "no-message", "grpc")
    assert tg.metric("tracegate_requests_total", signal="traces", service_account="payments-ci", decision="failed",
                     reason="no-message", transport="grpc") == 1  # fmt: skip
    # A zero-length message is a message (an empty ExportTraceServiceRequest): forwarded.
    assert (await call(port, [("authorization", f"Bearer {issuer.mint()}")], b"")).code is grpc.StatusCode.OK
    assert [r.body for r in grpc_sink.received] == [b""]


async def test_a_tls_grpc_upstream_with_a_private_ca_is_verified_against_it(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, tmp_path: Path
) -> None:
    """TRACEGATE_GRPC_UPSTREAM_CA: the upstream's certificate is verified against the
    configured CA (and only it): trusted → forwarded; another CA's, or grpcio's own roots
    → UNAVAILABLE, nothing sent."""
    ca, other = ThrowawayCA.create(tmp_path / "ca"), ThrowawayCA.create(tmp_path / "other")
    sink = GrpcSink()
    await sink.start(credentials=grpc.ssl_server_credentials([(ca.key.read_bytes(), ca.cert.read_bytes())]))
    try:
        assert sink.target.startswith("https://")
        for roots, trusted in ((str(ca.ca_file), True), (str(other.ca_file), False), ("", False)):
            tg, port = await start_grpc(start_tracegate, policy_yaml(issuer.url), sink, grpc_upstream_ca=roots)
            before = len(sink.received)
            outcome = await call(port, [("authorization", f"Bearer {issuer.mint()}")], b"over tls")
            if trusted:
                assert outcome.code is grpc.StatusCode.OK
                assert [r.body for r in sink.received[before:]] == [b"over tls"]
                assert sink.received[-1].values("lightstep-access-token") == [PAYMENTS_KEY]
            else:
                assert outcome.code is grpc.StatusCode.UNAVAILABLE
                assert len(sink.received) == before
                assert tg.audit()[-1]["reason"] == "upstream-unreachable"
            await tg.stop()
    finally:
        await sink.stop()


@pytest.mark.parametrize("content", [None, b"", b"not a certificate\n", b"-----BEGIN CERTIFICATE-----\nAAAA\n"])
async def test_an_unusable_grpc_upstream_ca_stops_start_up_with_a_clear_error(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, grpc_sink: GrpcSink, tmp_path: Path,
    content: bytes | None,
) -> None:  # fmt: skip
    from proxy.errors import ConfigError

    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"TRACEGATE_GRPC_UPSTREAM_CA=.*ca\.pem: .*PEM"):
        await start_grpc(start_tracegate, policy_yaml(issuer.url), grpc_sink, grpc_upstream_ca=str(path))
