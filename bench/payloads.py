"""Real OTLP trace exports, made with the OpenTelemetry SDK and its protobuf encoder."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def _spans(count: int) -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": "checkout", "service.version": "1.4.2", "deployment.environment.name": "ci"}
        )
    )
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("bench", "1.0")
    for i in range(count):
        with tracer.start_as_current_span(f"test case {i}") as span:
            span.set_attribute("code.function.name", f"test_invoice_rounding_{i}")
            span.set_attribute("test.suite.name", "payments/api unit tests")
            span.set_attribute("cicd.pipeline.run.id", "99001")
            span.set_attribute("http.response.status_code", 200)
    provider.shutdown()
    return list(memory.get_finished_spans())


def otlp_payload(target_bytes: int) -> bytes:
    """An ExportTraceServiceRequest of about ``target_bytes`` (never less than one span)."""
    per_span = len(encode_spans(_spans(20)).SerializeToString()) / 20
    count = max(1, round(target_bytes / per_span))
    return encode_spans(_spans(count)).SerializeToString()
