"""OTLP/JSON to OTLP/protobuf, for the bodies tracegate makes itself (markers, CI spans, and the
delivery metrics of :mod:`.metric_points`).

The outbox stores what tracegate builds as OTLP/JSON (:mod:`.marker`, :mod:`.pipeline`). A
backend whose traces route takes protobuf only (``Route.json`` false: New Relic, Dynatrace,
Elastic, Splunk, ``backend: otlp`` with ``json: false``) gets it re-encoded at send time, so
the row stays the same whichever backend the account points at after a reload.

The one trap: OTLP/JSON writes trace and span ids as hex (OTLP specification, "JSON Protobuf
Encoding"), where proto3's JSON mapping, which ``json_format`` implements, reads ``bytes`` as
base64. 32 hex digits are valid base64, so parsing them unchanged gives 24 wrong bytes and no
error; the ids are turned into base64 first. Everything else tracegate writes (lowerCamelCase
names, integer enums, 64-bit integers as strings) is proto3 JSON as well.

Cost (``json_format`` walks the message in Python): measured with ``timeit`` (best of 7 x 500)
on the 2-core dev container, protobuf 7 (upb), a two-service push marker of 2.7 KB of JSON
takes 0.75 ms and becomes 1.5 KB of protobuf; a CI job span with an event, 1.1 KB, 0.4 ms.
It runs on the event loop, once per delivery attempt: markers come one per push and CI spans
one per job, so the pauses are rare and short; a thread would not shorten them (the work holds
the GIL). ``json.loads`` is 0.03 ms of it; the rest is ``json_format``.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

PROTOBUF = "application/x-protobuf"
_IDS = ("traceId", "spanId", "parentSpanId")


def _hex_ids_to_base64(item: dict[str, Any]) -> None:
    for name in _IDS:
        value = item.get(name)
        if isinstance(value, str):
            # bytes.fromhex raises ValueError for anything but hex digit pairs.
            item[name] = base64.b64encode(bytes.fromhex(value)).decode("ascii")


def traces_to_protobuf(body: bytes) -> bytes:
    """An OTLP/JSON ExportTraceServiceRequest as its protobuf encoding. Raises ValueError for
    a body that is not one (not JSON, an id that is not hex, a field OTLP does not have)."""
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("an OTLP/JSON export is a JSON object")
    try:
        for resource_spans in document.get("resourceSpans", ()):
            for scope_spans in resource_spans.get("scopeSpans", ()):
                for span in scope_spans.get("spans", ()):
                    _hex_ids_to_base64(span)
                    for link in span.get("links", ()):
                        _hex_ids_to_base64(link)
        message = json_format.ParseDict(document, ExportTraceServiceRequest())
    except (AttributeError, TypeError, json_format.ParseError) as exc:
        raise ValueError(f"not an OTLP/JSON trace export: {type(exc).__name__}") from None
    encoded: bytes = message.SerializeToString()
    return encoded


def metrics_to_protobuf(body: bytes) -> bytes:
    """An OTLP/JSON ExportMetricsServiceRequest as its protobuf encoding (a metrics route that
    takes no JSON: Grafana Cloud, Datadog, Dynatrace…). Exemplars' trace and span ids are hex
    in OTLP/JSON, as span ids are (tracegate writes none; one that does is converted). Raises
    ValueError for a body that is not such an export."""
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("an OTLP/JSON export is a JSON object")
    try:
        for resource_metrics in document.get("resourceMetrics", ()):
            for scope_metrics in resource_metrics.get("scopeMetrics", ()):
                for metric in scope_metrics.get("metrics", ()):
                    for kind in ("sum", "gauge", "histogram", "exponentialHistogram", "summary"):
                        for point in (metric.get(kind) or {}).get("dataPoints", ()):
                            for exemplar in point.get("exemplars", ()):
                                _hex_ids_to_base64(exemplar)
        message = json_format.ParseDict(document, ExportMetricsServiceRequest())
    except (AttributeError, TypeError, json_format.ParseError) as exc:
        raise ValueError(f"not an OTLP/JSON metrics export: {type(exc).__name__}") from None
    encoded: bytes = message.SerializeToString()
    return encoded
