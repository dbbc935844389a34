"""Delivery metrics (issue 22, item 6): the CI/CD semantic-convention metrics and the four DORA
keys, as OTLP metrics through the outbox, exactly once whatever the order, the duplicates and
the replica; attributes bounded to service, environment and result.

The DORA scenario is a week of one repository on GitHub — pushes, production and staging
deployments, one failed deployment and its fix — replayed in shuffled order with every event
delivered twice; its values at the sink are computed by hand below (:data:`EXPECTED`), not by
tracegate's code. It runs on SQLite in one process, and on one PostgreSQL outbox shared by
two tracegate processes that each get every event at the same moment.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from proxy.ci import dora, dora_facts
from proxy.ci.dora import Commit, Deployment, Push
from proxy.ci.dora_settle import GRACE, Settler, settled_points
from proxy.ci.metric_points import DORA_BOUNDS, counter, export, observation
from proxy.ci.otlp_proto import metrics_to_protobuf
from proxy.ci.outbox import Outbox
from proxy.ci.outbox_pg import PostgresOutbox
from proxy.ci.store import OutboxStore
from proxy.dev.standins import Sink, StandInIssuer
from proxy.policy import load_policy
from proxy.policy.matchers import Matcher
from proxy.policy.model import DoraSettings, WebhookSource, Where
from proxy.secrets import Secret
from tests import ci_payloads as c
from tests import github_payloads as gh
from tests.conftest import Tracegate, environ, policy_yaml
from tests.pg_server import PgServer, postgres  # noqa: F401 - the session fixture
from tests.test_policy import ENV, HEAD, problems, write
from tests.test_process import spawn

GH_SECRET, GL_SECRET = "gh-metrics-hook-1", "gl-metrics-hook-2"

WEBHOOKS = """
webhooks:
  - name: payments-github
    source: github
    repository_id: 424242
    secret: [{env: GH_METRICS_HOOK}]
    events: [push, deployment_status, workflow_run]
    refs: ["refs/heads/main"]
    service_account: payments-ci
    services: [payments-api]
    service_name: ci/payments-api
    instance: https://github.com
    metrics: [cicd, dora]
    dora: {failure_window: 24h, settle: SETTLE}
  - name: payments-gitlab
    source: gitlab
    project_id: 4242
    secret: [{env: GL_METRICS_HOOK}]
    events: [pipeline]
    service_account: payments-ci
    service_name: ci/payments-gitlab
    metrics: [cicd, dora]
    dora: {environment: production, settle: 1s}
