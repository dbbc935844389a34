"""Stamping verified attributes on exports: the real SDK → tracegate → the sink, decoded
with opentelemetry-proto and compared field by field; and the splice against a full
decode-modify-encode on random messages."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.dev.standins import Sink, StandInIssuer, gitlab_claims
from proxy.errors import StampError
from proxy.policy.stamps import DEFAULT_STAMP
from proxy.upstream.stamp import Stamp, gunzip, stamp_http_body, stamp_json, stamp_protobuf, stamp_values
from tests.conftest import DOCS_KEY, PAYMENTS_KEY, assert_no_secrets

#: What the client claims about itself; every key but service.name is stamped by default.
CLIENT_RESOURCE = {
    "service.name": "checkout",
    "cicd.pipeline.run.id": "forged-run",
    "vcs.ref.head.revision": "0000000000000000000000000000000000000000",
    "tracegate.actor": "mallory",
    "vcs.repository.name": "someone/else",
}


def stamp_policy(issuer_url: str) -> str:
    return textwrap.dedent(f"""\
        issuers:
          gitlab:
            issuer: {issuer_url}
            audiences: [tracegate]
        service_accounts:
          stamped-ci:
            access_token: {{env: LS_TOKEN_PAYMENTS}}
            stamp: default
          plain-ci:
            access_token: {{env: LS_TOKEN_DOCS}}
        rules:
          - name: stamped
            issuer: gitlab
            when: {{project_id: 4242, namespace_id: 72}}
            service_account: stamped-ci
          - name: plain
            issuer: gitlab
            when: {{project_id: 9999}}
            service_account: plain-ci
        """)


def reference_stamp(message: Message, stamp: Stamp) -> Message:
    """Stamping by full decode-modify-encode: what the splice must be equivalent to."""
    out = type(message)()
    out.CopyFrom(message)
    keys = {k for k, _ in stamp}
    entries = next(getattr(out, f) for f in ("resource_spans", "resource_metrics", "resource_logs") if hasattr(out, f))
    for entry in entries:
        kept = [kv for kv in entry.resource.attributes if kv.key not in keys]
        del entry.resource.attributes[:]
        entry.resource.attributes.extend(kept)
        entry.resource.attributes.extend(
            KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in stamp if v is not None
        )
    return out


def assert_stamped(got: Message, sent: Message, stamp: Stamp) -> None:
    """``got`` is ``sent`` with the verified values, once each, and nothing else changed."""
    assert got == reference_stamp(sent, stamp)
    for entry in next(
        getattr(got, f) for f in ("resource_spans", "resource_metrics", "resource_logs") if getattr(got, f, None)
    ):
        attrs = [(kv.key, kv.value.string_value) for kv in entry.resource.attributes]
        for key, value in stamp:
            found = [v for k, v in attrs if k == key]
            assert found == ([value] if value is not None else [])


def _spans() -> list[Any]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(CLIENT_RESOURCE))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("tests", "1.0")
    for i in range(3):
        with tracer.start_as_current_span(f"case {i}") as span:
            span.set_attribute("test.case", i)
            span.add_event("checkpoint", {"n": i})
    provider.shutdown()
    return list(memory.get_finished_spans())


def _export_spans(url: str, token: str, spans: Sequence[Any], gzip_body: bool) -> SpanExportResult:
    exporter = OTLPSpanExporter(
        endpoint=url + "/v1/traces",
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
        compression=Compression.Gzip if gzip_body else Compression.NoCompression,
    )
    try:
        return exporter.export(spans)
    finally:
        exporter.shutdown()


def verified(issuer: StandInIssuer) -> Stamp:
    return stamp_values(DEFAULT_STAMP, gitlab_claims(issuer.url))


@pytest.mark.parametrize("gzip_body", [False, True])
async def test_sdk_traces_carry_only_verified_identity(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, sink: Sink, gzip_body: bool
) -> None:
    tg = await start_tracegate(stamp_policy(issuer.url))
    await tg.keys_ready()
    spans = _spans()
    result = await asyncio.to_thread(_export_spans, tg.url, issuer.mint(), spans, gzip_body)
    assert result is SpanExportResult.SUCCESS
    (got,) = sink.received
    assert got.headers["lightstep-access-token"] == PAYMENTS_KEY
    body = got.body
    if gzip_body:
        assert got.headers["Content-Encoding"] == "gzip"
        body = gzip.decompress(body)
    assert int(got.headers["Content-Length"]) == len(got.body)
    stamp = verified(issuer)
    assert dict(stamp)["cicd.pipeline.run.id"] == "99001"
    assert dict(stamp)["tracegate.repository.id"] == "4242"
    assert_stamped(ExportTraceServiceRequest.FromString(body), encode_spans(spans), stamp)


async def test_sdk_metrics_and_logs_are_stamped(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, sink: Sink
) -> None:
    tg = await start_tracegate(stamp_policy(issuer.url))
    await tg.keys_ready()
    token = issuer.mint()
    reader = InMemoryMetricReader()
    meters = MeterProvider(resource=Resource.create(CLIENT_RESOURCE), metric_readers=[reader])
    counter = meters.get_meter("tests").create_counter("tests.run")
    counter.add(3, {"suite": "unit"})
    counter.add(1, {"suite": "integration"})
    metrics = reader.get_metrics_data()
    meters.shutdown()

    memory = InMemoryLogRecordExporter()
    loggers = LoggerProvider(resource=Resource.create(CLIENT_RESOURCE))
    loggers.add_log_record_processor(SimpleLogRecordProcessor(memory))
    loggers.get_logger("tests").emit(LogRecord(body="build passed", severity_number=SeverityNumber.INFO))
    loggers.shutdown()
    logs = memory.get_finished_logs()

    def export() -> tuple[Any, Any]:
        headers = {"authorization": f"Bearer {token}"}
        m = OTLPMetricExporter(endpoint=tg.url + "/v1/metrics", headers=headers, timeout=10)
        lg = OTLPLogExporter(endpoint=tg.url + "/v1/logs", headers=headers, timeout=10)
        try:
            return m.export(metrics), lg.export(logs)
        finally:
            m.shutdown()
            lg.shutdown()

    metric_result, log_result = await asyncio.to_thread(export)
    assert metric_result.name == "SUCCESS" and log_result.name == "SUCCESS"
    by_path = {r.path: r.body for r in sink.received}
    stamp = verified(issuer)
    assert_stamped(ExportMetricsServiceRequest.FromString(by_path["/v1/metrics"]), encode_metrics(metrics), stamp)
    assert_stamped(ExportLogsServiceRequest.FromString(by_path["/v1/logs"]), encode_logs(logs), stamp)


@pytest.mark.parametrize("gzip_body", [False, True])
async def test_json_export_is_stamped(
    start_tracegate: Callable[..., Any],
    issuer: StandInIssuer,
    sink: Sink,
    client: aiohttp.ClientSession,
    gzip_body: bool,
) -> None:
    tg = await start_tracegate(stamp_policy(issuer.url))
    await tg.keys_ready()
    sent = encode_spans(_spans())
    raw = json_format.MessageToJson(sent).encode()  # the proto3 JSON mapping: lowerCamelCase
    headers = {"Authorization": f"Bearer {issuer.mint()}", "Content-Type": "application/json"}
    if gzip_body:
        raw = gzip.compress(raw)
        headers["Content-Encoding"] = "gzip"
    async with client.post(tg.url + "/v1/traces", data=raw, headers=headers) as resp:
        assert resp.status == 200
    (got,) = sink.received
    body = gzip.decompress(got.body) if gzip_body else got.body
    decoded = json_format.Parse(body, ExportTraceServiceRequest())
    assert_stamped(decoded, sent, verified(issuer))


async def test_unstamped_account_gets_the_clients_bytes(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    tg = await start_tracegate(stamp_policy(issuer.url))
    await tg.keys_ready()
    raw = encode_spans(_spans()).SerializeToString() + b"\x1a\x03odd"  # an unknown field too
    for encoding in ("", "gzip"):
        body = gzip.compress(raw) if encoding else raw
        headers = {"Authorization": f"Bearer {issuer.mint(project_id=9999)}", "Content-Type": "application/x-protobuf"}
        if encoding:
            headers["Content-Encoding"] = encoding
        async with client.post(tg.url + "/v1/traces", data=body, headers=headers) as resp:
            assert resp.status == 200
        assert sink.received[-1].body == body
        assert sink.received[-1].headers["lightstep-access-token"] == DOCS_KEY


BOMB = gzip.compress(b"\x00" * (4 << 20))


def _attributes(*attributes: bytes) -> bytes:
    """An OTLP/JSON export whose one resource has these attributes (JSON text each)."""
    return b'{"resourceSpans": [{"resource": {"attributes": [' + b", ".join(attributes) + b"]}}]}"


LONE_SURROGATE_VALUE = _attributes(b'{"key": "service.name", "value": {"stringValue": "\\ud800"}}')


@pytest.mark.parametrize(
    ("content_type", "encoding", "body", "status", "reason"),
    [
        ("application/x-protobuf", "", b"\x0a\xff\xff\xff\x0f", 400, "stamp-bad-protobuf"),
        ("application/x-protobuf", "", b"\x0a\x05\x0a\x03\x0a", 400, "stamp-bad-protobuf"),
        ("application/x-protobuf", "", b"\x08", 400, "stamp-bad-protobuf"),
        ("application/x-protobuf", "", b"\x0b\x0c", 400, "stamp-bad-protobuf"),
        ("application/json", "", b'{"resourceSpans": [', 400, "stamp-bad-json"),
        ("application/json", "", b'{"resourceSpans": {"resource": 1}}', 400, "stamp-bad-json"),
        ("application/json", "", b'{"resourceSpans": [{"resource": {"attributes": 3}}]}', 400, "stamp-bad-json"),
        ("application/json", "", b'{"x": NaN}', 400, "stamp-bad-json"),
        ("application/json", "", b'{"x": 1e999}', 400, "stamp-bad-json"),
        ("application/json", "", '{"x": "é"}'.encode("utf-16"), 400, "stamp-bad-json"),
        # Parsed, but not text: a lone surrogate cannot be encoded again (was a 500).
        ("application/json", "", LONE_SURROGATE_VALUE, 400, "stamp-bad-json"),
        ("application/json", "", b'{"\\udfff": 1}', 400, "stamp-bad-json"),
        ("application/json", "gzip", gzip.compress(LONE_SURROGATE_VALUE), 400, "stamp-bad-json"),
        # An attribute key that is not a string (a list could not even be compared: was a 500).
        ("application/json", "", _attributes(b'{"key": ["tracegate.actor"]}'), 400, "stamp-bad-json"),
        ("application/json", "", _attributes(b'{"key": 7, "value": {}}'), 400, "stamp-bad-json"),
        ("application/json", "", b'{"x": ' + b"9" * 5000 + b"}", 400, "stamp-bad-json"),  # past int's digit limit
        ("application/json", "", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "stamp-bad-json"),
        ("application/json", "", _attributes(b'{"key": "x", "value": "\xed\xa0\x80"}'), 400, "stamp-bad-json"),
        ("application/x-protobuf", "gzip", b"\x1f\x8b\x08\x00garbage", 400, "stamp-bad-gzip"),
        ("application/x-protobuf", "gzip", gzip.compress(b"\x0a\x00")[:-6], 400, "stamp-bad-gzip"),
        ("application/x-protobuf", "gzip", BOMB, 413, "body-too-large"),
        ("application/x-protobuf", "br", b"\x0a\x00", 400, "stamp-unsupported-content-encoding"),
        ("text/plain", "", b"\x0a\x00", 400, "stamp-unsupported-content-type"),
    ],
)
async def test_unstampable_bodies_are_refused_and_never_forwarded(
    start_tracegate: Callable[..., Any],
    issuer: StandInIssuer,
    sink: Sink,
    client: aiohttp.ClientSession,
    content_type: str,
    encoding: str,
    body: bytes,
    status: int,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tg = await start_tracegate(stamp_policy(issuer.url), max_body=str(1 << 20))
    await tg.keys_ready()
    headers = {"Authorization": f"Bearer {issuer.mint()}", "Content-Type": content_type}
    if encoding:
        headers["Content-Encoding"] = encoding
    async with client.post(tg.url + "/v1/traces", data=body, headers=headers) as resp:
        assert resp.status == status
        assert_no_secrets(await resp.text(errors="replace") + str(resp.headers), headers["Authorization"][7:])
    assert sink.received == []
    last = tg.audit()[-1]
    assert (last["decision"], last["reason"]) == ("failed", reason)
    assert tg.metric("tracegate_unhandled_errors_total") == 0
    assert_no_secrets(caplog.text + "".join(tg.audit_lines), headers["Authorization"][7:])


# --- the splice against full decode-modify-encode -----------------------------------

STAMP: Stamp = (("cicd.pipeline.run.id", "99001"), ("vcs.ref.head.name", "main"), ("tracegate.gone", None))
_keys = st.sampled_from(["service.name", "cicd.pipeline.run.id", "vcs.ref.head.name", "tracegate.gone", "x", ""])
_any_value = st.one_of(
    st.builds(AnyValue, string_value=st.text(max_size=20)),
    st.builds(AnyValue, int_value=st.integers(-(2**63), 2**63 - 1)),
    st.builds(AnyValue, bool_value=st.booleans()),
    st.builds(AnyValue, double_value=st.floats(allow_nan=False)),
    st.builds(AnyValue, bytes_value=st.binary(max_size=10)),
)
_kvs = st.lists(st.builds(KeyValue, key=_keys, value=_any_value), max_size=6)
_spans_st = st.lists(
    st.builds(
        Span,
        trace_id=st.binary(min_size=16, max_size=16),
        span_id=st.binary(min_size=8, max_size=8),
        name=st.text(max_size=20),
        kind=st.integers(0, 5),
        start_time_unix_nano=st.integers(0, 2**64 - 1),
        attributes=_kvs,
    ),
    max_size=3,
)


@st.composite
def _resource_spans(draw: st.DrawFn) -> ResourceSpans:
    entry = ResourceSpans(
        scope_spans=draw(st.lists(st.builds(ScopeSpans, spans=_spans_st), max_size=2)),
        schema_url=draw(st.text(max_size=10)),
    )
    if draw(st.booleans()):  # sometimes no resource at all
        entry.resource.CopyFrom(
            PbResource(attributes=draw(_kvs), dropped_attributes_count=draw(st.integers(0, 2**32 - 1)))
        )
    return entry


_requests = st.builds(ExportTraceServiceRequest, resource_spans=st.lists(_resource_spans(), max_size=4))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests)
def test_splice_equals_full_decode_modify_encode(request: ExportTraceServiceRequest) -> None:
    raw = request.SerializeToString()
    spliced = ExportTraceServiceRequest.FromString(stamp_protobuf(raw, STAMP))
    assert spliced == reference_stamp(request, STAMP)
    as_json = json_format.Parse(
        stamp_json(json_format.MessageToJson(request).encode(), STAMP), ExportTraceServiceRequest()
    )
    assert as_json == reference_stamp(request, STAMP)


def test_splice_handles_a_resource_split_over_occurrences() -> None:
    """Protobuf merges repeated occurrences of a message field; the stamp goes into the last."""
    first = PbResource(attributes=[KeyValue(key="cicd.pipeline.run.id", value=AnyValue(string_value="a"))])
    second = PbResource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="svc"))])
    entry = b"\x0a" + bytes([len(first.SerializeToString())]) + first.SerializeToString()
    entry += b"\x0a" + bytes([len(second.SerializeToString())]) + second.SerializeToString()
    raw = b"\x0a" + bytes([len(entry)]) + entry
    got = ExportTraceServiceRequest.FromString(stamp_protobuf(raw, STAMP))
    assert [(kv.key, kv.value.string_value) for kv in got.resource_spans[0].resource.attributes] == [
        ("service.name", "svc"),
        ("cicd.pipeline.run.id", "99001"),
        ("vcs.ref.head.name", "main"),
    ]


def test_gunzip_refuses_what_grows_past_the_limit_and_reads_every_member() -> None:
    assert gunzip(gzip.compress(b"ab") + gzip.compress(b"cd"), 4) == b"abcd"
    with pytest.raises(StampError) as caught:
        gunzip(gzip.compress(b"abcde"), 4)
    assert (caught.value.reason, caught.value.status) == ("body-too-large", 413)


def test_json_keeps_proto_field_names_and_numbers() -> None:
    doc = {
        "resource_spans": [{"resource": {"attributes": [{"key": "x", "value": {"intValue": "12345678901234567890"}}]}}]
    }
    out = json.loads(stamp_json(json.dumps(doc).encode(), STAMP))
    attrs = out["resource_spans"][0]["resource"]["attributes"]
    assert attrs[0] == {"key": "x", "value": {"intValue": "12345678901234567890"}}
    assert [a["key"] for a in attrs] == ["x", "cicd.pipeline.run.id", "vcs.ref.head.name"]


@pytest.mark.parametrize("gzip_body", [False, True])
async def test_large_body_is_stamped(
    start_tracegate: Callable[..., Any],
    issuer: StandInIssuer,
    sink: Sink,
    client: aiohttp.ClientSession,
    gzip_body: bool,
) -> None:
    """Large bodies: protobuf is spliced inline, gzip goes through a worker thread."""
    tg = await start_tracegate(stamp_policy(issuer.url))
    await tg.keys_ready()
    sent = encode_spans(_spans())
    sent.resource_spans[0].scope_spans[0].spans[0].attributes.add(
        key="big",
        value=AnyValue(bytes_value=random.Random(14).randbytes(400_000)),  # incompressible
    )
    raw = sent.SerializeToString()
    headers = {"Authorization": f"Bearer {issuer.mint()}", "Content-Type": "application/x-protobuf"}
    if gzip_body:
        raw = gzip.compress(raw)
        headers["Content-Encoding"] = "gzip"
    assert len(raw) > 256 * 1024
    async with client.post(tg.url + "/v1/traces", data=raw, headers=headers) as resp:
        assert resp.status == 200
    body = sink.received[0].body
    body = gzip.decompress(body) if gzip_body else body
    assert_stamped(ExportTraceServiceRequest.FromString(body), sent, verified(issuer))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["protobuf", "json", "gzip"]))
def test_arbitrary_bytes_stamp_or_raise_stamp_error(body: bytes, kind: str) -> None:
    """No input makes stamping fail any other way (the door would answer 500)."""
    try:
        if kind == "protobuf":
            out = stamp_protobuf(body, STAMP)
            if _decodes(body):
                ExportTraceServiceRequest.FromString(out)  # what decoded still decodes
        elif kind == "json":
            stamp_json(body, STAMP)
        else:
            gunzip(body, 1000)
    except StampError:
        pass


#: Strings as a JSON parser can hand them over: any character, lone surrogates included.
_json_text = st.text(st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)), max_size=6)
_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), _json_text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_json_text, inner, max_size=3)),
    max_leaves=12,
)
#: Raw JSON text that no json.dumps of a Python value writes: huge, overflowing or odd numbers.
_raw_numbers = st.sampled_from(
    ["9" * 5000, "-" + "9" * 4301, "1e999", "-1e400", "1" + "0" * 400 + ".5", "1e-999", "-0"]
)
#: Bytes that make a document invalid UTF-8 (a raw surrogate, an over-long form, a stray tail).
_bad_utf8 = st.sampled_from([b"\x80", b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"])
_HOLE = "@hole@"  # a placeholder string, replaced in the JSON text by a raw number or deep nesting


@st.composite
def _json_ish(draw: st.DrawFn) -> bytes:
    """OTLP/JSON-shaped documents whose every level may be the wrong type, holding lone
    surrogates, huge numbers, deep nesting and invalid UTF-8: what a client can send."""
    attribute = st.one_of(
        st.fixed_dictionaries({"key": st.one_of(_keys, _json_values), "value": _json_values}),
        st.fixed_dictionaries({"key": _keys, "value": st.fixed_dictionaries({"stringValue": _json_text})}),
        _json_values,
        st.just(_HOLE),
    )
    resource = st.one_of(st.fixed_dictionaries({"attributes": st.lists(attribute, max_size=4)}), _json_values)
    entry = st.one_of(st.fixed_dictionaries({"resource": resource}), _json_values)
    doc = draw(
        st.one_of(
            st.dictionaries(st.sampled_from(["resourceSpans", "resource_logs", "x"]), st.lists(entry, max_size=3)),
            _json_values,
        )
    )
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))  # False: raw surrogates, encoded below
    while f'"{_HOLE}"' in text:
        depth = draw(st.integers(0, 3000))
        text = text.replace(f'"{_HOLE}"', "[" * depth + draw(_raw_numbers) + "]" * depth, 1)
    body = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(_bad_utf8) + body[at:]
    return body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_json_ish(), st.booleans())
def test_json_ish_bodies_are_stamped_or_refused_never_an_error(body: bytes, gzip_body: bool) -> None:
    """Issue 18 (8): a lone surrogate made the JSON encoder raise, and the door answer 500.
    Whatever a client sends, stamping returns valid UTF-8 JSON with each verified
    attribute once, or raises StampError (the door's 400/413) — nothing else."""
    try:
        if gzip_body:
            out = gunzip(
                stamp_http_body(
                    gzip.compress(body), STAMP, content_type="application/json", content_encoding="gzip", limit=1 << 20
                ),
                1 << 20,
            )
        else:
            out = stamp_json(body, STAMP)
    except StampError as refused:
        assert (refused.reason, refused.status) in {("stamp-bad-json", 400), ("body-too-large", 413)}
        return
    doc = json.loads(out.decode("utf-8"))  # strict: no lone surrogate, no invalid byte
    wanted = [{"key": k, "value": {"stringValue": v}} for k, v in STAMP if v is not None]
    for name in ("resourceSpans", "resource_logs"):
        for entry in doc.get(name) or ():
            stamped = [a for a in entry["resource"]["attributes"] if a.get("key") in dict(STAMP)]
            assert stamped == wanted


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests, st.data())
def test_damaged_exports_are_stamped_or_refused_never_an_error(
    request: ExportTraceServiceRequest, data: st.DataObject
) -> None:
    """The protobuf walk (OTLP/HTTP and every gRPC message) on a real export with one byte
    changed, inserted or cut off: arbitrary bytes seldom reach the nested fields."""
    raw = request.SerializeToString()
    at = data.draw(st.integers(0, len(raw)))
    how = data.draw(st.sampled_from(["set", "insert", "cut"]))
    byte = bytes([data.draw(st.integers(0, 255))])
    body = {"set": raw[:at] + byte + raw[at + 1 :], "insert": raw[:at] + byte + raw[at:], "cut": raw[:at]}[how]
    try:
        out = stamp_protobuf(body, STAMP)
    except StampError as refused:
        assert (refused.reason, refused.status) == ("stamp-bad-protobuf", 400)
        return
    if _decodes(body):
        ExportTraceServiceRequest.FromString(out)


