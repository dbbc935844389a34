"""The accepted path, end to end: the OpenTelemetry SDK → tracegate → the sink."""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

import aiohttp
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.dev.standins import Sink, StandInIssuer
from tests.conftest import DOCS_KEY, PAYMENTS_KEY, Tracegate, assert_no_secrets


def export_span(
    endpoint: str, headers: dict[str, str], *, gzip_body: bool = False, timeout: float = 10
) -> SpanExportResult:
    """Make one real span with the SDK and export it with the SDK's OTLP/HTTP exporter."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("tests").start_as_current_span("build-and-test"):
        pass
    provider.shutdown()
    exporter = OTLPSpanExporter(
        endpoint=endpoint,
        headers=headers,
        timeout=timeout,
        compression=Compression.Gzip if gzip_body else Compression.NoCompression,
    )
    try:
        return exporter.export(memory.get_finished_spans())
    finally:
        exporter.shutdown()


async def test_sdk_span_reaches_sink_with_account_key_and_no_client_credential(
    tracegate: Tracegate, issuer: StandInIssuer, sink: Sink, caplog: Any
) -> None:
    token = issuer.mint()
    result = await asyncio.to_thread(
        export_span,
        tracegate.url + "/v1/traces",
        {
            "authorization": f"Bearer {token}",
            "cookie": "session=abc",
            "x-forwarded-for": "10.0.0.1",
            "x_forwarded_for": "10.0.0.2",
        },
    )
    assert result is SpanExportResult.SUCCESS
    assert len(sink.received) == 1
    got = sink.received[0]
    assert got.path == "/v1/traces"
    assert got.headers.getall("lightstep-access-token") == [PAYMENTS_KEY]
    for name in ("Authorization", "Cookie", "X-Forwarded-For", "X_Forwarded_For", "Forwarded"):
        assert name not in got.headers
    assert token not in str(got.headers)
    request = ExportTraceServiceRequest.FromString(got.body)
    span = request.resource_spans[0].scope_spans[0].spans[0]
    assert span.name == "build-and-test"
    audit = tracegate.audit()
    assert audit[-1]["decision"] == "allowed"
    assert audit[-1]["service_account"] == "payments-ci"
    assert audit[-1]["project_path"] == "payments/api"
    assert audit[-1]["upstream_status"] == 200
    assert_no_secrets(caplog.text + "".join(tracegate.audit_lines), token)


async def test_gzip_body_is_forwarded_byte_for_byte(
    tracegate: Tracegate, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    raw = ExportTraceServiceRequest().SerializeToString() + b"\x0a\x00" * 5000
    body = gzip.compress(raw)
    async with client.post(
        tracegate.url + "/v1/traces",
        data=body,
        headers={
            "Authorization": f"Bearer {issuer.mint()}",
            "Content-Type": "application/x-protobuf",
            "Content-Encoding": "gzip",
        },
    ) as resp:
        assert resp.status == 200
    assert sink.received[0].body == body
    assert sink.received[0].headers["Content-Encoding"] == "gzip"
    assert sink.received[0].headers["Content-Length"] == str(len(body))


async def test_sdk_gzip_export(tracegate: Tracegate, issuer: StandInIssuer, sink: Sink) -> None:
    result = await asyncio.to_thread(
        export_span, tracegate.url + "/v1/traces", {"authorization": f"Bearer {issuer.mint()}"}, gzip_body=True
    )
    assert result is SpanExportResult.SUCCESS
    assert sink.received[0].headers["Content-Encoding"] == "gzip"
    assert ExportTraceServiceRequest.FromString(gzip.decompress(sink.received[0].body)).resource_spans


async def test_chunked_body_streams_through(
    tracegate: Tracegate, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    parts = [b"x" * 70000, b"y" * 5, b"z" * 300000]

    async def body() -> Any:
        for part in parts:
            yield part

    async with client.post(
        tracegate.url + "/v1/logs", data=body(), headers={"Authorization": f"Bearer {issuer.mint()}"}
    ) as resp:
        assert resp.status == 200
    assert sink.received[0].body == b"".join(parts)
    assert sink.received[0].path == "/v1/logs"


async def test_lightstep_access_token_header_carries_the_jwt(
    tracegate: Tracegate, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    token = issuer.mint(project_path="docs/site")
    async with client.post(
        tracegate.url + "/v1/traces",
        data=b"",
        headers={"Lightstep-Access-Token": token, "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 200
    assert sink.received[0].headers.getall("lightstep-access-token") == [DOCS_KEY]


async def test_same_token_in_both_headers_is_one_credential(
    tracegate: Tracegate, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    token = issuer.mint()
    async with client.post(
        tracegate.url + "/v1/metrics",
        data=b"",
        headers={"Authorization": f"Bearer {token}", "lightstep-access-token": token},
    ) as resp:
        assert resp.status == 200
    assert sink.received[0].headers.getall("lightstep-access-token") == [PAYMENTS_KEY]


async def test_es256_token_verifies(
    tracegate: Tracegate, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    async with client.post(
        tracegate.url + "/v1/traces", data=b"", headers={"Authorization": f"Bearer {issuer.mint(alg='ES256')}"}
    ) as resp:
        assert resp.status == 200
    assert len(sink.received) == 1


async def test_upstream_answers_are_relayed_unchanged(
    tracegate: Tracegate, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    token = issuer.mint()
    for status, retry_after in ((429, "7"), (503, "11"), (500, None), (400, None)):
        sink.status, sink.retry_after = status, retry_after
        sink.answer = status_pb2.Status(code=8, message=f"upstream says {status}").SerializeToString()
        async with client.post(
            tracegate.url + "/v1/traces",
            data=b"abc",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-protobuf"},
        ) as resp:
            assert resp.status == status
            assert resp.headers.get("Retry-After") == retry_after
            assert resp.headers["Content-Type"] == "application/x-protobuf"
            assert await resp.read() == sink.answer


async def test_upstream_partial_success_body_reaches_client(
    tracegate: Tracegate, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    sink.answer = json.dumps({"partialSuccess": {"rejectedSpans": "2", "errorMessage": "too old"}}).encode()
    async with client.post(
        tracegate.url + "/v1/traces",
        data=b"{}",
        headers={"Authorization": f"Bearer {issuer.mint()}", "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/json"
        assert await resp.read() == sink.answer


async def test_upstream_unreachable_is_502(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    from tests.conftest import policy_yaml

    tg = await start_tracegate(policy_yaml(issuer.url), upstream="http://127.0.0.1:9")
    await tg.keys_ready()
    async with client.post(
        tg.url + "/v1/traces", data=b"x", headers={"Authorization": f"Bearer {issuer.mint()}"}
    ) as resp:
        assert resp.status == 502
        assert status_pb2.Status.FromString(await resp.read()).code == 14


async def test_upstream_timeout_is_504(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    from tests.conftest import policy_yaml

    tg = await start_tracegate(policy_yaml(issuer.url), upstream_timeout="0.3")
    await tg.keys_ready()
    sink.delay = 2.0
    async with client.post(
        tg.url + "/v1/traces", data=b"x", headers={"Authorization": f"Bearer {issuer.mint()}"}
    ) as resp:
        assert resp.status == 504
    assert tg.metric("tracegate_upstream_responses_total", signal="traces", status="timeout") == 1


async def test_unknown_path_404_and_wrong_method_405(
    tracegate: Tracegate, client: aiohttp.ClientSession, sink: Sink
) -> None:
    async with client.post(tracegate.url + "/v1/profiles", data=b"") as resp:
        assert resp.status == 404
    async with client.get(tracegate.url + "/v1/traces") as resp:
        assert resp.status == 405
    assert sink.received == []


async def test_metrics_health_and_ready(
    tracegate: Tracegate, issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    async with client.post(
        tracegate.url + "/v1/traces", data=b"x", headers={"Authorization": f"Bearer {issuer.mint()}"}
    ) as resp:
        assert resp.status == 200
    async with client.get(tracegate.admin_url + "/healthz") as resp:
        assert resp.status == 200
    async with client.get(tracegate.admin_url + "/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["issuers_without_keys"] == []
    async with client.get(tracegate.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert (
        'tracegate_requests_total{decision="allowed",reason="forwarded",'
        'service_account="payments-ci",signal="traces",transport="http"} 1.0'
    ) in text
    assert 'tracegate_jwks_fetches_total{issuer="gitlab",result="ok"}' in text
    assert "tracegate_upstream_duration_seconds_bucket" in text
    assert 'tracegate_request_bytes_total{signal="traces"} 1.0' in text
    assert "tracegate_policy_loaded 1.0" in text