"""


def hook_env() -> dict[str, str]:
    return {**environ(), "GH_METRICS_HOOK": GH_SECRET, "GL_METRICS_HOOK": GL_SECRET}


def policy(issuer_url: str, settle: str = "1s") -> str:
    return policy_yaml(issuer_url, WEBHOOKS.replace("SETTLE", settle))


# --- the week ----------------------------------------------------------------------------

#: Monday 00:00 UTC of a week that ended days ago: every failure window (24 h) has closed.
MONDAY = (datetime.now(UTC) - timedelta(days=14)).replace(hour=0, minute=0, second=0, microsecond=0)
MONDAY -= timedelta(days=MONDAY.weekday())
HOUR = 3600


def at(day: int, hour: float) -> datetime:
    return MONDAY + timedelta(days=day, hours=hour)


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def sha(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()  # a commit id, not security


def push(before: str, commits: list[tuple[str, datetime, str]], pushed: datetime) -> dict[str, Any]:
    """A push of ``commits`` (name, author time, message) onto ``before`` (a commit name)."""
    body = gh.push(after=sha(commits[-1][0]))
    body["before"] = sha(before)
    listed = []
    for name, when, message in commits:
        listed.append({**body["head_commit"], "id": sha(name), "timestamp": iso(when), "message": message})
    body["commits"], body["head_commit"] = listed, listed[-1]
    body["repository"]["pushed_at"] = int(pushed.timestamp())
    return body


def deployment(id_: int, commit: str, environment: str, state: str, when: datetime) -> dict[str, Any]:
    body = gh.deployment_status(state, environment)
    body["deployment"].update(id=id_, sha=sha(commit), created_at=iso(when - timedelta(minutes=5)))
    body["deployment_status"].update(id=id_ * 10, created_at=iso(when), updated_at=iso(when))
    return body


def week() -> list[tuple[str, dict[str, Any]]]:
    """The repository's week (event, payload), in the order it happened."""
    return [
        ("push", push("c0", [("c1", at(0, 9), "Add refunds"), ("c2", at(0, 10), "Refund API")], at(0, 10.1))),
        ("deployment_status", deployment(1, "c2", "production", "success", at(0, 14))),
        ("push", push("c2", [("c3", at(1, 11), "Partial refunds")], at(1, 11.1))),
        ("deployment_status", deployment(2, "c3", "staging", "success", at(1, 15))),
        ("deployment_status", deployment(3, "c3", "production", "success", at(1, 16))),
        ("push", push("c3", [("c4", at(2, 10), "Refund currency")], at(2, 10.2))),
        ("deployment_status", deployment(4, "c4", "production", "failure", at(2, 12))),
        ("push", push("c4", [("c5", at(2, 12.5), "Fix refund currency")], at(2, 12.6))),
        ("deployment_status", deployment(5, "c5", "production", "success", at(2, 13))),
        ("push", push("c5", [("c6", at(3, 9), "Refund audit log")], at(3, 9.5))),
        ("deployment_status", deployment(6, "c6", "production", "success", at(4, 10))),
    ]


#: The week's values, worked out by hand from the definitions (docs/delivery-metrics.md):
#: lead time = deployment − first commit of what it brings; production D1 (Mon 14:00, c1 09:00)
#: 5 h, D3 (Tue 16:00, c3 11:00) 5 h, D5 (Wed 13:00, c4 10:00 — the failed D4 brought it first)
#: 3 h, D6 (Fri 10:00, c6 Thu 09:00) 25 h; staging's first deployment (Tue 15:00) brings c1–c3,
#: 30 h. D3 is a failed change (the next deployment, D4, failed 20 h later); D4 → D5 restored
#: in 1 h. D1's window closed before D3 (26 h), D5's before D6 (45 h).
EXPECTED: dict[tuple[str, str, tuple[tuple[str, str], ...]], Any] = {
    ("tracegate.dora.deployments", "payments-api", (("production", "success"),)): 4,
    ("tracegate.dora.deployments", "payments-api", (("production", "failure"),)): 1,
    ("tracegate.dora.deployments", "payments-api", (("staging", "success"),)): 1,
    ("tracegate.dora.change.lead_time", "payments-api", (("production", ""),)): [3 * HOUR, 5 * HOUR, 5 * HOUR,
                                                                                 25 * HOUR],
    ("tracegate.dora.change.lead_time", "payments-api", (("staging", ""),)): [30 * HOUR],
    ("tracegate.dora.time_to_restore", "payments-api", (("production", ""),)): [1 * HOUR],
    ("tracegate.dora.changes", "payments-api", (("production", "success"),)): 3,
    ("tracegate.dora.changes", "payments-api", (("production", "failure"),)): 1,
    ("tracegate.dora.changes", "payments-api", (("staging", "success"),)): 1,
}  # fmt: skip


# --- reading the sink --------------------------------------------------------------------


def metric_bodies(sinks: list[Sink]) -> list[dict[str, Any]]:
    return [json.loads(r.body) for s in sinks for r in s.received if r.path == "/v1/metrics"]


def _attrs(node: dict[str, Any]) -> dict[str, str]:
    return {a["key"]: next(iter(a["value"].values())) for a in node.get("attributes", [])}


