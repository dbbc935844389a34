"""GitHub webhooks, first class: signed ``workflow_run``/``workflow_job`` deliveries become one
trace per run (tracegate's ids, or the OpenTelemetry Collector's), ``push`` and
``deployment_status`` become deployment markers, entries bind ``repository.id``; delivered
out of order and redelivered, through a real tracegate and a real sink. A job's own
``/v1/traceparent`` (and its ``format=env`` carrier) names the span the webhooks drew."""

from __future__ import annotations

import asyncio
import random
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy.dev.standins import Sink, StandInIssuer, github_claims
from tests import github_payloads as gh
from tests.conftest import PAYMENTS_KEY, Tracegate, assert_no_secrets, environ, policy_yaml
from tests.test_ci_traces import attrs, settle
from tests.test_webhooks import arrivals, spans

GH_OLD, GH_NEW, GH_OTEL, GH_ORG = "gh-hook-old-1", "gh-hook-new-2", "gh-hook-otel-3", "gh-hook-org-4"

WEBHOOKS = """
webhooks:
  - name: payments-github
    source: github
    repository_id: 424242
    secret: [{env: GH_HOOK_OLD}, {env: GH_HOOK_NEW}]
    events: [push, deployment_status, workflow_run, workflow_job]
    refs: ["refs/heads/main", "refs/tags/v*"]
    service_account: payments-ci
    services: [payments-api]
    service_name: ci/payments-api
    instance: GITHUB_WEB
  - name: payments-org-by-name
    source: github
    repository: "payments-org/*"
    secret: [{env: GH_HOOK_ORG}]
    events: [push]
    service_account: docs-ci
    services: [docs-site]
  - name: collector-run
    source: github
    repository_id: 614849916
    secret: [{env: GH_HOOK_OTEL}]
    events: [workflow_run, workflow_job]
    service_account: payments-ci
    service_name: ci/otel-collector
    instance: GITHUB_WEB
    trace_ids: otel-collector
"""

GITHUB_ISSUER = """
issuers:
  github:
    issuer: GITHUB_ISSUER
    audiences: [tracegate]
rules:
  - name: github-payments
    issuer: github
    when: {repository_id: [424242, 614849916]}
    service_account: payments-ci
"""


def env() -> dict[str, str]:
    return {**environ(), "GH_HOOK_OLD": GH_OLD, "GH_HOOK_NEW": GH_NEW, "GH_HOOK_OTEL": GH_OTEL, "GH_HOOK_ORG": GH_ORG}


@pytest.fixture
async def github() -> Any:
    server = StandInIssuer()  # GitHub's issuer is an origin; so is the stand-in's
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def tg(start_tracegate: Any, issuer: StandInIssuer, github: StandInIssuer, tmp_path: Path) -> Tracegate:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "20-github.yaml").write_text(GITHUB_ISSUER.replace("GITHUB_ISSUER", github.url))
    # The web origin a GitHub token's issuer names (github.com for GitHub's own issuer).
    policy = policy_yaml(issuer.url, WEBHOOKS.replace("GITHUB_WEB", github.url))
    tracegate: Tracegate = await start_tracegate(policy, env=env(), outbox_retry_base="0.05", outbox_retry_max="0.3")
    await tracegate.keys_ready()
    return tracegate


