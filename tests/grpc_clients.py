"""Clients for the gRPC tests: the OpenTelemetry SDK's gRPC exporters (traces, metrics,
logs) with the bytes they send, a raw grpc.aio caller, and a throwaway CA for TLS."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from proxy.doors.grpc_door import METHODS
from tests.certs import TestCA

METHOD = {signal: method for method, signal in METHODS.items()}


def _spans() -> tuple[Any, bytes]:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "payments-api"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("tests").start_as_current_span("ci-job: test") as span:
        span.set_attribute("payload", "x" * 2000)
    provider.shutdown()
    spans = memory.get_finished_spans()
    return spans, encode_spans(spans).SerializeToString()


def _metrics() -> tuple[Any, bytes]:
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.resources import Resource

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create({"service.name": "payments-api"}))
    provider.get_meter("tests").create_counter("ci.jobs").add(3, {"stage": "test"})
    data = reader.get_metrics_data()
    provider.shutdown()
    return data, encode_metrics(data).SerializeToString()


def _logs() -> tuple[Any, bytes]:
    from opentelemetry._logs import SeverityNumber
    from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
    from opentelemetry.sdk.resources import Resource

    memory = InMemoryLogRecordExporter()
    provider = LoggerProvider(resource=Resource.create({"service.name": "payments-api"}))
    provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
    provider.get_logger("tests").emit(body="deploy finished", severity_number=SeverityNumber.INFO)
    logs = memory.get_finished_logs()
    provider.shutdown()
    return logs, encode_logs(logs).SerializeToString()


def sdk_export(
    signal: str,
    endpoint: str,
    headers: dict[str, str],
    *,
    gzip: bool = False,
    credentials: grpc.ChannelCredentials | None = None,
    timeout: float = 10,
) -> tuple[bool, bytes]:
    """Export one batch of ``signal`` with the SDK's gRPC exporter (blocking: run it in a
    thread). Returns whether the exporter reported success, and the message it sent."""
    from opentelemetry.exporter.otlp.proto.grpc import _log_exporter, metric_exporter, trace_exporter
    from opentelemetry.exporter.otlp.proto.grpc.exporter import Compression

    data, sent = {"traces": _spans, "metrics": _metrics, "logs": _logs}[signal]()
    exporter_class: Any = {
        "traces": trace_exporter.OTLPSpanExporter,
        "metrics": metric_exporter.OTLPMetricExporter,
        "logs": _log_exporter.OTLPLogExporter,
    }[signal]
    exporter = exporter_class(
        endpoint=endpoint,
        insecure=credentials is None,
        credentials=credentials,
        headers=headers,
        timeout=timeout,
        compression=Compression.Gzip if gzip else Compression.NoCompression,
    )
    try:
        result = exporter.export(data)
    finally:
        exporter.shutdown()
    return result.name == "SUCCESS", sent


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    trailers: tuple[tuple[str, str | bytes], ...]
    body: bytes | None


async def call(
    port: int,
    metadata: Sequence[tuple[str, str | bytes]],
    body: bytes = b"\x0a\x00",
    *,
    signal: str = "traces",
    method: str | None = None,
    timeout: float = 10,
    compression: grpc.Compression | None = None,
) -> Outcome:
    """One raw unary call to tracegate's gRPC listener (plaintext), and how it ended."""
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = channel.unary_unary(method or METHOD[signal])
        try:
            response: bytes = await stub(
                body, metadata=aio.Metadata(*metadata), timeout=timeout, compression=compression
            )
        except aio.AioRpcError as exc:
            return Outcome(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()), None)
        return Outcome(grpc.StatusCode.OK, "", (), response)


@dataclass
class ThrowawayCA:
    """tests.certs.TestCA with a server certificate for 127.0.0.1/localhost issued, in the
    shape grpcio's credentials take (PEM bytes); :meth:`client_pair` issues client
    certificates (mTLS) from the same CA."""

    ca: TestCA
    cert: Path
    key: Path

    @property
    def ca_file(self) -> Path:
        return self.ca.cert

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert.read_bytes()

    def client_pair(self, name: str = "ci-runner") -> tuple[bytes, bytes]:
        """(key PEM, certificate PEM) of a client certificate signed by this CA."""
        client = self.ca.issue(name, server=False)
        return client.key.read_bytes(), client.cert.read_bytes()

    @classmethod
    def create(cls, directory: Path) -> ThrowawayCA:
        ca = TestCA(directory)
        server = ca.issue("server")
        return cls(ca, server.cert, server.key)
