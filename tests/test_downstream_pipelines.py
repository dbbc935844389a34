"""Child and multi-project pipelines (issue 22, item 5): a GitLab downstream pipeline's root
span is also drawn in the upstream pipeline's trace, a child of the trigger job's span as
tracegate derives it, when the pipeline hook's ``source_pipeline`` names that job; its own
trace — which its job hooks and its jobs' ID tokens name — stays as it was, the two roots
linked. Recorded-shape payloads (tests/ci_payloads.py), delivered out of order and twice,
through the real door and a real sink; every id worked out here from the published
derivation (README, proxy/ci/trace_ids.py), never by calling tracegate."""

from __future__ import annotations

import asyncio
import hashlib
import random
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.ci import gitlab
from proxy.ci.otlp_proto import traces_to_protobuf
from proxy.ci.pipeline import otlp_json
from proxy.dev.standins import Sink, StandInIssuer
from tests import ci_payloads as c
from tests.conftest import Tracegate, policy_yaml
from tests.test_ci_traces import CI_WEBHOOKS, attrs, ci_env, post_gitlab, settle
from tests.test_forgejo_actions import ANY_JSON, mutated

INSTANCE = "https://gitlab.example.com"


def _sha(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def trace(project: int, pipeline: int) -> str:
    return _sha("tracegate-cicd-trace", INSTANCE, str(project), str(pipeline))[:32]


def root(project: int, pipeline: int) -> str:
    return _sha("tracegate-cicd-pipeline", INSTANCE, str(project), str(pipeline))[:16]


def job(project: int, pipeline: int, job_id: int) -> str:
    return _sha("tracegate-cicd-job", INSTANCE, str(project), str(pipeline), str(job_id), "")[:16]


UPSTREAM_TRACE, UPSTREAM_ROOT = trace(c.PROJECT_ID, c.PIPELINE_ID), root(c.PROJECT_ID, c.PIPELINE_ID)
CHILD_TRACE, CHILD_ROOT = trace(c.PROJECT_ID, c.CHILD_PIPELINE_ID), root(c.PROJECT_ID, c.CHILD_PIPELINE_ID)
MULTI = (c.DOWNSTREAM_PROJECT_ID, c.DOWNSTREAM_PIPELINE_ID)
MULTI_TRACE, MULTI_ROOT = trace(*MULTI), root(*MULTI)
BRIDGE_CHILD_SPAN = job(c.PROJECT_ID, c.PIPELINE_ID, c.BRIDGE_CHILD)
BRIDGE_MULTI_SPAN = job(c.PROJECT_ID, c.PIPELINE_ID, c.BRIDGE_DOWNSTREAM)


@pytest.fixture
async def tg(start_tracegate: Any, issuer: StandInIssuer) -> Tracegate:
    tracegate: Tracegate = await start_tracegate(
        policy_yaml(issuer.url, CI_WEBHOOKS), env=ci_env(), outbox_retry_base="0.05", outbox_retry_max="0.3"
    )
    return tracegate


def deliveries() -> list[tuple[str, dict[str, Any]]]:
    child = c.gitlab_downstream_pipeline(
        c.CHILD_PIPELINE_ID, project_id=c.PROJECT_ID, source="parent_pipeline", job_id=c.BRIDGE_CHILD
    )
    multi = c.gitlab_downstream_pipeline(
        c.DOWNSTREAM_PIPELINE_ID, project_id=c.DOWNSTREAM_PROJECT_ID, source="pipeline", job_id=c.BRIDGE_DOWNSTREAM
    )
    return [
        ("Pipeline Hook", c.gitlab_pipeline("success")),
        ("Pipeline Hook", child),
        ("Job Hook", c.gitlab_child_job()),
        ("Pipeline Hook", multi),
    ]


async def test_a_downstream_pipelines_root_is_a_child_of_its_trigger_job_in_the_upstream_trace(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    # This file's arithmetic, held against the values tests/test_trace_ids.py pins for GitLab.
    assert (UPSTREAM_TRACE, job(c.PROJECT_ID, c.PIPELINE_ID, 880013)) == (
        "72bafae5db7a322752f22c554f788d13",
        "26587fb7e45c6d4c",
    )
    sends = deliveries() * 2
    random.Random(22).shuffle(sends)
    answers = [await post_gitlab(client, tg.url, event, body, instance=INSTANCE) for event, body in sends]
    assert {status for status, _ in answers} == {202}
    # Once each: the upstream root; the child's root (drawn in two traces, one row); the
    # child's job; the multi-project pipeline's root (the same) and its three builds[] (that
    # entry lists pipeline events only).
    assert sum(a.get("spans", 0) for _, a in answers if a["accepted"]) == 1 + 1 + 1 + 1 + 3
    got = [s for _, s in await settle(sink, 9)]
    assert len(got) == 9
    placed = {(s["traceId"], s["spanId"]): s for s in got}
    assert len(placed) == 9

    # In the upstream trace: its root, and each downstream root under its trigger job's span.
    upstream = {s["spanId"]: s for s in got if s["traceId"] == UPSTREAM_TRACE}
    assert set(upstream) == {UPSTREAM_ROOT, CHILD_ROOT, MULTI_ROOT}
    assert "parentSpanId" not in upstream[UPSTREAM_ROOT]
    assert upstream[CHILD_ROOT]["parentSpanId"] == BRIDGE_CHILD_SPAN
    assert upstream[MULTI_ROOT]["parentSpanId"] == BRIDGE_MULTI_SPAN
    assert upstream[CHILD_ROOT]["links"] == [{"traceId": CHILD_TRACE, "spanId": CHILD_ROOT}]
    assert upstream[MULTI_ROOT]["links"] == [{"traceId": MULTI_TRACE, "spanId": MULTI_ROOT}]
    assert upstream[CHILD_ROOT]["kind"] == upstream[MULTI_ROOT]["kind"] == 2  # pipeline-run spans

    # The child's own trace, as before: its root and the job its job hook drew under it.
    child = {s["spanId"]: s for s in got if s["traceId"] == CHILD_TRACE}
    assert set(child) == {CHILD_ROOT, job(c.PROJECT_ID, c.CHILD_PIPELINE_ID, c.CHILD_JOB_ID)}
    own = child.pop(CHILD_ROOT)
    assert "parentSpanId" not in own
    assert own["links"] == [{"traceId": UPSTREAM_TRACE, "spanId": BRIDGE_CHILD_SPAN}]
    [child_job] = child.values()
    assert child_job["parentSpanId"] == CHILD_ROOT
    a = attrs(own)
    assert a["tracegate.cicd.pipeline.source"] == "parent_pipeline"
    assert (
        a["tracegate.cicd.upstream.project.id"],
        a["tracegate.cicd.upstream.pipeline.id"],
        a["tracegate.cicd.upstream.job.id"],
    ) == ("4242", "99001", "880020")
    assert attrs(upstream[CHILD_ROOT]) == a  # the same span, drawn in two traces
    assert (upstream[CHILD_ROOT]["startTimeUnixNano"], upstream[CHILD_ROOT]["status"]) == (
        own["startTimeUnixNano"],
        own["status"],
    )

    # The multi-project pipeline's own trace: its root and its builds under it.
    multi = {s["spanId"]: s for s in got if s["traceId"] == MULTI_TRACE}
    assert len(multi) == 4 and "parentSpanId" not in multi[MULTI_ROOT]
    assert multi.pop(MULTI_ROOT)["links"] == [{"traceId": UPSTREAM_TRACE, "spanId": BRIDGE_MULTI_SPAN}]
    assert {s["parentSpanId"] for s in multi.values()} == {MULTI_ROOT}
    assert {s["spanId"] for s in multi.values()} == {
        job(*MULTI, c.DOWNSTREAM_PIPELINE_ID * 10 + offset) for offset in range(3)
    }

    # Racing redeliveries of the downstream hook store nothing more.
    race = await asyncio.gather(
        *(post_gitlab(client, tg.url, "Pipeline Hook", deliveries()[1][1], instance=INSTANCE) for _ in range(3))
    )
    assert [a["reason"] for _, a in race] == ["duplicate-delivery"] * 3
    assert len(await settle(sink, 10, timeout=0.5)) == 9


async def test_only_a_source_pipeline_naming_another_pipelines_job_draws_the_upstream_root(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    named = deliveries()[1][1]
    itself = c.gitlab_downstream_pipeline(99004, project_id=c.PROJECT_ID, source="parent_pipeline", job_id=1)
    itself["source_pipeline"]["pipeline_id"] = 99004  # names itself: no upstream to hang under
    jobless = c.gitlab_downstream_pipeline(99005, project_id=c.PROJECT_ID, source="pipeline", job_id=1)
    del jobless["source_pipeline"]["job_id"]  # does not say which job: today's behaviour
    spans = []
    for body in (named, itself, jobless):
        status, answer = await post_gitlab(client, tg.url, "Pipeline Hook", body, instance=INSTANCE)
        spans.append((status, answer["spans"]))
    assert spans == [(202, 1), (202, 1), (202, 1)]
    got = [s for _, s in await settle(sink, 4)]
    assert sorted((s["traceId"], s["spanId"], s.get("parentSpanId", "")) for s in got) == sorted(
        [
            (CHILD_TRACE, CHILD_ROOT, ""),
            (UPSTREAM_TRACE, CHILD_ROOT, BRIDGE_CHILD_SPAN),
            (trace(c.PROJECT_ID, 99004), root(c.PROJECT_ID, 99004), ""),
            (trace(c.PROJECT_ID, 99005), root(c.PROJECT_ID, 99005), ""),
        ]
    )


@given(st.lists(st.integers(0, 50), min_size=1, max_size=3), ANY_JSON)
def test_no_source_pipeline_breaks_the_pipeline_spans(path: list[int], value: object) -> None:
    """The downstream hook with one field of its ``source_pipeline`` (or the node itself)
    replaced by arbitrary JSON: spans or a reason, never an error; an upstream copy only
    with three positive ids, and then in another trace than the pipeline's own."""
    body = deliveries()[1][1]
    body["source_pipeline"] = mutated({"source_pipeline": body["source_pipeline"]}, path, value)["source_pipeline"]
    drawn = gitlab.spans_for("Pipeline Hook", body, INSTANCE, with_jobs=True)
    assert isinstance(drawn, gitlab.Spans)
    root = drawn.spans[0]
    assert root.upstream is None and all(s.upstream is None and not s.inner for s in drawn.spans[1:])
    assert len(root.inner) <= 1
    for copy in root.inner:
        assert copy.upstream is not None and copy.trace_id != root.trace_id and copy.span_id == root.span_id
        assert copy.links == ((root.trace_id, root.span_id),) and root.links == ((copy.trace_id, copy.parent_span_id),)
    for span in drawn.spans:
        traces_to_protobuf(otlp_json([span], "ci/x", "gitlab"))  # links too: hex ids a protobuf route takes
        span.outbox_key("gitlab")
