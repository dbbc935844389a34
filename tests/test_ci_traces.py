"""CI pipelines as traces: GitLab pipeline/job hooks and Gitea Actions runs become one trace
per run at the upstream, each span once, parented and timed as the forge said; a job's own
span nests under its job span via /v1/traceparent. Real sockets, a real sink, the real
OpenTelemetry SDK as the job's client."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry import trace as otel_trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy.ci.door import OUTBOX
from proxy.dev.standins import Sink, StandInIssuer
from tests import ci_payloads as c
from tests import gitea_payloads as g
from tests.conftest import PAYMENTS_KEY, Tracegate, assert_no_secrets, environ, policy_yaml

GITLAB_OLD, GITLAB_NEW, GITLAB_DOCS, GITEA = "gl-hook-old-1", "gl-hook-new-2", "gl-hook-docs-3", "gitea-ci-hook-4"

CI_WEBHOOKS = """
webhooks:
  - name: payments-api-ci
    source: gitlab
    project_id: 4242
    secret: [{env: GITLAB_HOOK_OLD}, {env: GITLAB_HOOK_NEW}]
    events: [pipeline, job]
    service_account: payments-ci
    service_name: ci/payments-api
  - name: docs-ci
    source: gitlab
    repository: "docs/*"
    secret: [{env: GITLAB_HOOK_DOCS}]
    service_account: docs-ci
  - name: pipelines-only
    source: gitlab
    project_id: [5252, 5253]
    secret: [{env: GITLAB_HOOK_OLD}]
    events: [pipeline]
    service_account: payments-ci
  - name: payments-actions
    source: gitea
    repository: payments/api
    secret: [{env: GITEA_CI_HOOK}]
    events: [workflow_run, workflow_job]
    service_account: payments-ci
    service_name: ci/payments-api
"""

EXTRA = """
service_accounts:
  metrics-only:
    access_token: {env: LS_TOKEN_PAYMENTS}
    signals: [metrics]
rules:
  - name: metrics-project
    issuer: gitlab
    when: {project_path: "metrics/app"}
    service_account: metrics-only
"""


def ci_env() -> dict[str, str]:
    return {
        **environ(),
        "GITLAB_HOOK_OLD": GITLAB_OLD,
        "GITLAB_HOOK_NEW": GITLAB_NEW,
        "GITLAB_HOOK_DOCS": GITLAB_DOCS,
        "GITEA_CI_HOOK": GITEA,
    }


@pytest.fixture
async def tg(start_tracegate: Any, issuer: StandInIssuer, tmp_path: Path) -> Tracegate:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "20-extra.yaml").write_text(EXTRA)
    tracegate: Tracegate = await start_tracegate(
        policy_yaml(issuer.url, CI_WEBHOOKS), env=ci_env(), outbox_retry_base="0.05", outbox_retry_max="0.3"
    )
    await tracegate.keys_ready()
    return tracegate


async def post_gitlab(
    client: aiohttp.ClientSession, url: str, event: str, body: dict[str, Any] | bytes, **headers: Any
) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    token = headers.pop("token", GITLAB_OLD)
    sent = c.gitlab_headers(event, token, **headers)
    async with client.post(url + "/webhooks/gitlab", data=data, headers=sent) as resp:
        return resp.status, await resp.json()


def sink_spans(sink: Sink) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(resource attributes, span) of every OTLP/JSON span the sink received."""
    out = []
    for received in sink.received:
        if received.headers.get("Content-Type") != "application/json":
            continue
        for rs in json.loads(received.body)["resourceSpans"]:
            resource = {a["key"]: a["value"]["stringValue"] for a in rs["resource"]["attributes"]}
            for ss in rs["scopeSpans"]:
                out.extend((resource, span) for span in ss["spans"])
    return out


def attrs(span: dict[str, Any]) -> dict[str, Any]:
    return {a["key"]: next(iter(a["value"].values())) for a in span["attributes"]}


async def settle(sink: Sink, spans: int, timeout: float = 15.0) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    deadline = time.monotonic() + timeout
    while len(sink_spans(sink)) < spans and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.4)  # and nothing more arrives after
    return sink_spans(sink)