async def deliver(
    client: aiohttp.ClientSession,
    tg: Tracegate,
    event: str,
    payload: dict[str, Any] | bytes,
    secret: str | None = GH_OLD,
    *,
    delivery: str | None = None,
    form: bool = False,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    body = payload if isinstance(payload, bytes) else (gh.form(payload) if form else gh.encode(payload))
    kind = "application/x-www-form-urlencoded" if form else "application/json"
    sent = {**gh.github_headers(event, body, secret, delivery=delivery, content_type=kind), **(headers or {})}
    async with client.post(tg.url + "/webhooks/github", data=body, headers=sent) as resp:
        return resp.status, await resp.json()


async def test_runs_and_jobs_out_of_order_and_redelivered_are_one_trace_each_span_once(
    tg: Tracegate, github: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    web = github.url
    first, rerun = gh.JOB_ID, gh.RERUN_JOB_ID
    deliveries = [
        ("workflow_run", gh.workflow_run("queued", host=web)),
        ("workflow_run", gh.workflow_run("in_progress", host=web)),
        ("workflow_job", gh.workflow_job("queued", host=web)),
        ("workflow_job", gh.workflow_job("in_progress", host=web)),
        ("workflow_job", gh.workflow_job(host=web)),  # attempt 1 fails
        ("workflow_run", gh.workflow_run(conclusion="failure", host=web)),
        (  # re-run of the failed job: a new job (check run) id, run_attempt 2
            "workflow_job",
            gh.workflow_job(
                job_id=rerun,
                attempt=2,
                conclusion="success",
                host=web,
                times=("2026-11-21T09:20:01Z", "2026-11-21T09:20:04Z", "2026-11-21T09:24:28Z"),
            ),
        ),
        ("workflow_run", gh.workflow_run(conclusion="success", attempt=2, host=web)),
    ]
    random.Random(22).shuffle(deliveries)
    answers = []
    for n, (event, payload) in enumerate(deliveries):
        status, answer = await deliver(client, tg, event, payload, delivery=f"d-{n}")
        answers.append((status, answer["reason"]))
        if payload["action"] == "completed":  # GitHub's redelivery (same id), and a replay (new id)
            assert await deliver(client, tg, event, payload, delivery=f"d-{n}") == (
                202,
                {"accepted": False, "reason": "duplicate-delivery", "duplicate": True},
            )
            assert (await deliver(client, tg, event, payload, GH_NEW))[1]["reason"] == "duplicate-delivery"
    assert sorted(answers) == [(202, "not-final")] * 4 + [(202, "stored")] * 4

    got = await settle(sink, 4)
    assert len(got) == 4, [s["name"] for _, s in got]
    assert {r["service.name"] for r, _ in got} == {"ci/payments-api"}
    assert {r["vcs.provider.name"] for r, _ in got} == {"github"}
    assert all(r.headers["lightstep-access-token"] == PAYMENTS_KEY for r in sink.received)
    roots = [s for _, s in got if "parentSpanId" not in s]
    jobs = {attrs(s)["cicd.pipeline.task.run.id"]: s for _, s in got if "parentSpanId" in s}
    assert len(roots) == 2 and len({s["spanId"] for s in roots}) == 1  # the run re-sent with its new result
    assert {s["traceId"] for _, s in got} == {roots[0]["traceId"]}  # tracegate: one trace per run
    assert {s["parentSpanId"] for s in jobs.values()} == {roots[0]["spanId"]}
    by_result = {attrs(r)["cicd.pipeline.result"]: r for r in roots}
    assert (int(by_result["success"]["startTimeUnixNano"]), int(by_result["success"]["endTimeUnixNano"])) == (
        1795252800 * 10**9,  # run_started_at 2026-11-21T09:20:00Z
        1795253070 * 10**9,  # updated_at 09:24:30Z: GitHub's run has no completed_at
    )
    assert by_result["failure"]["status"]["code"] == 2 and by_result["success"]["status"] == {"code": 1}
    failed, passed = jobs[str(first)], jobs[str(rerun)]
    assert failed["status"]["code"] == 2 and "Run tests" in failed["status"]["message"]
    assert attrs(failed)["tracegate.cicd.queued_seconds"] == 5.0
    assert attrs(failed)["cicd.worker.name"] == "GitHub Actions 320"
    assert attrs(passed)["tracegate.cicd.run.attempt"] == "2"
    assert [e["name"] for e in failed["events"]][:2] == ["started", "step Set up job"]
    assert attrs(failed)["cicd.pipeline.task.run.url.full"] == f"{web}/{gh.REPO}/actions/runs/{gh.RUN_ID}/job/{first}"

    # The re-run job's own spans join its span: its token names the run, attempt and check run.
    token = github.mint(github_claims(github.url, run_id=str(gh.RUN_ID), run_attempt="2", check_run_id=str(rerun)))
    async with client.get(tg.url + "/v1/traceparent", headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
        assert (await resp.text()).strip() == f"00-{passed['traceId']}-{passed['spanId']}-01"


async def test_signatures_rotation_and_unknown_repositories(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    body = gh.encode(gh.push())
    assert (await deliver(client, tg, "push", body, GH_NEW))[0] == 202  # either listed secret verifies
    wrong = await deliver(client, tg, "push", body, "not-the-secret")
    elsewhere = gh.push(repo="elsewhere/app")
    elsewhere["repository"]["id"] = 31337
    unknown = await deliver(client, tg, "push", elsewhere, "not-the-secret")
    known_name_other_id = gh.push(repo="payments-org/api")
    known_name_other_id["repository"]["id"] = 999  # a name re-used by another repository: the id decides
    stranger = await deliver(client, tg, "push", known_name_other_id, GH_OLD)
    assert wrong == unknown == stranger == (401, {"accepted": False, "reason": "bad-signature"})
    headers = {"X-Hub-Signature-256": "", "X-Hub-Signature": "sha1=" + "0" * 40}  # SHA-1 alone is no signature
    assert await deliver(client, tg, "push", body, None, headers=headers) == (
        401,
        {"accepted": False, "reason": "missing-signature"},
    )
    status, answer = await deliver(client, tg, "push", body, headers={"X-GitHub-Delivery": ""})
    assert (status, answer["reason"], answer["header"]) == (400, "missing-header", "X-GitHub-Delivery")
    assert (await deliver(client, tg, "push", b"[1, 2]"))[1]["reason"] == "bad-json"
    # The re-used name matched the org-wide entry by name, whose secret it did not have.
    assert tg.metric("tracegate_webhooks_total", source="github", decision="refused", reason="unknown-repository") == 1
    assert tg.metric("tracegate_webhooks_total", source="github", decision="refused", reason="bad-signature") == 2
    await asyncio.sleep(0.3)
    assert len(sink.received) == 1  # only the first push drew anything
    audit = "\n".join(tg.audit_lines)
    assert_no_secrets(audit, GH_OLD, GH_NEW, GH_OTEL, GH_ORG)


async def test_push_and_deployment_status_draw_markers(
    tg: Tracegate, github: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    web = github.url  # the entry pins it: links on another host are left out
    assert (await deliver(client, tg, "ping", gh.ping()))[1] == {"accepted": False, "reason": "ping"}
    sends = [
        ("push", gh.push(host=web), "p-main", False),
        ("push", gh.push(ref="refs/tags/v1.2.0", host=web), "p-tag", True),  # a form: signed over the raw body
        ("push", gh.push(ref="refs/heads/feature/x", host=web), "p-feature", False),
        ("push", gh.push(after="0" * 40, host=web), "p-delete", False),
        ("deployment_status", gh.deployment_status("in_progress", host=web), "ds-1", False),
        ("deployment_status", gh.deployment_status("success", host=web), "ds-2", False),
        ("deployment_status", gh.deployment_status("success", host=web), "ds-2", False),  # redelivered
        ("deployment_status", gh.deployment_status("success", host=web), "ds-3", False),  # replayed, new id
        ("workflow_job", gh.workflow_job("queued", host=web), "wj", False),
    ]
    results = []
    for event, payload, delivery, form in sends:
        status, answer = await deliver(client, tg, event, payload, delivery=delivery, form=form)
        results.append((status, answer["reason"]))
    assert results == [
        (202, "stored"),
        (202, "stored"),
        (202, "ref-not-listed"),
        (202, "branch-deleted"),
        (202, "deployment-not-successful"),
        (202, "stored"),
        (202, "duplicate-delivery"),
        (202, "duplicate-body"),
        (202, "not-final"),
    ]
    received = await arrivals(sink, 3)
    assert len(received) == 3
    marks = [m for r in received for m in spans(r)]
    by_event = {a["tracegate.delivery_id"]: (res, a) for res, a in marks}
    resource, push = by_event["p-main"]
    assert resource == {"service.name": "payments-api", "service.version": gh.HEAD_SHA}
    assert push["vcs.provider.name"] == "github" and push["vcs.repository.name"] == "api"
    assert push["vcs.owner.name"] == "payments-org" and push["vcs.ref.head.name"] == "main"
    assert push["tracegate.compare_url"] == f"{web}/{gh.REPO}/compare/{gh.BEFORE[:12]}...{gh.HEAD_SHA[:12]}"
    assert push["vcs.repository.url.full"] == f"{web}/{gh.REPO}"
    assert by_event["p-tag"][1]["vcs.ref.head.type"] == "tag"
    resource, deployed = by_event["ds-2"]
    assert resource["service.version"] == gh.DEPLOY_SHA
    assert resource["deployment.environment.name"] == "production"
    assert deployed["tracegate.event"] == "deployment" and deployed["vcs.ref.head.name"] == "main"
    assert deployed["tracegate.deployment.id"] == "1818" and deployed["tracegate.actor.login"] == "deploy-bot"


async def test_an_entry_binding_the_id_is_the_only_one_for_that_repository(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    """The org-wide entry by name (payments-org/*) cannot speak for payments-org/api, which
    another entry binds by id — and a renamed repository stays bound by its id."""
    assert (await deliver(client, tg, "push", gh.push(), GH_ORG))[0] == 401
    renamed = gh.push(repo="payments-org/api-v2")
    renamed["repository"]["id"] = gh.REPO_ID
    assert (await deliver(client, tg, "push", renamed, GH_OLD))[1]["reason"] == "stored"
    other = gh.push(repo="payments-org/site")
    other["repository"]["id"] = 777
    assert (await deliver(client, tg, "push", other, GH_ORG))[1]["reason"] == "stored"
    received = await arrivals(sink, 2)
    assert sorted(s[0]["service.name"] for r in received for s in spans(r)) == ["docs-site", "payments-api"]


# The ids the OpenTelemetry Collector's githubreceiver drew for this run (its golden file
# receiver/githubreceiver/testdata/workflow-job-expected.yaml: run 14460881260, attempt 13).
COLLECTOR_TRACE = "731ec8a47fd7450f753a812a4a8aa5a0"
COLLECTOR_ROOT = "aba151af7cfbcf0f"
# sha256("40685651258-j"), sha256("40685651258-q"), sha256("40685651258-Set up job-s"): hex
# digits 16–32 (newSpanIDFromCheckRun), worked out by hand (tests/test_trace_ids.py checks them).
COLLECTOR_JOB = "2b09b38c69b64a9c"
COLLECTOR_QUEUE = "79ff76cc79430e14"
COLLECTOR_STEP = "d592338e114eb265"


async def test_otel_collector_ids_coincide_with_the_collectors_and_the_jobs_own(
    tg: Tracegate, github: StandInIssuer, sink: Sink, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    job, run = gh.collector_job(), gh.collector_run()
    for payload in (job, run):
        payload["repository"]["html_url"] = f"{github.url}/{gh.COLLECTOR_REPO}"
    assert await deliver(client, tg, "workflow_job", job, GH_OTEL) == (202, {"accepted": True, "reason": "stored"})
    assert (await deliver(client, tg, "workflow_run", run, GH_OTEL))[1]["reason"] == "stored"
    assert (await deliver(client, tg, "workflow_job", job, GH_OTEL))[1]["reason"] == "duplicate-delivery"
    got = await settle(sink, 2 + 1 + 4)  # root, job, queue, four steps
    by_name = {s["name"]: s for _, s in got}
    assert {s["traceId"] for s in by_name.values()} == {COLLECTOR_TRACE}
    assert by_name["workflow CI"]["spanId"] == COLLECTOR_ROOT and "parentSpanId" not in by_name["workflow CI"]
    assert (by_name["job test (1.23)"]["spanId"], by_name["job test (1.23)"]["parentSpanId"]) == (
        COLLECTOR_JOB,
        COLLECTOR_ROOT,
    )
    assert (by_name["queue"]["spanId"], by_name["queue"]["parentSpanId"]) == (COLLECTOR_QUEUE, COLLECTOR_JOB)
    assert (by_name["step Set up job"]["spanId"], by_name["step Set up job"]["parentSpanId"]) == (
        COLLECTOR_STEP,
        COLLECTOR_JOB,
    )
    # The Collector's job span runs from created_at (its queue span from created_at to started_at).
    assert int(by_name["job test (1.23)"]["startTimeUnixNano"]) == 1744837738 * 10**9
    assert int(by_name["queue"]["endTimeUnixNano"]) == 1744837743 * 10**9

    claims = github_claims(
        github.url,
        repository="open-telemetry/open-telemetry-otel-collector",
        repository_id=str(gh.COLLECTOR_REPO_ID),
        run_id=str(gh.COLLECTOR_RUN),
        run_attempt=str(gh.COLLECTOR_ATTEMPT),
        check_run_id=str(gh.COLLECTOR_JOB),
    )
    auth = {"Authorization": f"Bearer {github.mint(claims)}"}

    async def ask(query: str) -> tuple[int, str]:
        async with client.get(tg.url + "/v1/traceparent" + query, headers=auth) as resp:
            return resp.status, await resp.text()

    assert await ask("") == (200, f"00-{COLLECTOR_TRACE}-{COLLECTOR_JOB}-01\n")
    assert await ask("?step=Set%20up%20job") == (200, f"00-{COLLECTOR_TRACE}-{COLLECTOR_STEP}-01\n")
    status, text = await ask("?format=env")
    assert status == 200
    lines = text.splitlines()
    assert lines[:2] == [f"TRACEPARENT=00-{COLLECTOR_TRACE}-{COLLECTOR_JOB}-01", "TRACESTATE="]
    assert lines[2].startswith("OTEL_RESOURCE_ATTRIBUTES=cicd.pipeline.run.id=14460881260,") and len(lines) == 3
    # Ready for `set -a; eval …` (and `>> $GITHUB_ENV`, which takes the same NAME=value lines).
    carrier = tmp_path / "tracegate.env"
    carrier.write_text(text)
    shown = subprocess.run(
        ["sh", "-c", 'set -a; eval "$(cat "$1")"; set +a; env', "sh", str(carrier)],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "TRACESTATE": "stale=1"},
    ).stdout.splitlines()
    assert f"TRACEPARENT=00-{COLLECTOR_TRACE}-{COLLECTOR_JOB}-01" in shown
    assert "TRACESTATE=" in shown and lines[2] in shown
    exported = dict(line.split("=", 1) for line in shown if line.startswith(("TRACEPARENT=", "TRACESTATE=")))
    context = TraceContextTextMapPropagator().extract({k.lower(): v for k, v in exported.items()})
    from opentelemetry import trace as otel_trace

    parent = otel_trace.get_current_span(context).get_span_context()
    assert (f"{parent.trace_id:032x}", f"{parent.span_id:016x}") == (COLLECTOR_TRACE, COLLECTOR_JOB)

    # A tracegate-ids repository has no step spans to parent on.
    plain = github.mint(github_claims(github.url, run_id=str(gh.RUN_ID)))
    async with client.get(
        tg.url + "/v1/traceparent?step=Run%20tests", headers={"Authorization": f"Bearer {plain}"}
    ) as resp:
        assert resp.status == 400
    decisions = [a["reason"] for a in tg.audit() if a["event"] == "traceparent"]
    assert "steps-are-not-spans" in decisions
