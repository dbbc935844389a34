"""Gitea / Forgejo Actions: ``workflow_run`` and ``workflow_job`` → the spans of a run's trace.

Gitea ≥ 1.24 sends both (``modules/structs/hook.go``: ``WorkflowRunPayload``,
``WorkflowJobPayload``; ``repo_actions.go``: ``ActionWorkflowRun``, ``ActionWorkflowJob``);
they arrive signed on ``/webhooks/gitea`` like every other Gitea event, and
:func:`receive` is called once the signature verified. The model is GitLab's
(:mod:`.pipeline`): the trace is (instance — the entry's ``instance:``, else the one the
repository's ``html_url`` names —, repository id, run id); the run is the root span
from ``started_at`` to ``completed_at``; each job attempt (job id, ``run_attempt``) is a
child span from ``started_at`` to ``completed_at``, its queued time ``started_at -
created_at``, its steps span events. Unset times are Go's zero time
``0001-01-01T00:00:00Z`` and count as absent. Only ``completed`` events draw spans.
"""

from __future__ import annotations

from typing import Any

from proxy.ci.ci_outbox import store_spans
from proxy.ci.gitea import repository_instance
from proxy.ci.payload import Skip, get, positive_id, text
from proxy.ci.pipeline import Attribute, CiSpan, RunId, link_on, parse_time
from proxy.ci.store import OutboxStore
from proxy.policy.model import WebhookSource
from proxy.policy.webhooks import pinned_instance

EVENTS = ("workflow_run", "workflow_job")
MAX_STEPS = 100
_RESULTS = {
    "success": "success",
    "neutral": "success",
    "failure": "failure",
    "cancelled": "cancellation",
    "canceled": "cancellation",
    "skipped": "skip",
    "timed_out": "timeout",
}


def run_of(payload: dict[str, Any], run_id: Any, instance: str | None = None) -> RunId | None:
    """The run's trace: the entry's pinned ``instance``, else the one the repository's
    ``html_url`` names (:func:`.gitea.repository_instance`); the repository's id. An
    ``html_url`` that does not end in ``full_name`` — the value the entry was matched on —
    draws nothing, pinned or not."""
    repo_id, run = positive_id(get(payload, "repository", "id")), positive_id(run_id)
    named = repository_instance(payload)
    if repo_id is None or run is None:
        return None
    if named is None and get(payload, "repository", "html_url") is not None:
        return None  # html_url names another repository than the one the entry matched
    chosen = instance or named
    return RunId(chosen, repo_id, run) if chosen else None


def _common(payload: dict[str, Any], run: RunId, node: dict[str, Any]) -> dict[str, Attribute]:
    return {
        "cicd.pipeline.run.id": int(run.pipeline_id),
        "vcs.repository.url.full": link_on(text(get(payload, "repository", "html_url"), 1024), run.instance) or "",
        "vcs.ref.head.name": text(node.get("head_branch")) or "",
        "vcs.ref.head.revision": text(node.get("head_sha"), 64) or "",
        "tracegate.project.id": run.project_id,
        "tracegate.actor.login": text(get(payload, "sender", "login")) or "",
    }


def run_span(payload: dict[str, Any], instance: str | None = None) -> CiSpan | Skip:
    node = payload.get("workflow_run")
    if not isinstance(node, dict):
        return Skip("malformed-workflow-run")
    if node.get("status") != "completed":
        return Skip("not-final")
    run = run_of(payload, node.get("id"), instance)
    start = parse_time(node.get("started_at"))
    if run is None or start is None:
        return Skip("malformed-workflow-run")
    conclusion = text(node.get("conclusion"), 32) or "failure"
    result = _RESULTS.get(conclusion, "failure")
    name = text(get(payload, "workflow", "name")) or text(node.get("display_title")) or text(node.get("path"))
    name = name or f"run {run.pipeline_id}"
    attempt = positive_id(node.get("run_attempt")) or "1"
    return CiSpan(
        run=run,
        name=f"workflow {name}",
        start_ns=start,
        end_ns=parse_time(node.get("completed_at")) or start,
        result=result,
        attributes={
            **_common(payload, run, node),
            "cicd.pipeline.name": name,
            "cicd.pipeline.run.url.full": link_on(text(node.get("html_url"), 1024), run.instance) or "",
            "cicd.pipeline.result": result,
            "tracegate.cicd.run.attempt": int(attempt),
            "tracegate.cicd.run.number": int(positive_id(node.get("run_number")) or 0),
            "tracegate.cicd.pipeline.source": text(node.get("event"), 64) or "",
        },
        failure_reason=conclusion if result != "success" else None,
        final_state=f"{conclusion}:{attempt}",
    )


