"""Markers and CI spans reach every backend: stored as OTLP/JSON, sent as OTLP/protobuf to a
traces route that takes no JSON (New Relic, Dynatrace, Elastic, Splunk, backend: otlp with
json: false), as JSON byte for byte to one that does. The protobuf is parsed back with
opentelemetry-proto and compared with the stored JSON — ids as their bytes (OTLP/JSON's hex,
not proto3 JSON's base64). A refusal before sending (the account may no longer send traces,
a row that cannot be converted) is recorded as failed with its reason; the sender goes on."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from proxy.ci.door import OUTBOX
from proxy.ci.marker import Marker, otlp_json
from proxy.ci.otlp_proto import traces_to_protobuf
from proxy.ci.pipeline import CiSpan, RunId
from proxy.ci.pipeline import otlp_json as ci_json
from proxy.dev.standins import Sink, StandInIssuer
from tests import ci_payloads as c
from tests import gitea_payloads as g
from tests.conftest import Tracegate, assert_no_secrets, environ, policy_yaml

KEY = "backend-key-5f1e2d3c4b5a69788796a5b4"
HOOK = "gitea-hook-backends-1"
GITLAB_HOOK = "gitlab-hook-backends-2"


def to_otlp_json(message: ExportTraceServiceRequest) -> dict[str, Any]:
    """The protobuf back as OTLP/JSON: proto3 JSON with its base64 ids written as hex."""
    document = json_format.MessageToDict(message, use_integers_for_enums=True)
    for rs in document.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for item in (span, *span.get("links", [])):
                    for name in ("traceId", "spanId", "parentSpanId"):
                        if name in item:
                            item[name] = base64.b64decode(item[name]).hex()
    return document


def proto3_defaults_dropped(value: Any) -> Any:
    """What a protobuf cannot tell from unset (empty lists, zero, "") left out, as proto3 does."""
    if isinstance(value, dict):
        kept = {k: proto3_defaults_dropped(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v not in ([], {}, 0, "", None) or isinstance(v, bool)}
    if isinstance(value, list):
        return [proto3_defaults_dropped(v) for v in value]
    return value


def same_export(protobuf: bytes, stored_json: bytes) -> None:
    parsed = ExportTraceServiceRequest.FromString(protobuf)
    assert to_otlp_json(parsed) == proto3_defaults_dropped(json.loads(stored_json))


MARKER = Marker(
    provider="gitea",
    repository_url="https://gitea.example.com/payments/api",
    repository_name="api",
    owner="payments",
    ref_name="main",
    ref_type="branch",
    revision=g.AFTER,
    event="push",
    delivery_id="d-1",
    actor="alice",
    title="Fix rounding",
    compare_url="https://gitea.example.com/payments/api/compare/1...2",
)


def test_hex_ids_become_their_bytes() -> None:
    body = otlp_json(MARKER, ("payments-api", "payments-worker"), "gitea:d-1", 1_700_000_000_123_456_789)
    stored = json.loads(body)
    parsed = ExportTraceServiceRequest.FromString(traces_to_protobuf(body))
    for rs_json, rs in zip(stored["resourceSpans"], parsed.resource_spans, strict=True):
        span_json, span = rs_json["scopeSpans"][0]["spans"][0], rs.scope_spans[0].spans[0]
        assert len(span.trace_id) == 16 and len(span.span_id) == 8
        assert (span.trace_id.hex(), span.span_id.hex()) == (span_json["traceId"], span_json["spanId"])
        assert span.start_time_unix_nano == 1_700_000_000_123_456_789
    same_export(traces_to_protobuf(body), body)
    # The trap the conversion avoids: read as proto3 JSON, 32 hex digits are base64 for 24 bytes.
    naive = json_format.Parse(body, ExportTraceServiceRequest())
    assert len(naive.resource_spans[0].scope_spans[0].spans[0].trace_id) == 24


def test_ci_spans_with_parents_events_and_links_convert() -> None:
    run = RunId("https://gitlab.example.com", "4242", "99001")
    root = CiSpan(run, "pipeline", 10**18, 10**18 + 9 * 10**9, "failure", {"cicd.pipeline.name": "p"})
    job = CiSpan(
        run,
        "unit-tests",
        10**18 + 10**9,
        10**18 + 5 * 10**9,
        "success",
        {"cicd.pipeline.task.name": "unit-tests", "tracegate.retries": 2, "tracegate.ratio": 0.5, "flag": True},
        job_id="880013",
        final_state="success",
        events=(("job.started", 10**18 + 2 * 10**9, {"runner": "r-1"}),),
    )
    body = ci_json([root, job], "ci/payments-api", "gitlab")
    parsed = ExportTraceServiceRequest.FromString(traces_to_protobuf(body))
    spans = parsed.resource_spans[0].scope_spans[0].spans
    assert spans[1].parent_span_id == spans[0].span_id == bytes.fromhex(run.root_span_id)
    assert spans[1].trace_id.hex() == run.trace_id and spans[1].span_id.hex() == job.span_id
    same_export(traces_to_protobuf(body), body)
    trace_id, span_id = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174"
    linked = {
        "resourceSpans": [
            {
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": trace_id,
                                "spanId": span_id,
                                "name": "linked",
                                "links": [{"traceId": run.trace_id, "spanId": run.root_span_id}],
                            }
                        ]
                    }
                ]
            }
        ]
    }
    converted = ExportTraceServiceRequest.FromString(traces_to_protobuf(json.dumps(linked).encode()))
    link = converted.resource_spans[0].scope_spans[0].spans[0].links[0]
    assert (link.trace_id.hex(), link.span_id.hex()) == (run.trace_id, run.root_span_id)


@pytest.mark.parametrize(
    "body",
    [b"[]", b"not json", b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"xyz"}]}]}]}', b'{"nope":1}'],
)
def test_what_is_not_an_otlp_json_export_is_a_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        traces_to_protobuf(body)


# --- through tracegate: the outbox, the sender, a recording sink -------------------------------

#: backend -> (its account keys, the traces path, the credential header and value, JSON accepted).
BACKENDS: dict[str, tuple[tuple[str, ...], str, tuple[str, str], bool]] = {
    "newrelic": (("backend: newrelic",), "/v1/traces", ("api-key", KEY), False),
    "dynatrace": (("backend: dynatrace",), "/api/v2/otlp/v1/traces", ("authorization", f"Api-Token {KEY}"), False),
    "elastic": (("backend: elastic",), "/v1/traces", ("authorization", f"ApiKey {KEY}"), False),
    "splunk": (("backend: splunk",), "/v2/trace/otlp", ("x-sf-token", KEY), False),
    "otlp": (
        ("backend: otlp", "json: false", "headers: {x-api-key: {env: KEY}}"),
        "/v1/traces",
        ("x-api-key", KEY),
        False,
    ),
    "honeycomb": (("backend: honeycomb",), "/v1/traces", ("x-honeycomb-team", KEY), True),
}


def extra_policy(backend: str, sink: Sink, *, signals: str | None = None, webhook: bool = True) -> str:
    """Account ``acct`` on ``backend`` at the sink, with a Gitea marker entry and a GitLab CI one."""
    lines = [*BACKENDS[backend][0], f"upstream: {sink.url}"]
    lines += [] if backend == "otlp" else ["access_token: {env: KEY}"]
    lines += [f"signals: [{signals}]"] if signals else []
    text = "service_accounts:\n  acct:\n" + "".join(f"    {line}\n" for line in lines)
    if webhook:
        text += textwrap.dedent(f"""\
            webhooks:
              - name: checkout
                source: gitea
                repository: acme/checkout
                secret: [{{env: HOOK}}]
                service_account: acct
                services: [checkout, checkout-worker]
              - name: checkout-ci
                source: gitlab
                project_id: {c.PROJECT_ID}
                instance: https://gitlab.example.com
                secret: [{{env: GITLAB_HOOK}}]
                events: [job]
                service_account: acct
                service_name: ci/checkout
            """)
    return text


async def start(start_tracegate: Any, issuer: StandInIssuer, tmp_path: Path, extra: str) -> Tracegate:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "20-backend.yaml").write_text(extra)
    env = {**environ(), "KEY": KEY, "HOOK": HOOK, "GITLAB_HOOK": GITLAB_HOOK}
    tg: Tracegate = await start_tracegate(
        policy_yaml(issuer.url), env=env, outbox_retry_base="0.05", outbox_retry_max="0.3"
    )
    await tg.keys_ready()
    return tg


async def push(client: aiohttp.ClientSession, tg: Tracegate, delivery: str, after: str = g.AFTER) -> int:
    body = g.encode(g.push(repo="acme/checkout", after=after))
    headers = {**g.gitea_headers("push", body, HOOK, delivery=delivery), "Content-Type": "application/json"}
    async with client.post(tg.url + "/webhooks/gitea", data=body, headers=headers) as resp:
        return resp.status


async def arrivals(sink: Sink, n: int, timeout: float = 10.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while len(sink.received) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # and nothing more arrives after
    return sink.received


def outbox_rows(tmp_path: Path) -> dict[str, tuple[bytes, str, str | None]]:
    """key -> (payload, state, last_result), read from the SQLite outbox file."""
    with sqlite3.connect(tmp_path / "data" / "outbox.sqlite3") as db:
        rows = db.execute("SELECT key, payload, state, last_result FROM events").fetchall()
    return {key: (payload, state, result) for key, payload, state, result in rows}


@pytest.mark.parametrize("backend", list(BACKENDS))
async def test_a_marker_reaches_the_backend_in_the_encoding_its_route_takes(
    backend: str,
    start_tracegate: Any,
    issuer: StandInIssuer,
    sink: Sink,
    client: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _keys, path, (header, value), takes_json = BACKENDS[backend]
    tg = await start(start_tracegate, issuer, tmp_path, extra_policy(backend, sink))
    assert await push(client, tg, "d-backend") == 202
    [got] = await arrivals(sink, 1)
    payload, state, result = outbox_rows(tmp_path)["gitea:d-backend"]
    assert (state, result) == ("delivered", "200")
    assert (got.method, got.path, got.headers.getall(header)) == ("POST", path, [value])
    if takes_json:
        assert got.headers["Content-Type"] == "application/json"
        assert got.body == payload  # byte for byte, as stored
    else:
        assert got.headers["Content-Type"] == "application/x-protobuf"
        same_export(got.body, payload)
        names = [
            rs.resource.attributes[0].value.string_value
            for rs in ExportTraceServiceRequest.FromString(got.body).resource_spans
        ]
        assert names == ["checkout", "checkout-worker"]
    assert tg.metric("tracegate_outbox_deliveries_total", result="delivered") == 1
    assert_no_secrets(caplog.text + "\n".join(tg.audit_lines), KEY)


async def test_ci_spans_reach_a_protobuf_only_backend_as_protobuf(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    tg = await start(start_tracegate, issuer, tmp_path, extra_policy("dynatrace", sink))
    headers = c.gitlab_headers("Job Hook", GITLAB_HOOK, instance="https://gitlab.example.com")
    async with client.post(tg.url + "/webhooks/gitlab", data=json.dumps(c.gitlab_job(880011)), headers=headers) as r:
        assert r.status == 202
    [got] = await arrivals(sink, 1)
    assert (got.path, got.headers["Content-Type"]) == ("/api/v2/otlp/v1/traces", "application/x-protobuf")
    [(key, (payload, state, _))] = outbox_rows(tmp_path).items()
    assert key.startswith("ci:gitlab:") and state == "delivered"
    same_export(got.body, payload)
    span = ExportTraceServiceRequest.FromString(got.body).resource_spans[0].scope_spans[0].spans[0]
    assert (
        span.status.code == 2
        and span.parent_span_id.hex()
        == json.loads(payload)["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["parentSpanId"]
    )


async def test_a_refusal_before_sending_is_recorded_failed_and_the_sender_goes_on(
    start_tracegate: Any,
    issuer: StandInIssuer,
    sink: Sink,
    client: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The account stops sending traces while its marker waits out an outage: the forwarder's
    BodyError (signal-not-accepted) is a permanent refusal, recorded with its reason; a row
    that is no OTLP/JSON export (otlp-conversion-failed) too; later events still go out."""
    tg = await start(start_tracegate, issuer, tmp_path, extra_policy("newrelic", sink))
    port = sink.port
    await sink.stop()
    assert await push(client, tg, "d-waiting") == 202
    await asyncio.sleep(0.3)
    assert tg.metric("tracegate_outbox_deliveries_total", result="retry") >= 1
    (tmp_path / "policies" / "20-backend.yaml").write_text(
        extra_policy("newrelic", sink, signals="metrics", webhook=False)
    )
    assert await tg.runtime.reload()
    await sink.start(port)
    deadline = time.monotonic() + 10
    while (
        tg.metric("tracegate_outbox_deliveries_total", result="failed-permanently") < 1 and time.monotonic() < deadline
    ):
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # and it is not retried
    assert outbox_rows(tmp_path)["gitea:d-waiting"][1:] == ("failed", "signal-not-accepted")
    assert sink.received == []
    refused = [r for r in tg.audit() if r.get("event") == "outbox" and r["decision"] == "failed-permanently"]
    assert [(r["delivery"], r["reason"]) for r in refused] == [("gitea:d-waiting", "signal-not-accepted")]
    assert [getattr(r, "reason", None) for r in caplog.records if r.name == "tracegate.outbox"] == [
        "signal-not-accepted"
    ]
    # The sender is alive: a protobuf-only account's unreadable row is refused for its reason.
    (tmp_path / "policies" / "20-backend.yaml").write_text(extra_policy("newrelic", sink))
    assert await tg.runtime.reload()
    await (
        tg.runners[0]
        .app[OUTBOX]
        .add(key="gitea:corrupt-2", body_digest="corrupt-2", source="gitea", service_account="acct", payload=b"{")
    )
    assert await push(client, tg, "d-after", after="b" * 40) == 202
    deadline = time.monotonic() + 10
    while outbox_rows(tmp_path)["gitea:d-after"][1] != "delivered" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    rows = outbox_rows(tmp_path)
    assert rows["gitea:d-after"][1:] == ("delivered", "200")
    assert rows["gitea:corrupt-2"][1:] == ("failed", "otlp-conversion-failed")
