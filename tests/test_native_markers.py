"""Native deployment events (``markers: [otlp, native]``): a signed push becomes, beside its OTLP
marker, the vendor's own request — Honeycomb Markers, a Grafana annotation, a Datadog DORA
deployment, a New Relic change-tracking mutation, a Dynatrace CUSTOM_DEPLOYMENT event — through
the same outbox: exactly once through an outage and a redelivery, on SQLite and PostgreSQL,
with the vendor's auth and no secret anywhere else. A recording sink stands in for every vendor:
each account's ``upstream:`` (Grafana: also ``stack_url:``) points at it, which is where
proxy/backends/native.py places the native endpoint. Field names per the vendors' documentation
(sources in tests/test_backends.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from proxy.cli import main
from proxy.dev.standins import Sink, StandInIssuer
from tests import gitea_payloads as g
from tests.conftest import Tracegate, assert_no_secrets, environ, policy_yaml
from tests.pg_server import PgServer, postgres  # noqa: F401 - the session fixture

HOOK = "gitea-hook-native-0f9e8d"
SECRETS = {
    "HNY_KEY": "hny-ingest-4c1d2e3f4a5b6c7d",
    "HNY_MARKER": "hny-config-key-markers-9a8b7c",
    "GC_TOKEN": "glc_ingest-token-1234567890ab",
    "GC_MARKER": "glsa_annotations-token-abcdef12",
    "DD_KEY": "dd-api-key-0123456789abcdef0123",
    "NR_KEY": "nr-license-key-fedcba9876543210",
    "NR_MARKER": "NRAK-USERKEY0123456789ABCDEF",
    "DT_TOKEN": "dt0c01.TOKEN.SECRETPART0123456789",
}
GRAFANA_BASIC = base64.b64encode(f"123456:{SECRETS['GC_TOKEN']}".encode()).decode()
ACCOUNTS = """\
service_accounts:
  hny:
    backend: honeycomb
    upstream: {sink}
    access_token: {{env: HNY_KEY}}
    marker_token: {{env: HNY_MARKER}}
    marker_dataset: deploys
  grafana:
    backend: grafana-cloud
    upstream: {sink}
    instance_id: 123456
    access_token: {{env: GC_TOKEN}}
    marker_token: {{env: GC_MARKER}}
    stack_url: {sink}
  dd:
    backend: datadog
    upstream: {sink}
    access_token: {{env: DD_KEY}}
  nr:
    backend: newrelic
    upstream: {sink}
    access_token: {{env: NR_KEY}}
    marker_token: {{env: NR_MARKER}}
  dt:
    backend: dynatrace
    upstream: {sink}
    access_token: {{env: DT_TOKEN}}
webhooks:
"""
ENTRY = """\
  - name: {name}
    source: gitea
    repository: acme/{name}
    secret: [{{env: HOOK}}]
    service_account: {account}
    services: [checkout]
    markers: {markers}
"""
VENDORS = {"honeycomb": "hny", "grafana": "grafana", "datadog": "dd", "newrelic": "nr", "dynatrace": "dt"}
#: Where each vendor's native API and OTLP traces are, with the stand-in at the account's upstream.
NATIVE_PATHS = {
    "honeycomb": "/1/markers/deploys",
    "grafana": "/api/annotations",
    "datadog": "/api/v2/dora/deployment",
    "newrelic": "/graphql",
    "dynatrace": "/api/v2/events/ingest",
}
OTLP_PATHS = {
    "honeycomb": "/v1/traces",
    "grafana": "/otlp/v1/traces",
    "datadog": "/v1/traces",
    "newrelic": "/v1/traces",
    "dynatrace": "/api/v2/otlp/v1/traces",
}
SHA = g.AFTER


def native_policy(url: str, markers: str = "[otlp, native]", **accounts: str) -> str:
    """Every vendor's account at ``url``; an entry per vendor (``accounts``: name=account) asking ``markers``."""
    names = accounts or VENDORS
    entries = "".join(ENTRY.format(name=n, account=a, markers=markers) for n, a in names.items())
    return ACCOUNTS.format(sink=url) + entries


async def start(
    start_tracegate: Any,
    issuer: StandInIssuer,
    tmp_path: Path,
    extra: str,
    env: dict[str, str] | None = None,
    **kw: str,
) -> Tracegate:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "20-native.yaml").write_text(extra)
    tg: Tracegate = await start_tracegate(
        policy_yaml(issuer.url),
        env={**environ(), **SECRETS, "HOOK": HOOK, **(env or {})},
        outbox_retry_base="0.05",
        outbox_retry_max="0.3",
        **kw,
    )
    await tg.keys_ready()
    return tg