def gitlab_deliveries(instance: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Every hook GitLab sends for pipeline 99001: each job through created → pending →
    running → final, the pipeline running then failed. (event, body, headers)."""
    out: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for job_id, *_rest in c.JOBS:
        final = next(j[3] for j in c.JOBS if j[0] == job_id)
        for status in ("created", "pending", "running", final):
            out.append(("Job Hook", c.gitlab_job(job_id, status), {"instance": instance}))
    out.append(("Pipeline Hook", c.gitlab_pipeline("running"), {"instance": instance}))
    out.append(("Pipeline Hook", c.gitlab_pipeline("failed"), {"instance": instance}))
    return out


async def test_gitlab_pipeline_out_of_order_with_retries_is_one_trace_each_span_once(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    instance = "https://gitlab.example.com"
    deliveries = gitlab_deliveries(instance)
    random.Random(11).shuffle(deliveries)
    # GitLab retries: the final pipeline hook and two final job hooks again, same UUID.
    retried = [
        d
        for d in deliveries
        if d[1].get("build_status") in ("failed", "success") or d[1].get("object_kind") == "pipeline"
    ]
    statuses = []
    for event, body, headers in deliveries:
        key = f"uuid-{id(body)}"
        status, answer = await post_gitlab(client, tg.url, event, body, uuid_=key, **headers)
        statuses.append((status, answer["reason"]))
        if (event, body, headers) in retried[:3]:
            status, answer = await post_gitlab(client, tg.url, event, body, uuid_=key, **headers)
            assert (status, answer["accepted"], answer["reason"]) == (202, False, "duplicate-delivery")
    assert {s for s, _ in statuses} == {202}
    assert sorted(r for _, r in statuses).count("stored") == 5
    assert sorted(r for _, r in statuses).count("not-final") == 3 * 4 + 1
    # Two racing deliveries of the same final event (new UUIDs, as from two GitLab workers).
    race = await asyncio.gather(
        *(post_gitlab(client, tg.url, "Job Hook", c.gitlab_job(880012), instance=instance) for _ in range(4))
    )
    assert [s for s, _ in race] == [202] * 4 and all(a["reason"] == "duplicate-delivery" for _, a in race)

    got = await settle(sink, 5)
    assert len(got) == 5, [s["name"] for _, s in got]
    assert {r["service.name"] for r, _ in got} == {"ci/payments-api"}
    assert all(r.headers["lightstep-access-token"] == PAYMENTS_KEY for r in sink.received)
    spans = {s["spanId"]: s for _, s in got}
    assert len(spans) == 5
    [root] = [s for s in spans.values() if "parentSpanId" not in s]
    assert {s["traceId"] for s in spans.values()} == {root["traceId"]}
    assert all(s["parentSpanId"] == root["spanId"] for s in spans.values() if s is not root)
    # The root: created → finished as the pipeline hook wrote them, failed.
    assert (int(root["startTimeUnixNano"]), int(root["endTimeUnixNano"])) == (
        c.ns(c.PIPELINE_CREATED),
        c.ns(c.PIPELINE_FINISHED),
    )
    assert root["status"]["code"] == 2 and "lint: script_failure" in root["status"]["message"]
    assert root["name"] == "pipeline Build and test"
    root_attrs = attrs(root)
    assert root_attrs["cicd.pipeline.result"] == "failure"
    assert root_attrs["cicd.pipeline.run.id"] == str(c.PIPELINE_ID)
    assert root_attrs["cicd.pipeline.run.url.full"] == "https://gitlab.example.com/payments/api/-/pipelines/99001"
    assert root_attrs["vcs.ref.head.name"] == "main"
    # One span per job attempt, times to the millisecond the job hooks gave.
    by_job = {attrs(s)["cicd.pipeline.task.run.id"]: s for s in spans.values() if s is not root}
    assert set(by_job) == {str(j[0]) for j in c.JOBS}
    for job_id, name, stage, final, created, started, finished, failure in c.JOBS:
        span = by_job[str(job_id)]
        a = attrs(span)
        assert (int(span["startTimeUnixNano"]), int(span["endTimeUnixNano"])) == (c.ns(started), c.ns(finished))
        assert span["events"][0]["name"] == "started"
        assert int(span["events"][0]["timeUnixNano"]) == c.ns(started)
        assert a["tracegate.cicd.queued_seconds"] == pytest.approx((c.ns(started) - c.ns(created)) / 1e9)
        assert (a["cicd.pipeline.task.name"], a["tracegate.cicd.stage"]) == (name, stage)
        assert a["cicd.worker.name"] == "docker-runner-2" and a["cicd.worker.id"] == "31"
        assert a["tracegate.actor.login"] == "alice"
        assert a["vcs.ref.head.revision"] == "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"
        if final == "failed":
            assert span["status"] == {"code": 2, "message": failure}
            assert a["cicd.pipeline.task.run.result"] == "failure"
        else:
            assert span["status"] == {"code": 1}
            assert a["cicd.pipeline.task.run.result"] == "success"
    # A redelivery after everything went out sends nothing more.
    await post_gitlab(client, tg.url, "Pipeline Hook", c.gitlab_pipeline("failed"), instance=instance)
    assert len(await settle(sink, 6, timeout=0.5)) == 5


async def test_gitlab_token_and_project_refusals_store_nothing(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    url, instance = tg.url, "https://gitlab.example.com"
    job = c.gitlab_job(880010)
    assert (await post_gitlab(client, url, "Job Hook", job, token=None, instance=instance))[0] == 401
    assert (await post_gitlab(client, url, "Job Hook", job, token="", instance=instance))[0] == 401
    status, answer = await post_gitlab(client, url, "Job Hook", job, token="wrong", instance=instance)
    assert (status, answer["reason"]) == (401, "bad-token")
    status, answer = await post_gitlab(client, url, "Job Hook", job, token=GITLAB_DOCS, instance=instance)
    assert (status, answer["reason"]) == (401, "bad-token")  # another entry's secret
    stranger = c.gitlab_job(880010, project_id=5151)
    stranger["project"]["path_with_namespace"] = "other/app"
    status, answer = await post_gitlab(client, url, "Job Hook", stranger, instance=instance)
    assert (status, answer["reason"]) == (401, "bad-token")  # as a wrong token: no oracle
    assert tg.audit()[-1]["reason"] == "unknown-project"
    status, answer = await post_gitlab(client, url, "Job Hook", b"[1, 2]", instance=instance)
    assert (status, answer["reason"]) == (400, "bad-json")
    nan = json.dumps({**job, "build_queued_duration": "@"}).replace('"@"', "NaN").encode()
    assert b"NaN" in nan
    status, answer = await post_gitlab(client, url, "Job Hook", nan, instance=instance)
    assert (status, answer["reason"]) == (400, "bad-json")  # not JSON (RFC 8259), though Python parses it
    status, answer = await post_gitlab(client, url, "Push Hook", job, instance=instance)
    assert (status, answer["accepted"], answer["reason"]) == (202, False, "event-not-listed")
    await asyncio.sleep(0.3)
    assert sink.received == []
    assert (await tg.runners[0].app[OUTBOX].stats())["states"] == {}
    # Rotation: the new secret works as well as the old one; a project matched by path glob.
    assert (await post_gitlab(client, url, "Job Hook", job, token=GITLAB_NEW, instance=instance))[1]["accepted"]
    docs = c.gitlab_job(880012, project_id=777)
    docs["project"]["path_with_namespace"] = "docs/site"
    status, answer = await post_gitlab(client, url, "Job Hook", docs, token=GITLAB_DOCS, instance=instance)
    assert (status, answer["accepted"]) == (202, True)
    got = await settle(sink, 2)
    assert sorted(r["service.name"] for r, _ in got) == ["ci/docs-ci", "ci/payments-api"]
    audit = json.dumps(tg.audit())
    assert_no_secrets(audit, GITLAB_OLD, GITLAB_NEW, GITLAB_DOCS)
    assert "wrong" not in audit


async def test_a_jobs_traceparent_is_the_parent_of_its_job_span_and_its_own_spans_nest_there(
    tg: Tracegate, sink: Sink, issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    token = issuer.mint(project_id="4242", pipeline_id="99001", job_id="880013")
    auth = {"Authorization": f"Bearer {token}"}
    async with client.get(tg.url + "/v1/traceparent", headers=auth) as resp:
        assert resp.status == 200
        parent = (await resp.text()).strip()
    async with client.get(tg.url + "/v1/traceparent?format=resource", headers=auth) as resp:
        resource_text = (await resp.text()).strip()
    assert "cicd.pipeline.task.run.id=880013" in resource_text.split(",")
    assert "cicd.pipeline.run.id=99001" in resource_text.split(",")
    # The webhook side: GitLab names the instance the token's issuer names (in its header
    # and in its URLs alike).
    job = c.gitlab_job(880013)
    job["project"]["web_url"] = job["repository"]["homepage"] = f"{issuer.url}/payments/api"
    status, _ = await post_gitlab(client, tg.url, "Job Hook", job, instance=issuer.url)
    assert status == 202
    [(_, job_span)] = await settle(sink, 1)
    assert "880013" in attrs(job_span)["cicd.pipeline.task.run.url.full"]
    assert parent == f"00-{job_span['traceId']}-{job_span['spanId']}-01"

    # The job's own test span, through tracegate with the same token, nests under it.
    carrier = TraceContextTextMapPropagator().extract({"traceparent": parent})
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": "payments-tests", **dict(kv.split("=", 1) for kv in resource_text.split(","))}
        )
    )
    exporter = OTLPSpanExporter(endpoint=tg.url + "/v1/traces", headers=auth)
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    def run_the_tests() -> None:  # the SDK exports synchronously: not on the event loop
        with provider.get_tracer("tests").start_as_current_span("test_invoice_rounding", context=carrier):
            pass
        provider.shutdown()

    await asyncio.to_thread(run_the_tests)
    [exported] = [r for r in sink.received if r.headers.get("Content-Type") == "application/x-protobuf"]
    request = ExportTraceServiceRequest.FromString(exported.body)
    [own] = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert own.trace_id.hex() == job_span["traceId"]
    assert own.parent_span_id.hex() == job_span["spanId"]
    assert otel_trace.format_trace_id(int(own.trace_id.hex(), 16)) == parent.split("-")[1]


async def test_traceparent_refusals(tg: Tracegate, issuer: StandInIssuer, client: aiohttp.ClientSession) -> None:
    async with client.get(tg.url + "/v1/traceparent") as resp:
        assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    metrics_only = issuer.mint(project_path="metrics/app")  # its account may not send traces
    async with client.get(tg.url + "/v1/traceparent", headers={"Authorization": f"Bearer {metrics_only}"}) as resp:
        assert resp.status == 403
    fork = issuer.mint(project_path="payments/forks/api")
    async with client.get(tg.url + "/v1/traceparent", headers={"Authorization": f"Bearer {fork}"}) as resp:
        assert resp.status == 403
    no_job = issuer.mint(job_id=None)
    async with client.get(tg.url + "/v1/traceparent", headers={"Authorization": f"Bearer {no_job}"}) as resp:
        assert resp.status == 400
    good = issuer.mint()
    async with client.get(tg.url + "/v1/traceparent?format=yaml", headers={"Authorization": f"Bearer {good}"}) as resp:
        assert resp.status == 400
    async with client.get(tg.url + "/v1/traceparent?format=json", headers={"Authorization": f"Bearer {good}"}) as resp:
        body = await resp.json()
        assert body["traceparent"].startswith("00-") and body["traceparent"].endswith("-01")
    # A fork's merge-request pipeline: project_id names the fork, job_project_id where it ran.
    fork_mr = issuer.mint(project_id="9999", job_project_id="4242", pipeline_id="99001", job_id="880013")
    same = issuer.mint(project_id="4242", pipeline_id="99001", job_id="880013")
    answers = []
    for token in (fork_mr, same):
        async with client.get(tg.url + "/v1/traceparent", headers={"Authorization": f"Bearer {token}"}) as resp:
            answers.append(await resp.text())
    assert answers[0] == answers[1]
    decisions = [(a["event"], a["decision"], a["reason"]) for a in tg.audit() if a["event"] == "traceparent"]
    assert ("traceparent", "refused", "missing-token") in decisions
    assert sum(1 for d in decisions if d[1] == "denied") == 2
    assert ("traceparent", "allowed", "traceparent") in decisions


async def test_upstream_down_then_back_each_span_once_gitlab_and_gitea(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    port = sink.port
    await sink.stop()
    instance = "https://gitlab.example.com"
    for event, body, headers in gitlab_deliveries(instance):
        status, _ = await post_gitlab(client, tg.url, event, body, **headers)
        assert status == 202
    for event, payload in (("workflow_job", c.gitea_job()), ("workflow_run", c.gitea_run())):
        assert await post_gitea(client, tg.url, event, payload) == (202, "stored")
    await asyncio.sleep(1.0)  # several failed attempts
    await sink.start(port)
    got = await settle(sink, 7)
    assert sorted(attrs(s).get("cicd.pipeline.task.run.id", "root") for _, s in got) == [
        "1301",
        "880010",
        "880011",
        "880012",
        "880013",
        "root",
        "root",
    ]
    assert len({s["traceId"] for _, s in got}) == 2  # one GitLab pipeline, one Gitea run


def sign_headers(event: str, body: bytes, delivery: str | None = None) -> dict[str, str]:
    return {**g.gitea_headers(event, body, GITEA, delivery=delivery), "Content-Type": "application/json"}


async def post_gitea(client: aiohttp.ClientSession, url: str, event: str, payload: dict[str, Any]) -> tuple[int, str]:
    body = g.encode(payload)
    async with client.post(url + "/webhooks/gitea", data=body, headers=sign_headers(event, body)) as resp:
        return resp.status, (await resp.json())["reason"]


async def test_gitea_actions_run_and_job_attempts_become_one_trace(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    url = tg.url
    sends = [
        ("workflow_job", c.gitea_job("completed", attempt=2)),  # a job before its run, re-run first
        ("workflow_job", c.gitea_job("queued")),
        ("workflow_run", c.gitea_run("in_progress")),
        ("workflow_job", c.gitea_job("in_progress")),
        ("workflow_job", c.gitea_job("completed", attempt=1)),
        ("workflow_run", c.gitea_run()),
        ("workflow_job", c.gitea_job("completed", attempt=1)),  # redelivered: a new X-Gitea-Delivery
        ("workflow_run", c.gitea_run()),
    ]
    results = [await post_gitea(client, url, event, payload) for event, payload in sends]
    assert results == [
        (202, "stored"),
        (202, "not-final"),
        (202, "not-final"),
        (202, "not-final"),
        (202, "stored"),
        (202, "stored"),
        (202, "duplicate-delivery"),
        (202, "duplicate-delivery"),
    ]
    body = g.encode(c.gitea_run())
    bad = {**sign_headers("workflow_run", body), "X-Gitea-Signature": "0" * 64, "X-Hub-Signature-256": "sha256=00"}
    async with client.post(url + "/webhooks/gitea", data=body, headers=bad) as resp:
        assert resp.status == 401
    got = await settle(sink, 3)
    assert len(got) == 3
    spans = [s for _, s in got]
    [root] = [s for s in spans if "parentSpanId" not in s]
    jobs = sorted((s for s in spans if s is not root), key=lambda s: attrs(s)["tracegate.cicd.run.attempt"])
    assert {s["traceId"] for s in spans} == {root["traceId"]}
    assert [s["parentSpanId"] for s in jobs] == [root["spanId"]] * 2
    assert jobs[0]["spanId"] != jobs[1]["spanId"]
    assert (int(root["startTimeUnixNano"]), int(root["endTimeUnixNano"])) == (
        c.ns("2026-11-21T09:00:00Z"),
        c.ns("2026-11-21T09:10:00Z"),
    )
    assert root["status"] == {"code": 1} and attrs(root)["cicd.pipeline.name"] == "CI"
    first, second = jobs
    assert (int(first["startTimeUnixNano"]), int(first["endTimeUnixNano"])) == (
        c.ns("2026-11-21T09:00:05Z"),
        c.ns("2026-11-21T09:03:55Z"),
    )
    assert first["status"]["code"] == 2 and "Run tests" in first["status"]["message"]
    assert attrs(first)["tracegate.cicd.queued_seconds"] == 5.0
    assert attrs(first)["cicd.worker.name"] == "act-runner-1"
    assert [e["name"] for e in first["events"]] == ["started", "step Set up job", "step Run tests"]  # zero time: none
    assert second["status"] == {"code": 1}
    assert attrs(second)["cicd.pipeline.task.run.result"] == "success"


async def test_sigkill_with_spans_pending_then_restart_delivers_each_once(
    tmp_path: Path, issuer: StandInIssuer, sink: Sink
) -> None:
    import signal

    from tests.test_process import spawn

    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "main.yaml").write_text(policy_yaml(issuer.url, CI_WEBHOOKS))
    env = {
        **ci_env(),
        "TRACEGATE_UPSTREAM_PATH_TRACES": "/v1/traces",
        "TRACEGATE_DATA_DIR": str(tmp_path / "data"),
        "TRACEGATE_OUTBOX_RETRY_BASE_SECONDS": "0.05",
        "TRACEGATE_OUTBOX_RETRY_MAX_SECONDS": "0.2",
        "TRACEGATE_UPSTREAM_TIMEOUT": "2",
    }
    port = sink.port
    await sink.stop()  # Lightstep is down
    process, url, _ = await spawn(policies, env, f"http://127.0.0.1:{port}")
    async with aiohttp.ClientSession() as client:
        for event, body, headers in gitlab_deliveries("https://gitlab.example.com"):
            status, _ = await post_gitlab(client, url, event, body, **headers)
            assert status == 202
        for event, payload in (("workflow_job", c.gitea_job()), ("workflow_run", c.gitea_run())):
            assert await post_gitea(client, url, event, payload) == (202, "stored")
    await asyncio.sleep(0.3)
    process.kill()  # SIGKILL: no cleanup, no flush
    await process.wait()
    assert process.returncode == -signal.SIGKILL
    await sink.start(port)
    process, url, _ = await spawn(policies, env, f"http://127.0.0.1:{port}")
    try:
        got = await settle(sink, 7, timeout=20)
        assert sorted(attrs(s).get("cicd.pipeline.task.run.id", "root") for _, s in got) == [
            "1301",
            "880010",
            "880011",
            "880012",
            "880013",
            "root",
            "root",
        ]
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 15)
    assert process.returncode == 0


async def test_outbox_failure_answers_503_so_the_forge_retries(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    await tg.runners[0].app[OUTBOX].close()  # the disk is gone
    status, answer = await post_gitlab(client, tg.url, "Job Hook", c.gitlab_job(880010), instance="https://g.example")
    assert (status, answer["accepted"], answer["reason"]) == (503, False, "outbox-unavailable")
    assert await post_gitea(client, tg.url, "workflow_job", c.gitea_job()) == (503, "outbox-unavailable")
    await asyncio.sleep(0.2)
    assert sink.received == []


async def test_without_job_events_the_pipeline_hook_gives_the_latest_attempts(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    instance = "https://gitlab.example.com"
    status, answer = await post_gitlab(
        client, tg.url, "Job Hook", c.gitlab_job(880011, project_id=5252), instance=instance
    )
    assert (status, answer["reason"]) == (202, "event-not-listed")
    status, answer = await post_gitlab(
        client, tg.url, "Pipeline Hook", c.gitlab_pipeline(project_id=5252), instance=instance
    )
    assert (status, answer["accepted"], answer["spans"]) == (202, True, 4)
    got = [s for _, s in await settle(sink, 4)]
    [root] = [s for s in got if "parentSpanId" not in s]
    jobs = {attrs(s)["cicd.pipeline.task.run.id"]: s for s in got if s is not root}
    assert set(jobs) == {"880010", "880012", "880013"}  # builds[] has no 880011: only the latest attempts
    assert all(s["parentSpanId"] == root["spanId"] for s in jobs.values())
    assert int(jobs["880010"]["startTimeUnixNano"]) == c.ns("2026-11-21T08:00:04Z")  # pipeline hooks: whole seconds
    assert jobs["880012"]["status"] == {"code": 2, "message": "script_failure"}


INSTANCE = "https://gitlab.example.com"


async def test_an_unknown_project_is_answered_exactly_like_a_wrong_token(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    """A sender without the token cannot learn which projects have an entry (by id or by
    path); the audit line and the metric keep the exact reason."""
    known = c.gitlab_job(880010)  # project 4242: an entry binds it
    by_path = c.gitlab_job(880010, project_id=777)
    by_path["project"]["path_with_namespace"] = "docs/site"  # the docs entry's path glob
    unknown = c.gitlab_job(880010, project_id=5151)
    unknown["project"]["path_with_namespace"] = "other/app"
    no_project = {k: v for k, v in c.gitlab_job(880010).items() if k not in ("project", "project_id")}
    answers = []
    for body in (known, by_path, unknown, no_project):
        sent = c.gitlab_headers("Job Hook", "not-the-token", instance=INSTANCE)
        async with client.post(tg.url + "/webhooks/gitlab", data=json.dumps(body).encode(), headers=sent) as resp:
            answers.append(
                (resp.status, resp.headers["Content-Type"], resp.headers["Content-Length"], await resp.read())
            )
    assert answers[0][0] == 401
    assert answers[1:] == [answers[0]] * 3
    recorded = [a["reason"] for a in tg.audit() if a["event"] == "webhook"]
    assert recorded == ["bad-token", "bad-token", "unknown-project", "unknown-project"]
    assert tg.metric("tracegate_webhooks_total", source="gitlab", decision="refused", reason="unknown-project") == 2
    await asyncio.sleep(0.2)
    assert sink.received == []


async def test_a_final_event_sent_again_with_another_end_time_is_the_same_span(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    """Dedupe is keyed on the span's stable ids and its final state, not on its end time:
    a re-sent job or pipeline hook whose finish moved stores nothing more; a new final state
    of the same span (a skipped job that runs after a retry) is a new event."""
    job = c.gitlab_job(880010)
    assert (await post_gitlab(client, tg.url, "Job Hook", job, instance=INSTANCE))[1]["reason"] == "stored"
    later = c.gitlab_job(880010)
    later["build_finished_at"] = later["build_finished_at_iso"] = "2026-11-21T08:01:31.000Z"
    status, answer = await post_gitlab(client, tg.url, "Job Hook", later, instance=INSTANCE)
    assert (status, answer["reason"]) == (202, "duplicate-delivery")
    pipeline = c.gitlab_pipeline("failed", project_id=5252)
    assert (await post_gitlab(client, tg.url, "Pipeline Hook", pipeline, instance=INSTANCE))[1]["spans"] == 4
    pipeline["object_attributes"]["finished_at"] = "2026-11-21 08:07:00 UTC"
    for build in pipeline["builds"]:
        build["finished_at"] = "2026-11-21 08:07:00 UTC"
    status, answer = await post_gitlab(client, tg.url, "Pipeline Hook", pipeline, instance=INSTANCE)
    assert (status, answer["reason"]) == (202, "duplicate-delivery")
    skipped = c.gitlab_job(880012, "skipped")  # the same job id, later in another final state
    ran = c.gitlab_job(880012)
    assert (await post_gitlab(client, tg.url, "Job Hook", skipped, instance=INSTANCE))[1]["reason"] == "stored"
    assert (await post_gitlab(client, tg.url, "Job Hook", ran, instance=INSTANCE))[1]["reason"] == "stored"
    run = c.gitea_run()
    assert await post_gitea(client, tg.url, "workflow_run", run) == (202, "stored")
    run["workflow_run"]["completed_at"] = "2026-11-21T09:11:00Z"
    assert await post_gitea(client, tg.url, "workflow_run", run) == (202, "duplicate-delivery")
    assert len(await settle(sink, 8)) == 8  # 1 job, 1 root + 3 jobs, 2 states of one job, 1 Gitea root


PINNED = """
webhooks:
  - name: pinned-gitlab
    source: gitlab
    project_id: 4242
    instance: {gitlab}/
    secret: [{{env: GITLAB_HOOK_OLD}}]
    service_account: payments-ci
  - name: pinned-gitea
    source: gitea
    repository: payments/api
    instance: https://Gitea.Example.com:443/
    secret: [{{env: GITEA_CI_HOOK}}]
    events: [workflow_run, workflow_job]
    service_account: payments-ci
"""
EVIL = "https://evil.example"


def no_link_to(spans: list[tuple[dict[str, Any], dict[str, Any]]], host: str) -> bool:
    return not any(host in str(v) for _, s in spans for v in attrs(s).values())


async def test_a_pinned_instance_keys_the_trace_whatever_the_sender_names(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    """instance: pins the forge: X-Gitlab-Instance and the payload's URLs cannot move a
    span into another trace or make it link to another host; the span still joins the
    job's own trace (/v1/traceparent, keyed on the token's iss), and the audit line keeps
    what the sender named."""
    tg = await start_tracegate(policy_yaml(issuer.url, PINNED.format(gitlab=issuer.url)), env=ci_env())
    await tg.keys_ready()
    token = issuer.mint(project_id="4242", pipeline_id="99001", job_id="880013")
    async with client.get(tg.url + "/v1/traceparent", headers={"Authorization": f"Bearer {token}"}) as resp:
        parent = (await resp.text()).strip()
    job = c.gitlab_job(880013)
    job["project"]["web_url"] = job["repository"]["homepage"] = f"{EVIL}/payments/api"
    status, answer = await post_gitlab(client, tg.url, "Job Hook", job, instance=EVIL)
    assert (status, answer["reason"]) == (202, "stored")
    assert tg.audit()[-1]["sender_instance"] == EVIL
    [(_, span)] = await settle(sink, 1)
    assert parent == f"00-{span['traceId']}-{span['spanId']}-01"
    assert no_link_to([({}, span)], "evil")
    # Without X-Gitlab-Instance and without URLs: the pinned instance still keys it.
    bare = c.gitlab_job(880010)
    del bare["project"]["web_url"], bare["repository"]["homepage"]
    headers = {k: v for k, v in c.gitlab_headers("Job Hook", GITLAB_OLD, instance="").items() if v}
    async with client.post(tg.url + "/webhooks/gitlab", data=json.dumps(bare).encode(), headers=headers) as resp:
        assert (resp.status, (await resp.json())["reason"]) == (202, "stored")
    assert tg.audit()[-1]["sender_instance"] is None
    got = await settle(sink, 2)
    assert {s["traceId"] for _, s in got} == {span["traceId"]}


async def test_a_pinned_gitea_instance_keys_the_run_and_drops_foreign_links(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    from proxy.ci.pipeline import trace_id

    tg = await start_tracegate(policy_yaml(issuer.url, PINNED.format(gitlab=issuer.url)), env=ci_env())
    run = c.gitea_run()
    run["repository"]["html_url"] = f"{EVIL}/payments/api"
    run["workflow_run"]["html_url"] = f"{EVIL}/payments/api/actions/runs/512"
    assert await post_gitea(client, tg.url, "workflow_run", run) == (202, "stored")
    assert tg.audit()[-1]["sender_instance"] == EVIL
    job = c.gitea_job()
    del job["repository"]["html_url"]  # pinned: the instance need not come from the payload
    assert await post_gitea(client, tg.url, "workflow_job", job) == (202, "stored")
    got = await settle(sink, 2)
    root = next(s for _, s in got if "parentSpanId" not in s)
    a = attrs(root)
    assert root["traceId"] == trace_id(
        "https://gitea.example.com", a["tracegate.project.id"], a["cicd.pipeline.run.id"]
    )
    assert {s["traceId"] for _, s in got} == {root["traceId"]}
    assert no_link_to(got, "evil")


async def test_unpinned_links_never_name_another_host_than_the_trace_instance(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    pipeline = c.gitlab_pipeline(project_id=5252)
    pipeline["project"]["web_url"] = f"{EVIL}/payments/api"
    pipeline["object_attributes"]["url"] = "https://gitlab.example.com\\@evil.example/-/pipelines/99001"
    status, answer = await post_gitlab(client, tg.url, "Pipeline Hook", pipeline, instance=INSTANCE)
    assert (status, answer["spans"]) == (202, 4)
    got = await settle(sink, 4)
    assert len(got) == 4 and no_link_to(got, "evil")
    assert all("url.full" not in k for _, s in got for k in attrs(s))


# An outside review of these doors (each test failed before its fix).


async def test_an_entry_matched_by_path_cannot_speak_for_a_project_bound_by_id(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    job = c.gitlab_job(880010)  # payments (project 4242, bound by id in payments-api-ci) …
    job["project"]["path_with_namespace"] = "docs/site"  # … claiming a path the docs entry matches
    status, answer = await post_gitlab(client, tg.url, "Job Hook", job, token=GITLAB_DOCS, instance=INSTANCE)
    assert (status, answer["reason"]) == (401, "bad-token")
    await asyncio.sleep(0.3)
    assert sink.received == []


async def test_gitea_actions_html_url_must_name_the_matched_repository(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    run = c.gitea_run()
    run["repository"]["html_url"] = "https://gitlab.example.com/x"
    status, reason = await post_gitea(client, tg.url, "workflow_run", run)
    assert status == 202 and reason.startswith("malformed")
    await asyncio.sleep(0.3)
    assert sink.received == []


@pytest.mark.parametrize(
    "field,value",
    [("build_id", 99_999_999_999_999_999_999), ("build_finished_at", "9999-12-31T23:59:59Z")],
)
async def test_values_past_otlp_ranges_never_reach_an_export(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession, field: str, value: Any
) -> None:
    job = c.gitlab_job(880010)
    job[field] = value
    status, _ = await post_gitlab(client, tg.url, "Job Hook", job, instance=INSTANCE)
    assert status == 202
    await asyncio.sleep(0.5)
    from google.protobuf import json_format

    for received in sink.received:  # whatever was sent is an export the upstream can parse
        json_format.Parse(received.body, ExportTraceServiceRequest())


async def test_a_non_ascii_instance_header_is_no_unhandled_error(tg: Tracegate) -> None:
    body = json.dumps(c.gitlab_job(880010)).encode()
    head = (
        b"POST /webhooks/gitlab HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Gitlab-Event: Job Hook\r\nX-Gitlab-Token: " + GITLAB_OLD.encode() + b"\r\n"
        b"X-Gitlab-Instance: https://gitlab.example.com/\xff\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
    )
    host, port = tg.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + body)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 202"), answer[:200]
    assert b"no-instance-url" in answer  # not a URL: no trace is keyed by it
    assert tg.metric("tracegate_unhandled_errors_total") == 0