def _decodes(body: bytes) -> bool:
    try:
        ExportTraceServiceRequest.FromString(body)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
        return False
    return True


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(tag: int, payload: bytes) -> bytes:
    return _varint(tag) + _varint(len(payload)) + payload


@pytest.mark.parametrize(
    "disguised",
    [
        (1 << 35) | (1 << 3) | 2,  # low 32 bits read as field 1: protobuf-java and gogo truncate tags
        (1 << 32) | (1 << 3) | 2,
        ((1 << 29) << 3) | 2,  # field number 2^29: out of range
    ],
)
def test_over_long_or_out_of_range_tags_are_refused_not_walked_past(disguised: int) -> None:
    """A client value for a stamped key hidden behind a tag that this walk would read as an
    unknown field, but a 32-bit parser upstream as an attribute: refused, never forwarded."""
    from proxy.errors import StampError
    from proxy.upstream.stamp import stamp_protobuf

    kv = _ld(0x0A, b"vcs.ref.head.revision") + _ld(0x12, _ld(0x0A, b"forged"))
    for resource in (_ld(disguised, kv), _ld(0x0A, _ld(disguised, b"vcs.ref.head.revision"))):
        body = _ld(0x0A, _ld(0x0A, resource))
        with pytest.raises(StampError) as refused:
            stamp_protobuf(body, (("vcs.ref.head.revision", "c" * 40),))
        assert refused.value.reason == "stamp-bad-protobuf"