def series(bodies: list[dict[str, Any]]) -> list[tuple[str, dict[str, str], dict[str, str], dict[str, Any]]]:
    """(metric, resource attributes, point attributes, point) of every data point received."""
    out = []
    for body in bodies:
        for rm in body["resourceMetrics"]:
            resource = _attrs(rm["resource"])
            for sm in rm["scopeMetrics"]:
                for metric in sm["metrics"]:
                    kind = "sum" if "sum" in metric else "histogram"
                    assert metric[kind]["aggregationTemporality"] == 1  # delta: one observation each
                    for point in metric[kind]["dataPoints"]:
                        out.append((metric["name"], resource, _attrs(point), point))
    return out


def dora_totals(sinks: list[Sink]) -> dict[tuple[str, str, tuple[tuple[str, str], ...]], Any]:
    """Counter sums, and each histogram's observed values (sorted), per service, environment and result."""
    totals: dict[tuple[str, str, tuple[tuple[str, str], ...]], Any] = {}
    for name, resource, attributes, point in series(metric_bodies(sinks)):
        if not name.startswith("tracegate.dora."):
            continue
        env, result = attributes["deployment.environment.name"], attributes.get("tracegate.dora.result", "")
        key = (name, resource["service.name"], ((env, result),))
        if "asInt" in point:
            totals[key] = totals.get(key, 0) + int(point["asInt"])
        else:
            assert point["count"] == "1" and sum(int(n) for n in point["bucketCounts"]) == 1
            totals[key] = sorted([*totals.get(key, []), point["sum"]])
    return totals


async def until_present(sinks: list[Sink], key: Any, timeout: float = 15.0) -> dict[Any, Any]:
    deadline = time.monotonic() + timeout
    while key not in dora_totals(sinks) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    return dora_totals(sinks)


async def wait_for(sinks: list[Sink], expected: dict[Any, Any], timeout: float = 20.0) -> dict[Any, Any]:
    deadline = time.monotonic() + timeout
    while dora_totals(sinks) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)  # and nothing more arrives after: no point twice
    return dora_totals(sinks)


_HEX_RUN = re.compile(r"[0-9a-f]{7,}")
ALLOWED_ATTRIBUTES = {
    "tracegate.dora": {"deployment.environment.name", "tracegate.dora.result"},
    "cicd.pipeline": {"cicd.pipeline.name", "cicd.pipeline.run.state", "cicd.pipeline.result", "error.type"},
}


def assert_bounded(bodies: list[dict[str, Any]], *forbidden: str) -> None:
    """Service, environment, result (and the CI/CD conventions' pipeline name, state and error
    type) only: no SHA, run id, deployment id or delivery id anywhere in a point or resource."""
    for name, resource, attributes, _point in series(bodies):
        assert set(resource) == {"service.name"}, resource
        family = next(f for f in ALLOWED_ATTRIBUTES if name.startswith(f))
        assert set(attributes) <= ALLOWED_ATTRIBUTES[family], (name, attributes)
        for value in [*attributes.values(), *resource.values()]:
            assert not _HEX_RUN.search(value) and not any(f in value for f in forbidden), (name, value)


# --- delivering --------------------------------------------------------------------------


async def deliver(
    client: aiohttp.ClientSession, url: str, event: str, payload: dict[str, Any], delivery: str | None = None
) -> tuple[int, dict[str, Any]]:
    body = gh.encode(payload)
    headers = gh.github_headers(event, body, GH_SECRET, delivery=delivery)
    async with client.post(url + "/webhooks/github", data=body, headers=headers) as resp:
        return resp.status, await resp.json()


def replay(seed: int) -> list[tuple[str, dict[str, Any], str]]:
    """Every event of the week twice — a redelivery (the same delivery id) or a new delivery
    of the same content — in shuffled order."""
    events = [(event, payload, f"d-{n}") for n, (event, payload) in enumerate(week())]
    again = [(e, p, d if n % 2 else f"{d}-new") for n, (e, p, d) in enumerate(events)]
    shuffled = events + again
    random.Random(seed).shuffle(shuffled)
    return shuffled