def job_span(payload: dict[str, Any], instance: str | None = None) -> CiSpan | Skip:
    node = payload.get("workflow_job")
    if not isinstance(node, dict):
        return Skip("malformed-workflow-job")
    if node.get("status") != "completed":
        return Skip("not-final")
    run, job_id = run_of(payload, node.get("run_id"), instance), positive_id(node.get("id"))
    created, started = parse_time(node.get("created_at")), parse_time(node.get("started_at"))
    completed = parse_time(node.get("completed_at"))
    start = started or created or completed
    if run is None or job_id is None or start is None:
        return Skip("malformed-workflow-job")
    conclusion = text(node.get("conclusion"), 32) or "failure"
    result = _RESULTS.get(conclusion, "failure")
    attempt = positive_id(node.get("run_attempt")) or "1"
    queued = max(started - created, 0) / 1e9 if started is not None and created is not None else None
    name = text(node.get("name")) or job_id
    events: list[tuple[str, int, dict[str, Attribute]]] = []
    if started is not None:
        events.append(("started", started, {"tracegate.cicd.queued_seconds": queued} if queued is not None else {}))
    listed = node.get("steps")
    steps: list[Any] = listed[:MAX_STEPS] if isinstance(listed, list) else []
    for step in steps:
        at = parse_time(get(step, "started_at"))
        if at is not None:
            outcome = text(get(step, "conclusion"), 32) or text(get(step, "status"), 32) or ""
            events.append((f"step {text(get(step, 'name')) or '?'}", at, {"tracegate.cicd.step.result": outcome}))
    failed_steps = [text(get(s, "name"), 64) or "?" for s in steps if get(s, "conclusion") == "failure"]
    failure = f"{conclusion}: {', '.join(failed_steps)}" if failed_steps else conclusion
    return CiSpan(
        run=run,
        name=f"job {name}",
        start_ns=start,
        end_ns=completed or start,
        result=result,
        attributes={
            **_common(payload, run, node),
            "cicd.pipeline.task.name": name,
            "cicd.pipeline.task.run.id": int(job_id),
            "cicd.pipeline.task.run.url.full": link_on(text(node.get("html_url"), 1024), run.instance) or "",
            "cicd.pipeline.task.run.result": result,
            "cicd.worker.id": positive_id(node.get("runner_id")) or "",
            "cicd.worker.name": text(node.get("runner_name")) or "",
            "tracegate.cicd.run.attempt": int(attempt),
            "tracegate.cicd.queued_seconds": queued if queued is not None else "",
            "tracegate.cicd.failure_reason": failure[:256] if result != "success" else "",
        },
        job_id=job_id,
        attempt=attempt,
        started_ns=started,
        failure_reason=failure[:256] if result != "success" else None,
        final_state=conclusion,
        events=tuple(events),
    )


def spans_for(event: str, payload: dict[str, Any], instance: str | None = None) -> CiSpan | Skip:
    """The span an authentic run or job event draws, in the trace of ``instance`` (the
    entry's pinned one) or, when None, of the instance its ``html_url`` names."""
    return run_span(payload, instance) if event == "workflow_run" else job_span(payload, instance)


async def receive(
    outbox: OutboxStore, hook: WebhookSource, source: str, event: str, payload: dict[str, Any]
) -> tuple[int, str, str, dict[str, Any]]:
    """An authentic workflow_run / workflow_job for ``hook``: (status, decision, reason,
    answer fields) for the Gitea door to answer and record."""
    if event not in hook.events:
        return 202, "ignored", "event-not-listed", {}
    span = spans_for(event, payload, pinned_instance(hook))
    if isinstance(span, Skip):
        return 202, "ignored", span.reason, {}
    [outcome] = await store_spans(outbox, [span], source=source, hook=hook)  # routes.outbox_unavailable: 503
    if outcome != "stored":
        return 202, "ignored", outcome, {"duplicate": True}
    return 202, "accepted", "stored", {}
