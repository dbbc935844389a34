"""Forgejo's own Actions webhooks (issue 22, item 3): ``action_run_*``, ``workflow_run_<status>``
and ``workflow_job_<status>`` (tests/forgejo_payloads.py, after Forgejo's structs) become the
same pipeline trace as Gitea's workflow_run/workflow_job — one trace per run, each span once
whatever the order and however often Forgejo delivers — through the real door, a real sink.
The ids are worked out here from the published derivation (README, proxy/ci/trace_ids.py),
never by calling tracegate."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.ci import actions
from proxy.ci.pipeline import CiSpan, otlp_json
from proxy.dev.standins import Sink, StandInIssuer
from tests import forgejo_payloads as f
from tests import gitea_payloads as g
from tests.ci_payloads import ns
from tests.conftest import Tracegate, environ, policy_yaml
from tests.test_ci_traces import attrs, settle

SECRET = "forgejo-ci-hook-5"
WEBHOOKS = """
webhooks:
  - name: payments-forgejo
    source: forgejo
    repository: payments/api
    secret: [{env: FORGEJO_CI_HOOK}]
    events: [action_run, workflow_run, workflow_job]
    service_account: payments-ci
    service_name: ci/payments-api
  - name: runs-only
    source: forgejo
    repository: payments/runs-only
    secret: [{env: FORGEJO_CI_HOOK}]
    events: [workflow_run]
    service_account: payments-ci
"""


def _sha(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


RUN = (f.HOST, str(f.REPO_ID), str(f.RUN_ID))
TRACE = _sha("tracegate-cicd-trace", *RUN)[:32]
ROOT = _sha("tracegate-cicd-pipeline", *RUN)[:16]
JOB_2001 = _sha("tracegate-cicd-job", *RUN, "2001", "1")[:16]
JOB_2002 = _sha("tracegate-cicd-job", *RUN, "2002", "1")[:16]
JOB_2002_ATTEMPT_2 = _sha("tracegate-cicd-job", *RUN, "2002", "2")[:16]


@pytest.fixture
async def tg(start_tracegate: Any, issuer: StandInIssuer, tmp_path: Path) -> Tracegate:
    tracegate: Tracegate = await start_tracegate(
        policy_yaml(issuer.url, WEBHOOKS),
        env={**environ(), "FORGEJO_CI_HOOK": SECRET},
        outbox_retry_base="0.05",
        outbox_retry_max="0.3",
    )
    return tracegate


async def post(client: aiohttp.ClientSession, url: str, event: str, payload: dict[str, Any]) -> tuple[int, str]:
    """As Forgejo delivers: X-Forgejo-* headers (a new delivery id every time), signed."""
    body = g.encode(payload)
    headers = {**g.gitea_headers(event, body, SECRET, source="Forgejo"), "Content-Type": "application/json"}
    async with client.post(url + "/webhooks/gitea", data=body, headers=headers) as resp:
        return resp.status, (await resp.json())["reason"]


def first_attempt() -> list[tuple[str, dict[str, Any]]]:
    """Every run and job event of run 901's first attempt, as Forgejo sends them."""
    a, b = 2001, 2002
    return [
        ("workflow_run_waiting", f.workflow_run("waiting", "new_run_attempt")),
        ("workflow_job_waiting", f.workflow_job(f.job_with_times(a, "waiting", final="success"), "new_job_attempt")),
        ("workflow_job_blocked", f.workflow_job(f.job_with_times(b, "blocked", final="failure"), "new_job_attempt")),
        ("workflow_run_running", f.workflow_run("running", "run_status_changed")),
        ("workflow_job_running", f.workflow_job(f.job_with_times(a, "running", final="success"), "job_status_changed")),
        ("workflow_job_success", f.workflow_job(f.job_with_times(a, "success", final="success"), "job_completed")),
        ("workflow_job_running", f.workflow_job(f.job_with_times(b, "running", final="failure"), "job_status_changed")),
        ("workflow_job_failure", f.workflow_job(f.job_with_times(b, "failure", final="failure"), "job_completed")),
        ("workflow_run_failure", f.workflow_run("failure", "run_completed")),
        ("action_run_failure", f.action_run("failure", "failure", last="success")),  # deprecated, sent alongside
    ]


def rerun() -> list[tuple[str, dict[str, Any]]]:
    """Job 2002 re-run: the run's new attempt, the job's, and the run passing (a recovery)."""
    return [
        ("workflow_run_waiting", f.workflow_run("waiting", "new_run_attempt", final="success")),
        ("workflow_job_waiting", f.workflow_job(f.job_with_times(2002, "waiting", final="success"), "new_job_attempt")),
        ("workflow_job_success", f.workflow_job(f.job_with_times(2002, "success", final="success"), "job_completed")),
        ("workflow_run_success", f.workflow_run("success", "run_completed", final="success")),
        ("action_run_success", f.action_run("success", "success", last="failure")),
        ("action_run_recover", f.action_run("success", "recover", last="failure")),
    ]