@pytest.fixture
async def tg(start_tracegate: Any, issuer: StandInIssuer) -> Tracegate:
    tracegate: Tracegate = await start_tracegate(
        policy(issuer.url), env=hook_env(), outbox_retry_base="0.05", outbox_retry_max="0.3"
    )
    await tracegate.keys_ready()
    return tracegate


async def test_a_week_replayed_shuffled_and_twice_gives_the_dora_keys_exactly_once(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    answers = [await deliver(client, tg.url, e, p, d) for e, p, d in replay(seed=22)]
    assert {status for status, _ in answers} == {202}
    # The failed deployment draws no marker but is stored as a fact: accepted.
    assert sum(1 for _, a in answers if a["accepted"]) >= len(week())
    got = await wait_for([sink], EXPECTED)
    assert got == EXPECTED
    assert_bounded(metric_bodies([sink]), str(gh.REPO_ID), "d-")
    # Each point is one outbox event, delivered with the entry's account on its metrics route.
    metrics = [r for r in sink.received if r.path == "/v1/metrics"]
    assert all(r.headers["lightstep-access-token"] for r in metrics)
    assert len(metrics) == 6 + 5 + 1 + 5  # deployments, lead times, restore, changes


async def test_a_push_arriving_after_its_deployment_counts_until_the_point_settled(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    tg: Tracegate = await start_tracegate(policy(issuer.url, settle="1s"), env=hook_env())
    await tg.keys_ready()
    first, second = week()[0], week()[1]
    assert (await deliver(client, tg.url, *second))[0] == 202  # the deployment, before its push
    await asyncio.sleep(0.1)  # well within settle (1 s)
    assert (await deliver(client, tg.url, *first))[0] == 202
    lead = ("tracegate.dora.change.lead_time", "payments-api", (("production", ""),))
    assert (await until_present([sink], lead))[lead] == [5 * HOUR]  # 14:00 − 09:00: the late push counted
    # A deployment whose push comes after its point settled: the point went out without it.
    later = deployment(9, "c9", "production", "success", at(5, 12))
    assert (await deliver(client, tg.url, "deployment_status", later))[0] == 202
    await asyncio.sleep(3.5)  # settle (1 s) + grace (1 s) + a pass: its points are out
    late_push = push("c2", [("c9", at(5, 9), "Late")], at(5, 9.1))
    assert (await deliver(client, tg.url, "push", late_push))[0] == 202
    await asyncio.sleep(2.0)
    # Its lead time went out from what had arrived by then: the deployed commit was unknown, no point.
    assert dora_totals([sink])[lead] == [5 * HOUR]


async def test_ci_runs_give_the_semantic_convention_metrics_once_each(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    ok = gh.workflow_run(conclusion="success")
    failed = gh.workflow_run(conclusion="failure", run_id=gh.RUN_ID + 1)
    for payload in (ok, failed, ok, failed):  # each twice: stored once
        assert (await deliver(client, tg.url, "workflow_run", payload))[0] == 202
    pipeline = json.dumps(c.gitlab_pipeline("failed")).encode()
    for _ in range(2):
        headers = c.gitlab_headers("Pipeline Hook", GL_SECRET, instance="https://gitlab.example.com")
        async with client.post(tg.url + "/webhooks/gitlab", data=pipeline, headers=headers) as resp:
            assert resp.status == 202, await resp.text()
    deadline = time.monotonic() + 10
    while len(metric_bodies([sink])) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    bodies = metric_bodies([sink])
    points = sorted(
        (r["service.name"], name, tuple(sorted(a.items())), p.get("sum", p.get("asInt")))
        for name, r, a, p in series(bodies)
    )
    github, gitlab = "ci/payments-api", "ci/payments-gitlab"
    run = "cicd.pipeline.run.duration"
    assert points == sorted([
        # GitHub runs: run_started_at → updated_at (400 s); GitHub gives no queue time for a run.
        (github, run, (("cicd.pipeline.name", "CI"), ("cicd.pipeline.result", "success"),
                       ("cicd.pipeline.run.state", "executing")), 400.0),
        (github, run, (("cicd.pipeline.name", "CI"), ("cicd.pipeline.result", "failure"),
                       ("cicd.pipeline.run.state", "executing"), ("error.type", "failure")), 400.0),
        (github, "cicd.pipeline.run.errors", (("cicd.pipeline.name", "CI"), ("error.type", "failure")), "1"),
        # GitLab: created → finished is 400 s, of which queued_duration 4 s pending.
        (gitlab, run, (("cicd.pipeline.name", "Build and test"), ("cicd.pipeline.result", "failure"),
                       ("cicd.pipeline.run.state", "executing"), ("error.type", "failure")), 396.0),
        (gitlab, run, (("cicd.pipeline.name", "Build and test"), ("cicd.pipeline.run.state", "pending")), 4.0),
        (gitlab, "cicd.pipeline.run.errors", (("cicd.pipeline.name", "Build and test"),
                                              ("error.type", "failure")), "1"),
    ])  # fmt: skip
    units = {
        m["name"]: m["unit"]
        for b in bodies
        for rm in b["resourceMetrics"]
        for sm in rm["scopeMetrics"]
        for m in sm["metrics"]
    }
    assert units == {run: "s", "cicd.pipeline.run.errors": "{error}"}
    assert_bounded(bodies, str(gh.RUN_ID), str(c.PIPELINE_ID), "312")


async def test_a_failed_deployment_from_a_ci_job_is_a_fact_not_a_marker(
    tg: Tracegate, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    """GitLab has no deployment webhook here: the deploy job says how its deployment went."""

    async def deploy(job: str, result: str | None, sha_: str) -> tuple[int, dict[str, Any]]:
        token = issuer.mint(job_id=job, sha=sha_)
        body = {"service": "payments-api", **({"result": result} if result else {})}
        headers = {"Authorization": f"Bearer {token}"}
        async with client.post(tg.url + "/v1/deployments", json=body, headers=headers) as resp:
            return resp.status, await resp.json()

    assert await deploy("901", "failure", sha("g1")) == (
        202,
        {"accepted": True, "reason": "stored", "services": ["payments-api"]},
    )
    assert (await deploy("901", "failure", sha("g1")))[1]["accepted"] is False  # the job's retry: stored once
    assert (await deploy("902", None, sha("g2")))[0] == 202  # the fix, a marker and a fact
    assert (await deploy("903", "maybe", sha("g3")))[0] == 400
    restore = ("tracegate.dora.time_to_restore", "payments-api", (("production", ""),))
    totals = await until_present([sink], restore)
    assert totals[("tracegate.dora.deployments", "payments-api", (("production", "failure"),))] == 1
    assert totals[("tracegate.dora.deployments", "payments-api", (("production", "success"),))] == 1
    assert len(totals[restore]) == 1 and 0 <= totals[restore][0] < 10
    markers = [r for r in sink.received if r.path == "/v1/traces"]
    assert len(markers) == 1  # the successful deployment's marker only (one span per service)


# --- the definitions, case by case --------------------------------------------------------

W = 24 * HOUR * 10**9


def _d(key: str, hour: float, commit: str, result: str = "success") -> Deployment:
    return Deployment(key, int(hour * HOUR * 1e9), 0.0, sha(commit), "production", ("api",), result, W)


def _p(key: str, hour: float, before: str, commits: list[tuple[str, float, str | None]]) -> Push:
    listed = tuple(Commit(sha(n), int(h * HOUR * 1e9), sha(r) if r else None) for n, h, r in commits)
    return Push(key, int(hour * HOUR * 1e9), 0.0, sha(before), listed[-1].sha, listed)


def test_rollback_revert_and_failed_deployment_mark_a_change_failed_within_the_window() -> None:
    pushes = [_p("p1", 1, "c0", [("c1", 1, None)]), _p("p2", 3, "c1", [("c2", 3, None)])]
    d1, d2 = _d("d1", 2, "c1"), _d("d2", 4, "c2")
    # A rollback: the next deployment goes back to a SHA deployed before d2.
    hist = [d1, d2, _d("d3", 5, "c1")]
    assert dora.failure_of(d2, hist, pushes) == "rollback"
    assert dora.lead_time(hist[2], hist, pushes) is None  # a rollback brings no change
    # A revert of a commit d2 brought, pushed within the window.
    revert = _p("p3", 6, "c2", [("c3", 5.5, "c2")])
    assert dora.failure_of(d2, [d1, d2], [*pushes, revert]) == "revert"
    late_revert = _p("p3", 4 + 25, "c2", [("c3", 28, "c2")])
    assert dora.failure_of(d2, [d1, d2], [*pushes, late_revert]) is None  # after the window
    # A failed deployment next; but not after a newer change took the environment over.
    assert dora.failure_of(d2, [d1, d2, _d("d3", 8, "c3", "failure")], pushes) == "failed-deployment"
    assert dora.failure_of(d1, [d1, d2, _d("d3", 8, "c3", "failure")], pushes) is None
    # A redeploy of the same SHA is neither a rollback nor a new change.
    hist = [d1, d2, _d("d2b", 5, "c2"), _d("d3", 6, "c3", "failure")]
    assert dora.failure_of(d2, hist, pushes) == "failed-deployment"
    assert dora.lead_time(hist[2], hist, pushes) is None
    # Order is the events' own time, not the list's: shuffled input, same answers.
    shuffled = [hist[3], hist[0], hist[2], hist[1]]
    assert dora.history(shuffled, "api", "production") == hist


def test_time_to_restore_runs_from_the_first_failure_since_the_last_success() -> None:
    hist = [_d("a", 1, "c1"), _d("b", 2, "c2", "failure"), _d("c", 3, "c3", "failure"), _d("d", 5, "c4")]
    assert dora.time_to_restore(hist[3], hist) == 3 * HOUR
    assert dora.time_to_restore(hist[0], hist) is None
    assert dora.time_to_restore(hist[1], hist) is None  # a failure restores nothing


# --- two settlers, one point --------------------------------------------------------------


def _hook() -> WebhookSource:
    """The scenario's GitHub entry as the policy loads it (settle 1 s)."""
    return WebhookSource(
        name="payments-github",
        source="github",
        repository=Matcher(()),
        secret_refs=(),
        events=frozenset({"push", "deployment_status"}),
        refs=Matcher(("refs/heads/main",)),
        service_account="payments-ci",
        services=("payments-api",),
        where=Where("p.yaml", 1),
        project_ids=frozenset({"424242"}),
        metrics=frozenset({"dora"}),
        dora=DoraSettings(settle=1.0),
    )


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[OutboxStore, list[float]]]:
    """An outbox of either kind whose clock the test moves (``now[0]``, seconds)."""
    now = [1_900_000_000.0]
    outbox: OutboxStore
    if request.param == "sqlite":
        outbox = Outbox(tmp_path / "outbox.sqlite3", clock=lambda: now[0])
    else:
        server: PgServer = request.getfixturevalue("postgres")
        outbox = PostgresOutbox(Secret(await server.database()), clock=lambda: now[0])
    await outbox.open()
    yield outbox, now
    await outbox.close()


async def test_a_point_computed_again_later_is_the_same_point_stored_once(
    store: tuple[OutboxStore, list[float]],
) -> None:
    """Two replicas that both find a point due — or one that stored it and died before marking
    it settled — compute it from the facts received by its due time, whatever arrived since,
    and store it under one key."""
    outbox, now = store
    hook = _hook()
    first = week()[0][1]
    assert await dora_facts.record_push(outbox, hook, first)
    assert await dora_facts.record_github_deployment(
        outbox, hook, deployment(1, "c2", "production", "success", at(0, 14))
    )
    assert not await dora_facts.record_push(outbox, hook, first)  # a redelivery: nothing new
    now[0] += 1.5  # past settle (1 s), not yet past the grace
    assert await outbox.due_facts(GRACE) == []
    now[0] += 1.0
    [due] = await outbox.due_facts(GRACE)
    # A push that would change the lead time (an earlier first commit) arrives after the due time.
    earlier = push("c0", [("c00", at(0, 1), "Older"), ("c2", at(0, 10), "Refund API")], at(0, 2))
    earlier["before"], earlier["ref"] = sha("c-1"), "refs/heads/main"
    assert await dora_facts.record_push(outbox, hook, earlier)
    replica_a = Settler(outbox, clock=lambda: now[0])
    replica_b = Settler(outbox, clock=lambda: now[0] + 30)
    facts = await outbox.scope_facts("payments-github", 0)
    assert await replica_a.settle_one(due, facts, now[0]) == 2  # its lead time, and its change (no restore)
    assert await replica_b.settle_one(due, facts, now[0] + 30) == 0  # the same keys: duplicates
    lead = settled_points(
        dora.decode(due.key, due.kind, due.at_ns, due.received_at, due.body), facts, due.settle_at or 0
    )
    [(_, [point])] = lead["lead"]
    assert point.value == 5 * HOUR  # 14:00 − 09:00: the late push (01:00) is not part of it
    assert await outbox.due_facts(GRACE) == []  # settled


# --- cardinality, protobuf, policy ---------------------------------------------------------


async def test_cardinality_stays_bounded_however_many_deployments(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    for n in range(30):
        commit = f"x{n}"
        pushed = push(f"x{n - 1}" if n else "c0", [(commit, at(0, n * 0.2), f"Change {n}")], at(0, n * 0.2 + 0.05))
        assert (await deliver(client, tg.url, "push", pushed))[0] == 202
        result = "failure" if n % 7 == 3 else "success"
        env = ("production", "staging")[n % 2]
        assert (
            await deliver(
                client, tg.url, "deployment_status", deployment(100 + n, commit, env, result, at(0, n * 0.2 + 0.1))
            )
        )[0] == 202
    deadline = time.monotonic() + 15
    while (
        sum(v for k, v in dora_totals([sink]).items() if k[0] == "tracegate.dora.changes") < 26
        and time.monotonic() < deadline
    ):
        await asyncio.sleep(0.1)
    bodies = metric_bodies([sink])
    assert_bounded(bodies, "d-")
    names = {(n, r["service.name"], tuple(sorted(a.items()))) for n, r, a, _ in series(bodies)}
    # 30 deployments, 30 commits, 30 ids: at most metric × environment × result series.
    assert len(names) <= 4 * 2 * 2
    assert Counter(n for n, *_ in names)["tracegate.dora.deployments"] == 4


def test_metrics_are_reencoded_as_protobuf_losslessly() -> None:
    body = export(
        [
            ({"service.name": "api"}, [counter("c", "{deployment}", "d", {"deployment.environment.name": "prod"})]),
            ({"service.name": "web"}, [observation("h", "s", "d", {"x": "y"}, 5400.0, DORA_BOUNDS)]),
        ],
        "tracegate.dora",
        1_800_000_000_000_000_000,
    )
    message = ExportMetricsServiceRequest.FromString(metrics_to_protobuf(body))
    assert json_format.MessageToDict(message) == json_format.MessageToDict(
        json_format.Parse(body, ExportMetricsServiceRequest())
    )
    histogram = message.resource_metrics[1].scope_metrics[0].metrics[0].histogram
    assert (
        histogram.aggregation_temporality == 1 and list(histogram.data_points[0].bucket_counts)[5] == 1
    )  # (3600, 7200]
    with pytest.raises(ValueError, match="not an OTLP/JSON metrics export"):
        metrics_to_protobuf(b'{"resourceMetrics": [{"nope": 1}]}')


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("service_account: docs-ci, metrics: [dora]", "which may not send metrics; add metrics to its signals"),
        ("service_account: payments-ci, metrics: [dora, speed]", "unknown metrics 'speed'; use cicd, dora or both"),
        ("service_account: payments-ci, dora: {settle: 1s}", "dora: tunes metrics: [dora]; add dora to metrics"),
        ("service_account: payments-ci, metrics: [dora], dora: {failure_window: 0}", "dora.failure_window '0' must be"),
        (
            "service_account: payments-ci, metrics: [dora], dora: {settle: soon}",
            "dora.settle 'soon' must be a duration",
        ),
        ("service_account: payments-ci, metrics: [dora], dora: {after: 1h}", "unknown key 'after' in webhook 'h'.dora"),
        ("service_account: payments-ci, metrics: [cicd]", "metrics: [cicd] comes from CI events"),
    ],
)
def test_metrics_entries_are_checked_at_load(tmp_path: Path, entry: str, message: str) -> None:
    hook = f"{{name: h, source: github, repository_id: 1, secret: [{{env: LS_PAY}}], services: [api], {entry}}}"
    found = problems(tmp_path, HEAD, f"webhooks:\n  - {hook}\n")
    assert any(message in p for p in found), found


def test_metrics_settings_loaded(tmp_path: Path) -> None:
    entry = (
        "{name: h, source: github, repository_id: 1, secret: [{env: LS_PAY}], services: [api], "
        "service_account: payments-ci, metrics: [dora], dora: {environment: [prod*], failure_window: 2d, settle: 90}}"
    )
    [hook] = load_policy(write(tmp_path, HEAD, f"webhooks:\n  - {entry}\n"), environ=ENV).webhooks
    assert hook.metrics == {"dora"} and hook.dora.failure_window == 2 * 86400 and hook.dora.settle == 90
    assert hook.dora.environments.match_text("production") and not hook.dora.environments.match_text("staging")


# --- two replicas, one PostgreSQL outbox ---------------------------------------------------

Spawn = Callable[[str], Awaitable[str]]


@pytest.fixture
async def replicas(tmp_path: Path, issuer: StandInIssuer, postgres: PgServer) -> AsyncIterator[Spawn]:  # noqa: F811
    dsn = await postgres.database()
    processes: list[asyncio.subprocess.Process] = []
    homes: list[Path] = []

    async def _spawn(upstream: str) -> str:
        home = tmp_path / f"replica-{len(homes) + 1}"
        homes.append(home)
        (home / "policies").mkdir(parents=True)
        (home / "policies" / "main.yaml").write_text(policy(issuer.url))
        env = {
            **hook_env(),
            "TRACEGATE_OUTBOX": dsn,
            "TRACEGATE_UPSTREAM_PATH_METRICS": "/v1/metrics",
            "TRACEGATE_UPSTREAM_PATH_TRACES": "/v1/traces",
            "TRACEGATE_OUTBOX_RETRY_BASE_SECONDS": "0.05",
            "TRACEGATE_OUTBOX_RETRY_MAX_SECONDS": "0.5",
            "TRACEGATE_DATA_DIR": str(home / "data"),
        }
        process, url, _admin = await spawn(home / "policies", env, upstream)
        processes.append(process)
        return url

    yield _spawn
    for process in processes:
        process.kill()
        await process.wait()
    for home in homes:
        log = (home / "stderr.log").read_text()
        assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]


async def test_two_replicas_on_one_postgresql_outbox_send_each_point_once(replicas: Spawn, sink: Sink) -> None:
    a, b = await asyncio.gather(replicas(sink.url), replicas(sink.url))
    async with aiohttp.ClientSession() as client:
        for event, payload, delivery in replay(seed=7):
            # Each delivery to both replicas at the same moment (a retry through a load balancer).
            answers = await asyncio.gather(
                deliver(client, a, event, payload, delivery), deliver(client, b, event, payload, delivery)
            )
            assert [status for status, _ in answers] == [202, 202]
    got = await wait_for([sink], EXPECTED)
    assert got == EXPECTED
    assert_bounded(metric_bodies([sink]), str(gh.REPO_ID), "d-")
