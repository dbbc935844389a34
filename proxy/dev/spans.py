"""What ``tracegate dev``'s sinks print of a trace export: one line per span, with its ids.

So that a user sees on the dev console that a job's own spans (parented on ``GET
/v1/traceparent``) and the job span drawn from the forge's webhook share one trace, and which
span is whose parent. OTLP/JSON (ids in hex, as the OTLP/JSON encoding writes them) or
protobuf, gzip-compressed or not. Only names and ids are printed — never attribute values,
which can hold whatever a client put there. Dev-only: nothing on the request path reads this.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

#: The OTLP/gRPC trace service's method prefix (the gRPC sink's calls carry no content type).
TRACE_SERVICE = "/opentelemetry.proto.collector.trace.v1.TraceService/"
#: Spans listed per export; a bigger export says how many more it held.
MAX_SPANS = 20
#: Decompressed bytes read of one export (the dev sink is local, but a client can send much).
MAX_BYTES = 16 * 1024 * 1024


def span_ids(
    body: bytes, content_type: str | None = None, encoding: str | None = None
) -> list[tuple[str, str, str, str]]:
    """(name, trace id, span id, parent span id or "") of every span of an OTLP trace export
    (protobuf unless ``content_type`` says JSON), in the order sent. Raises ValueError for a
    body that is not one."""
    if (encoding or "").strip().lower() == "gzip":
        try:
            body = gzip.decompress(body)
        except (OSError, EOFError) as exc:
            raise ValueError(f"not gzip ({exc})") from None
    if len(body) > MAX_BYTES:
        raise ValueError(f"over {MAX_BYTES} bytes")
    if (content_type or "").split(";")[0].strip().lower() == "application/json":
        return _from_json(body)
    return _from_protobuf(body)


def _from_json(body: bytes) -> list[tuple[str, str, str, str]]:
    try:
        request = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    out = []
    for resource in _list(request, "resourceSpans"):
        for scope in _list(resource, "scopeSpans"):
            for span in _list(scope, "spans"):
                name, trace, span_id, parent = (
                    str(span.get(k, "")) for k in ("name", "traceId", "spanId", "parentSpanId")
                )
                out.append((name, trace, span_id, parent))
    return out


def _list(value: Any, key: str) -> list[dict[str, Any]]:
    items = value.get(key) if isinstance(value, dict) else None
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def _from_protobuf(body: bytes) -> list[tuple[str, str, str, str]]:
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except DecodeError as exc:
        raise ValueError(f"not an OTLP trace export ({exc})") from None
    return [
        (span.name, span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex())
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]


def span_lines(body: bytes, content_type: str | None = None, encoding: str | None = None) -> list[str]:
    """The lines the dev console prints under a trace export the sink received."""
    try:
        found = span_ids(body, content_type, encoding)
    except ValueError as exc:
        return [f"  (its spans could not be read: {exc})"]
    lines = [
        f"  span {name[:120]!r} trace {trace} span {span} parent {parent or '-'}"
        for name, trace, span, parent in found[:MAX_SPANS]
    ]
    if len(found) > MAX_SPANS:
        lines.append(f"  … and {len(found) - MAX_SPANS} more span(s)")
    return lines