async def deliver_shuffled_twice(
    client: aiohttp.ClientSession, url: str, sends: list[tuple[str, dict[str, Any]]], seed: int
) -> list[str]:
    twice = sends + sends
    random.Random(seed).shuffle(twice)
    answers = [await post(client, url, event, payload) for event, payload in twice]
    assert {status for status, _ in answers} == {202}
    return [reason for _, reason in answers]


async def test_forgejo_run_and_job_events_out_of_order_and_twice_are_one_trace_each_span_once(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    reasons = await deliver_shuffled_twice(client, tg.url, first_attempt(), seed=22)
    assert reasons.count("stored") == 3  # job 2001, job 2002, the run's root
    assert reasons.count("not-final") == 2 * 6
    assert reasons.count("duplicate-delivery") == 2 * 4 - 3  # every final event again; action_run_failure is the root
    got = [s for _, s in await settle(sink, 3)]
    assert len(got) == 3
    by_id = {s["spanId"]: s for s in got}
    assert set(by_id) == {ROOT, JOB_2001, JOB_2002}
    assert {s["traceId"] for s in got} == {TRACE}
    root = by_id[ROOT]
    assert "parentSpanId" not in root and by_id[JOB_2001]["parentSpanId"] == by_id[JOB_2002]["parentSpanId"] == ROOT
    assert root["name"] == "workflow ci.yml" and root["kind"] == 2
    assert (int(root["startTimeUnixNano"]), int(root["endTimeUnixNano"])) == tuple(
        ns(t.replace("+00:00", "Z")) for t in f.RUN_TIMES["failure"]
    )
    assert root["status"] == {"code": 2, "message": "failure"}
    a = attrs(root)
    assert (a["cicd.pipeline.name"], a["cicd.pipeline.result"], a["cicd.pipeline.run.id"]) == (
        "ci.yml",
        "failure",
        "901",
    )
    assert a["cicd.pipeline.run.url.full"] == "https://forgejo.example.com/payments/api/actions/runs/42"
    assert (a["vcs.ref.head.name"], a["vcs.ref.head.revision"]) == ("main", f.SHA)
    assert (a["tracegate.actor.login"], a["tracegate.cicd.run.number"], a["tracegate.project.id"]) == (
        "alice",
        "42",
        "7",
    )
    assert a["vcs.repository.url.full"] == "https://forgejo.example.com/payments/api"
    for job_id, span_id, final in ((2001, JOB_2001, "success"), (2002, JOB_2002, "failure")):
        created, started, stopped = f.JOB_TIMES[job_id, final]
        span = by_id[span_id]
        assert (int(span["startTimeUnixNano"]), int(span["endTimeUnixNano"])) == (ns(started), ns(stopped))
        j = attrs(span)
        assert (j["cicd.pipeline.task.name"], j["cicd.pipeline.task.run.id"]) == (f.JOB_NAMES[job_id], str(job_id))
        assert j["tracegate.cicd.queued_seconds"] == pytest.approx((ns(started) - ns(created)) / 1e9)
        assert j["cicd.pipeline.task.run.result"] == final
    assert by_id[JOB_2002]["status"] == {"code": 2, "message": "failure"}

    # The re-run: a new final state of job 2002 and of the run, each once; the deprecated
    # action_run_success and action_run_recover name the same root span as workflow_run_success.
    reasons = await deliver_shuffled_twice(client, tg.url, rerun(), seed=7)
    assert reasons.count("stored") == 2
    more = [s for _, s in await settle(sink, 5)]
    assert len(more) == 5
    new = [s for s in more if s not in got]
    assert {s["traceId"] for s in new} == {TRACE}
    assert sorted(s["spanId"] for s in new) == sorted([ROOT, JOB_2002])  # no attempt named: the same job span id
    again = next(s for s in new if s["spanId"] == ROOT)
    assert again["status"] == {"code": 1} and attrs(again)["cicd.pipeline.result"] == "success"
    assert int(again["startTimeUnixNano"]) == ns(f.RUN_TIMES["success"][0].replace("+00:00", "Z"))


async def test_forgejo_newest_job_payloads_name_no_times_and_draw_nothing_but_the_run_still_does(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    job = f.workflow_job(f.job_newest(2002, "failure", attempt=2), "job_completed", run_status="failure")
    assert await post(client, tg.url, "workflow_job_failure", job) == (202, "job-without-times")
    assert await post(client, tg.url, "workflow_run_failure", f.workflow_run("failure", "run_completed")) == (
        202,
        "stored",
    )
    [(_, root)] = await settle(sink, 1)
    assert (root["traceId"], root["spanId"]) == (TRACE, ROOT)


async def test_forgejo_gitea_shaped_workflow_job_names_its_outcome_in_status(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    sends = [
        ("workflow_job", f.gitea_shaped_job("running", attempt=1)),
        ("workflow_job", f.gitea_shaped_job("failure", attempt=1)),
        ("workflow_job", f.gitea_shaped_job("success", attempt=2)),
    ]
    reasons = await deliver_shuffled_twice(client, tg.url, sends, seed=3)
    assert sorted(reasons) == sorted(["not-final"] * 2 + ["stored"] * 2 + ["duplicate-delivery"] * 2)
    got = {s["spanId"]: s for _, s in await settle(sink, 2)}
    assert set(got) == {JOB_2002, JOB_2002_ATTEMPT_2}
    assert {s["traceId"] for s in got.values()} == {TRACE}
    assert {s["parentSpanId"] for s in got.values()} == {ROOT}
    failed = got[JOB_2002]
    assert failed["status"] == {"code": 2, "message": "failure: Run tests"}
    assert attrs(failed)["cicd.worker.name"] == "forgejo-runner-1"
    assert got[JOB_2002_ATTEMPT_2]["status"] == {"code": 1}


async def test_forgejo_action_run_events_need_action_run_in_events(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    elsewhere = f.action_run("success", "success")
    elsewhere["run"]["repository"].update(full_name="payments/runs-only", html_url=f"{f.HOST}/payments/runs-only")
    assert await post(client, tg.url, "action_run_success", elsewhere) == (202, "event-not-listed")
    tampered = f.workflow_run("success", "run_completed", final="success")
    tampered["run"]["repository"]["html_url"] = f"{f.HOST}/someone/else"  # names another repository
    assert (await post(client, tg.url, "workflow_run_success", tampered))[1] == "malformed-workflow-run"
    assert (await post(client, tg.url, "workflow_run_success", {"action": "run_completed"}))[0] == 401
    assert tg.audit()[-1]["reason"] == "unknown-repository"
    await settle(sink, 1, timeout=0.3)
    assert sink.received == []


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)
#: Each recorded shape and an event Forgejo sends it as.
_SHAPES: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "action_run": ("action_run_success", lambda: f.action_run("success", "success", last="failure")),
    "workflow_run": ("workflow_run_failure", lambda: f.workflow_run("failure", "run_completed")),
    "workflow_job": (
        "workflow_job_success",
        lambda: f.workflow_job(f.job_with_times(2001, "success", final="success"), "job_completed"),
    ),
    "gitea_shaped": ("workflow_job", lambda: f.gitea_shaped_job("failure", attempt=1)),
}


def mutated(base: dict[str, Any], path: list[int], value: object) -> dict[str, Any]:
    """A recorded payload with one field anywhere replaced by arbitrary JSON."""
    node: object = base
    for step in path:
        if isinstance(node, dict) and node:
            key = sorted(node)[step % len(node)]
            if not isinstance(node[key], (dict, list)) or step % 3 == 0:
                node[key] = value
                break
            node = node[key]
        elif isinstance(node, list) and node:
            node = node[step % len(node)]
    return base


@given(st.sampled_from(sorted(_SHAPES)), st.lists(st.integers(0, 50), min_size=1, max_size=4), ANY_JSON)
def test_no_forgejo_payload_breaks_the_span_builders(shape: str, path: list[int], value: object) -> None:
    """Each recorded shape draws its span; with one field anywhere replaced by arbitrary JSON
    it draws a span the upstream can parse or a reason, never an error."""
    event, build = _SHAPES[shape]
    assert isinstance(actions.spans_for(event, build(), source="forgejo"), CiSpan)
    span = actions.spans_for(event, mutated(build(), path, value), source="forgejo")
    if isinstance(span, CiSpan):
        [encoded] = json.loads(otlp_json([span], "ci/x", "forgejo"))["resourceSpans"][0]["scopeSpans"][0]["spans"]
        assert 0 < int(encoded["startTimeUnixNano"]) <= int(encoded["endTimeUnixNano"])
        assert encoded["traceId"] == span.run.trace_id
        span.outbox_key("forgejo")


def test_explain_knows_forgejos_own_actions_events(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``tracegate explain --payload`` reads Forgejo's run events (repository inside ``run``,
    ``workflow_run_<status>`` listed as ``workflow_run``) as the door does."""
    from proxy.cli import main

    root = tmp_path / "p"
    root.mkdir()
    (root / "00.yaml").write_text(policy_yaml("https://gitlab.example.com", WEBHOOKS))
    payload = tmp_path / "run.json"
    payload.write_text(json.dumps(f.workflow_run("failure", "run_completed")))
    code = main(
        ["explain", str(root), "--payload", str(payload), "--source", "forgejo", "--event", "workflow_run_failure"],
        environ=environ(),
    )
    out = capsys.readouterr().out
    assert "entry 'payments-forgejo'" in out, out
    assert f"trace {TRACE}" in out
    assert code == 0
