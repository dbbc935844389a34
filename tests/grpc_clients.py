"""Clients for the gRPC tests: the OpenTelemetry SDK's gRPC exporters (traces, metrics,
logs) with the bytes they send, a raw grpc.aio caller, and a throwaway CA for TLS."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc import aio

from proxy.grpc_door import METHODS

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


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class ThrowawayCA:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost, as PEM files;
    :meth:`client_pair` issues client certificates (mTLS) from the same CA."""

    ca_pem: bytes
    cert: Path
    key: Path
    ca_file: Path
    ca_key: ec.EllipticCurvePrivateKey

    def client_pair(self, name: str = "ci-runner") -> tuple[bytes, bytes]:
        """(key PEM, certificate PEM) of a client certificate signed by this CA."""
        now = datetime.datetime.now(datetime.UTC)
        ca = x509.load_pem_x509_certificate(self.ca_pem)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .sign(self.ca_key, hashes.SHA256())
        )
        return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, directory: Path) -> ThrowawayCA:
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tracegate test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = directory / "server.pem", directory / "server.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        ca_pem = ca.public_bytes(serialization.Encoding.PEM)
        ca_file = directory / "ca.pem"
        ca_file.write_bytes(ca_pem)
        return cls(ca_pem, cert_path, key_path, ca_file, ca_key)