async def push(client: aiohttp.ClientSession, tg: Tracegate, repo: str, delivery: str) -> tuple[int, dict[str, Any]]:
    body = g.encode(g.push(repo=f"acme/{repo}"))
    headers = {**g.gitea_headers("push", body, HOOK, delivery=delivery), "Content-Type": "application/json"}
    async with client.post(tg.url + "/webhooks/gitea", data=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # and nothing more arrives after


def compare_url(repo: str) -> str:
    return str(g.push(repo=f"acme/{repo}")["compare_url"])


def documented(vendor: str, got: Any, delivered_ns: tuple[int, int]) -> None:
    """``got`` is the vendor's documented request for the push of acme/<vendor> to service
    checkout (the time stored between ``delivered_ns``)."""
    low, high = delivered_ns
    body = json.loads(got.body)
    assert got.method == "POST" and got.path == NATIVE_PATHS[vendor]
    assert got.headers["Content-Type"] == "application/json"
    text = f"deploy checkout {SHA[:12]} (main)"
    if vendor == "honeycomb":  # POST /1/markers/{dataset}, X-Honeycomb-Team: a configuration key
        assert got.headers.getall("X-Honeycomb-Team") == [SECRETS["HNY_MARKER"]]
        assert set(body) == {"message", "type", "start_time", "url"}
        assert (body["message"], body["type"], body["url"]) == (text, "deploy", compare_url(vendor))
        assert low // 10**9 <= body["start_time"] <= high // 10**9  # Unix seconds
    elif vendor == "grafana":  # POST /api/annotations, Bearer service-account token, epoch ms
        assert got.headers.getall("Authorization") == [f"Bearer {SECRETS['GC_MARKER']}"]
        assert set(body) == {"time", "tags", "text"}
        assert body["tags"] == ["deployment", "service:checkout", f"version:{SHA}"]
        assert body["text"] == f"{text} {compare_url(vendor)}"
        assert low // 10**6 <= body["time"] <= high // 10**6
    elif vendor == "datadog":  # POST /api/v2/dora/deployment, DD-API-KEY, data.attributes, ns
        assert got.headers.getall("DD-API-KEY") == [SECRETS["DD_KEY"]]
        attributes = body["data"]["attributes"]
        assert set(body) == {"data"} and set(body["data"]) == {"attributes"}
        assert re.fullmatch(r"tracegate-[0-9a-f]{40}", attributes.pop("id"))
        assert low <= attributes["started_at"] == attributes.pop("finished_at") <= high
        del attributes["started_at"]
        assert attributes == {
            "service": "checkout",
            "version": SHA,
            "git": {"commit_sha": SHA, "repository_url": f"https://gitea.example.com/acme/{vendor}"},
        }
    elif vendor == "newrelic":  # NerdGraph changeTrackingCreateEvent, API-Key: a user key
        assert got.headers.getall("API-Key") == [SECRETS["NR_MARKER"]]
        query = body["query"]
        assert set(body) == {"query"} and query.startswith("mutation { changeTrackingCreateEvent(")
        assert f'deployment: {{ version: "{SHA}", commit: "{SHA}", deepLink: "{compare_url(vendor)}" }}' in query
        assert 'kind: { category: "deployment", type: "basic" }' in query
        assert "entitySearch: { query: \"name = 'checkout'\" }" in query
        assert f'shortDescription: "{text}", groupId: "gitea:d-{vendor}"' in query
        timestamp = int(re.search(r"timestamp: (\d+)", query).group(1))  # type: ignore[union-attr]
        assert low // 10**6 <= timestamp <= high // 10**6
    else:  # POST /api/v2/events/ingest, Api-Token, CUSTOM_DEPLOYMENT with dt.event.deployment.*
        assert got.headers.getall("Authorization") == [f"Api-Token {SECRETS['DT_TOKEN']}"]
        assert low // 10**6 <= body.pop("startTime") == body.pop("endTime") <= high // 10**6
        assert body == {
            "eventType": "CUSTOM_DEPLOYMENT",
            "title": text,
            "entitySelector": 'type(SERVICE),entityName.equals("checkout")',
            "properties": {
                "dt.event.deployment.name": f"checkout {SHA[:12]}",
                "dt.event.deployment.version": SHA,
                "dt.event.deployment.ci_back_link": compare_url(vendor),
            },
        }


def no_secret_in(*texts: str | bytes) -> None:
    for text in texts:
        shown = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        assert_no_secrets(shown, *SECRETS.values(), GRAFANA_BASIC)


@pytest.mark.parametrize("vendor", list(VENDORS))
async def test_each_vendor_gets_its_documented_event_and_the_otlp_marker(
    vendor: str,
    start_tracegate: Any,
    issuer: StandInIssuer,
    sink: Sink,
    client: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tg = await start(start_tracegate, issuer, tmp_path, native_policy(sink.url))
    before = time.time_ns()
    status, answer = await push(client, tg, vendor, f"d-{vendor}")
    after = time.time_ns()
    assert (status, answer["reason"], answer["services"]) == (202, "stored", ["checkout"])
    await until(lambda: len(sink.received) >= 2)
    by_path = {r.path: r for r in sink.received}
    assert len(sink.received) == 2 and set(by_path) == {NATIVE_PATHS[vendor], OTLP_PATHS[vendor]}
    documented(vendor, by_path[NATIVE_PATHS[vendor]], (before, after))
    otlp = by_path[OTLP_PATHS[vendor]]
    if vendor in ("newrelic", "dynatrace"):  # protobuf-only routes get the marker as protobuf
        assert otlp.headers["Content-Type"] == "application/x-protobuf"
        [rs] = ExportTraceServiceRequest.FromString(otlp.body).resource_spans
        assert {a.key: a.value.string_value for a in rs.resource.attributes}["service.version"] == SHA
    else:
        assert otlp.headers["Content-Type"] == "application/json"
    assert tg.metric("tracegate_outbox_deliveries_total", result="delivered") == 2
    native_audit = [r for r in tg.audit() if r.get("event") == "outbox" and "native" in r]
    assert [(r["decision"], r["delivery"]) for r in native_audit] == [
        ("delivered", f"native:gitea:d-{vendor}:checkout")
    ]
    async with client.get(tg.admin_url + "/metrics") as resp:
        metrics = await resp.text()
    outbox_files = b"".join(p.read_bytes() for p in (tmp_path / "data").glob("outbox.sqlite3*"))
    assert f"native:gitea:d-{vendor}:checkout".encode() in outbox_files  # the row is there, and holds no secret
    no_secret_in(caplog.text, "\n".join(tg.audit_lines), metrics, outbox_files, repr(tg.runtime.gate.policy))


async def outbox_rows(store: str, tmp_path: Path, dsn: str) -> dict[str, tuple[str, str | None, bytes]]:
    """key -> (state, last_result, payload), from whichever store the test runs on."""
    if store == "postgres":
        db = await asyncpg.connect(dsn)
        try:
            found = await db.fetch("SELECT key, state, last_result, payload FROM tracegate_outbox_events")
        finally:
            await db.close()
        return {r["key"]: (r["state"], r["last_result"], bytes(r["payload"])) for r in found}
    import sqlite3

    with sqlite3.connect(tmp_path / "data" / "outbox.sqlite3") as db:
        rows = db.execute("SELECT key, state, last_result, payload FROM events").fetchall()
    return {key: (state, result, payload) for key, state, result, payload in rows}


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_through_an_outage_and_redeliveries_each_event_is_delivered_once(
    store: str,
    request: pytest.FixtureRequest,
    start_tracegate: Any,
    issuer: StandInIssuer,
    sink: Sink,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    dsn = ""
    if store == "postgres":
        server: PgServer = request.getfixturevalue("postgres")
        dsn = await server.database()
    tg = await start(
        start_tracegate, issuer, tmp_path, native_policy(sink.url), **({"outbox_path": dsn} if dsn else {})
    )
    answered: list[tuple[str, int]] = []
    sink.on_receive = lambda r: answered.append((r.path, sink.status))
    sink.status, sink.retry_after = 503, "0"
    assert (await push(client, tg, "dynatrace", "d-outage"))[0] == 202
    await until(lambda: sum(1 for p, _ in answered if p == NATIVE_PATHS["dynatrace"]) >= 3)
    sink.status = 200
    await until(lambda: tg.metric("tracegate_outbox_deliveries_total", result="delivered") >= 2)
    replay = await push(client, tg, "dynatrace", "d-outage")  # the same delivery again
    manual = await push(client, tg, "dynatrace", "d-outage-manual")  # Gitea's redelivery: a new id, the same body
    assert replay == (202, {"accepted": False, "reason": "duplicate-delivery", "duplicate": True})
    assert manual == (202, {"accepted": False, "reason": "duplicate-body", "duplicate": True})
    await asyncio.sleep(0.5)
    native = [status for path, status in answered if path == NATIVE_PATHS["dynatrace"]]
    otlp = [status for path, status in answered if path == OTLP_PATHS["dynatrace"]]
    assert native.count(200) == 1 and native.count(503) >= 3 and set(native) == {200, 503}
    assert otlp.count(200) == 1
    assert tg.metric("tracegate_outbox_deliveries_total", result="delivered") == 2
    rows = await outbox_rows(store, tmp_path, dsn)
    assert {k: v[:2] for k, v in rows.items()} == {
        "gitea:d-outage": ("delivered", "200"),
        "native:gitea:d-outage:checkout": ("delivered", "200"),
    }
    stored = json.loads(rows["native:gitea:d-outage:checkout"][2])  # facts only: no URL, header or token
    assert set(stored) <= {
        "service", "version", "time_unix_nano", "event_id", "ref", "environment", "url", "message",
        "repository_url", "started_unix_nano",
    }  # fmt: skip
    assert (stored["service"], stored["version"], stored["event_id"]) == ("checkout", SHA, "gitea:d-outage")
    no_secret_in(json.dumps(stored))


async def test_the_request_is_built_at_send_time_with_the_rotated_token(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    token = tmp_path / "marker-token"
    token.write_text("hny-config-key-old-111\n")
    policy = native_policy(sink.url, honeycomb="hny").replace("{env: HNY_MARKER}", f"{{file: {token}}}")
    tg = await start(start_tracegate, issuer, tmp_path, policy)
    port = sink.port
    await sink.stop()
    assert (await push(client, tg, "honeycomb", "d-rotate"))[0] == 202
    await asyncio.sleep(0.3)
    token.write_text("hny-config-key-new-222\n")
    assert await tg.runtime.reload()
    await sink.start(port)
    await until(lambda: len(sink.received) >= 2)
    [native] = [r for r in sink.received if r.path == NATIVE_PATHS["honeycomb"]]
    assert native.headers.getall("X-Honeycomb-Team") == ["hny-config-key-new-222"]


async def test_refusals_are_kept_failed_and_markers_native_alone_sends_no_span(
    start_tracegate: Any,
    issuer: StandInIssuer,
    sink: Sink,
    client: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = native_policy(sink.url, "[native]", newrelic="nr", datadog="dd")
    tg = await start(start_tracegate, issuer, tmp_path, policy)
    # NerdGraph refuses a mutation with 200 and "errors": final, not retried, not "delivered".
    sink.answer = b'{"errors":[{"message":"entity not found"}],"data":null}'
    assert (await push(client, tg, "newrelic", "d-nr"))[0] == 202
    await until(lambda: len(sink.received) >= 1)
    sink.answer, sink.status = b"", 400
    assert (await push(client, tg, "datadog", "d-dd"))[0] == 202
    await until(lambda: len(sink.received) >= 2)
    assert [r.path for r in sink.received] == [NATIVE_PATHS["newrelic"], NATIVE_PATHS["datadog"]]  # no OTLP span
    rows = await outbox_rows("sqlite", tmp_path, "")
    assert {k: v[:2] for k, v in rows.items()} == {
        "native:gitea:d-nr:checkout": ("failed", "graphql-errors"),
        "native:gitea:d-dd:checkout": ("failed", "400"),
    }
    assert tg.metric("tracegate_outbox_deliveries_total", result="failed-permanently") == 2
    refused = [r.__dict__.get("reason") for r in caplog.records if r.name == "tracegate.outbox"]
    assert refused == ["graphql-errors", "400"]
    no_secret_in(caplog.text, "\n".join(tg.audit_lines))


# --- tracegate check -------------------------------------------------------------------------


def line_of(text: str, needle: str, after: str = "") -> int:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if after in line) if after else 0
    return next(i for i, line in enumerate(lines) if i >= start and needle in line) + 1


CHECKED = """\
issuers:
  gitlab: {issuer: https://gitlab.example.com, audiences: [tracegate]}
service_accounts:
  splunk-acct:
    backend: splunk
    realm: us1
    access_token: {env: SPLUNK}
  ls-acct:
    access_token: {env: LS}
  hny-acct:
    backend: honeycomb
    access_token: {env: HNY}
  grafana-acct:
    backend: grafana-cloud
    region: prod-eu-west-2
    instance_id: 1
    access_token: {env: GC}
    marker_token: {env: GCM}
  ok-acct:
    backend: datadog
    site: datadoghq.eu
    access_token: {env: DD}
webhooks:
  - name: to-splunk
    source: gitea
    repository: a/splunk
    secret: [{env: H}]
    service_account: splunk-acct
    services: [s]
    markers: [otlp, native]
  - name: to-lightstep
    source: gitea
    repository: a/ls
    secret: [{env: H}]
    service_account: ls-acct
    services: [s]
    markers: [native]
  - name: to-honeycomb
    source: gitea
    repository: a/hny
    secret: [{env: H}]
    service_account: hny-acct
    services: [s]
    markers: [native]
  - name: to-grafana
    source: gitea
    repository: a/grafana
    secret: [{env: H}]
    service_account: grafana-acct
    services: [s]
    markers: [otlp, native]
  - name: typo
    source: gitea
    repository: a/typo
    secret: [{env: H}]
    service_account: ok-acct
    services: [s]
    markers: [otlp, nativ]
  - name: fine
    source: gitea
    repository: a/fine
    secret: [{env: H}]
    service_account: ok-acct
    services: [s]
    markers: [otlp, native]
"""


def test_check_refuses_native_where_it_cannot_work_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(CHECKED)
    assert main(["check", str(tmp_path)], environ={}) == 1
    out = capsys.readouterr().out.splitlines()
    at = f"{path}:"
    native = "native: honeycomb, grafana-cloud, datadog, newrelic, dynatrace"
    assert sorted(out) == sorted(
        [
            f"{at}{line_of(CHECKED, 'markers', 'name: typo')}: webhook 'typo': unknown marker 'nativ'; markers lists "
            "otlp (a span: every backend), native (the backend's deployment API) or both",
            f"{at}{line_of(CHECKED, 'markers', 'name: to-splunk')}: webhook 'to-splunk' asks markers: [native] as "
            f"service account 'splunk-acct', whose backend splunk has no native deployment API; use markers: [otlp] "
            f"({native})",
            f"{at}{line_of(CHECKED, 'markers', 'name: to-lightstep')}: webhook 'to-lightstep' asks markers: [native] "
            f"as service account 'ls-acct', whose backend lightstep has no native deployment API; use markers: "
            f"[otlp] ({native})",
            f"{at}{line_of(CHECKED, 'hny-acct:')}: service account 'hny-acct': Honeycomb Markers needs marker_token: "
            "a configuration key with the Manage Markers permission (webhook 'to-honeycomb' asks markers: [native])",
            f"{at}{line_of(CHECKED, 'grafana-acct:')}: service account 'grafana-acct': Grafana annotations need "
            "stack_url: https://<stack>.grafana.net (webhook 'to-grafana' asks markers: [native])",
        ]
    )


def test_check_reports_native_keys_on_the_account_and_accepts_a_complete_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = """\
service_accounts:
  splunk-acct:
    backend: splunk
    realm: us1
    access_token: {env: SPLUNK}
    marker_token: {env: M}
  hny-acct:
    backend: honeycomb
    access_token: {env: HNY}
    marker_token: inline-marker-secret-123
webhooks:
  - name: ci-only
    source: gitlab
    project_id: 1
    secret: [{env: H}]
    events: [pipeline]
    service_account: hny-acct
    markers: [native]
"""
    (tmp_path / "p.yaml").write_text(wrong)
    assert main(["check", str(tmp_path)], environ={}) == 1
    out = capsys.readouterr().out
    where = f"{tmp_path / 'p.yaml'}:"
    assert f"{where}6: service account 'splunk-acct'.marker_token is not a key of backend splunk; its keys: none" in out
    assert (
        f"{where}10: service account 'hny-acct'.marker_token is written inline; secrets are references: "
        "{env: NAME} or {file: /path}" in out
    )
    assert f"{where}18: webhook 'ci-only': markers is for push/tag/release events; it lists none" in out
    assert "inline-marker-secret-123" not in out
    complete = tmp_path / "ok"
    complete.mkdir()
    (complete / "p.yaml").write_text(
        "issuers:\n  gitlab: {issuer: https://gitlab.example.com, audiences: [tracegate]}\n"
        + native_policy("https://x.example", honeycomb="hny", grafana="grafana")
    )
    assert main(["check", str(complete)], environ={}) == 0
