"""GitHub, Gitea and Forgejo Actions: ``workflow_run`` and ``workflow_job`` → a run's spans.

Gitea ≥ 1.24 sends both (``modules/structs/hook.go``: ``WorkflowRunPayload``,
``WorkflowJobPayload``; ``repo_actions.go``: ``ActionWorkflowRun``, ``ActionWorkflowJob``)
in GitHub's shape, which GitHub documents (webhook events and payloads: ``workflow_run``,
``workflow_job``); the one difference read here is the run's times — GitHub's run has
``run_started_at`` and ``updated_at`` (no ``completed_at``): :data:`RUN_TIMES`. Each door
calls :func:`receive` once the signature verified. The model is GitLab's
(:mod:`.pipeline`): the trace is (instance — the entry's ``instance:``, else the one the
repository's ``html_url`` names —, repository id, run id); the run is the root span;
each job attempt (job id, ``run_attempt``) is a child span from ``started_at`` to
``completed_at``, its queued time ``started_at - created_at``, its steps span events.
With ``trace_ids: otel-collector`` the ids and the job's shape are the Collector
githubreceiver's (:mod:`.trace_ids`): the job span from ``created_at``, a queue span and a
span per step under it. Unset times (Gitea: Go's zero time ``0001-01-01T00:00:00Z``;
GitHub: null) count as absent. Only ``completed`` events draw spans.

Forgejo's own Actions events (``X-Forgejo-Event``; ``modules/structs/hook.go``, ``action.go``;
``services/webhook/notifier.go``) are mapped to the same model (:func:`listed_as`):
``action_run_success|failure|recover`` (``{action, run, prior_status}``, deprecated in newer
releases, which send them alongside), ``workflow_run_<status>`` (``{action: new_run_attempt
| run_status_changed | run_completed, run}``) and ``workflow_job_<status>`` (``{action:
new_job_attempt | job_status_changed | job_completed, job, run}``), ``<status>`` one of
Forgejo's (:data:`FORGEJO_STATUSES`). ``run`` is an ``ActionRun`` — ``id``,
``repository`` (the only one: :func:`with_repository`), ``workflow_id``, ``index_in_repo``,
``trigger_user``, ``prettyref``, ``commit_sha``, ``trigger_event``, ``status``, ``started``
→ ``stopped``, ``created``, ``html_url`` —; ``job`` an ``ActionRunJob`` — ``id``,
``attempt``, ``name``, ``html_url``, ``status``, and in some releases ``started``,
``stopped``, ``created``. Both name one attempt's final state in ``status`` (``success``,
``failure``, ``cancelled``, ``skipped``). A job without times draws nothing
(``job-without-times``): its run's root span still comes. An ``ActionRun`` names no
attempt, so a re-run that ends as the one before is the same root span, as on GitLab.
Forgejo's Gitea-shaped ``workflow_job`` names the final state in ``status`` too, without
``conclusion``: read as one.
"""

from __future__ import annotations

from typing import Any

from proxy.ci import trace_ids
from proxy.ci.ci_outbox import store_spans
from proxy.ci.gitea import repository_instance
from proxy.ci.payload import Skip, get, positive_id, text
from proxy.ci.pipeline import Attribute, CiSpan, RunId, link_on, parse_time
from proxy.ci.store import OutboxStore
from proxy.policy.model import WebhookSource
from proxy.policy.webhooks import pinned_instance, trace_ids_of

EVENTS = ("workflow_run", "workflow_job")
#: Forgejo's Actions statuses (``models/actions/status.go``) and the results of the final ones.
FORGEJO_STATUSES = ("unknown", "success", "failure", "cancelled", "skipped", "waiting", "running", "blocked")
FORGEJO_FINAL = {"success": "success", "failure": "failure", "cancelled": "cancellation", "skipped": "skip"}
#: Forgejo's deprecated run events, listed in ``events:`` as ``action_run``.
ACTION_RUN_EVENTS = ("action_run_success", "action_run_failure", "action_run_recover")
MAX_STEPS = 100
_RESULTS = {
    "success": "success",
    "neutral": "success",
    "failure": "failure",
    "cancelled": "cancellation",
    "canceled": "cancellation",
    "skipped": "skip",
    "timed_out": "timeout",
    "startup_failure": "error",  # GitHub: the workflow could not start (semconv: an error of the CI system)
    "stale": "cancellation",  # GitHub: superseded
}
#: Where a run's start and end are, per forge: Gitea's run names them as its jobs do.
RUN_TIMES = {"github": ("run_started_at", "updated_at")}
GITEA_RUN_TIMES = ("started_at", "completed_at")


def listed_as(event: str) -> str | None:
    """The ``events:`` name an Actions event header is listed as — ``workflow_run``,
    ``workflow_job`` (Gitea's, GitHub's, and Forgejo's ``workflow_run_<status>`` /
    ``workflow_job_<status>``) or ``action_run`` — or None when it is no Actions event."""
    if event in EVENTS:
        return event
    if event in ACTION_RUN_EVENTS:
        return "action_run"
    family, _, status = event.rpartition("_")
    return family if family in EVENTS and status in FORGEJO_STATUSES else None


def with_repository(payload: dict[str, Any]) -> dict[str, Any]:
    """Forgejo's own run and job payloads name their repository inside ``run`` only: the
    payload with it on top, where the doors match the entry and the trace takes its id (one
    node for both). Any payload that has a ``repository`` of its own is returned as it is."""
    inner = get(payload, "run", "repository")
    if "repository" in payload or not isinstance(inner, dict):
        return payload
    return {**payload, "repository": inner}


def run_of(
    payload: dict[str, Any],
    run_id: Any,
    instance: str | None = None,
    *,
    scheme: str = trace_ids.TRACEGATE,
    attempt: str = "1",
) -> RunId | None:
    """The run's trace: the entry's pinned ``instance``, else the one the repository's
    ``html_url`` names (:func:`.gitea.repository_instance`); the repository's id; the ids of
    ``scheme`` (``attempt``: the run attempt, which ``otel-collector`` ids key on). An
    ``html_url`` that does not end in ``full_name`` — the value the entry was matched on —
    draws nothing, pinned or not."""
    repo_id, run = positive_id(get(payload, "repository", "id")), positive_id(run_id)
    named = repository_instance(payload)
    if repo_id is None or run is None:
        return None
    if named is None and get(payload, "repository", "html_url") is not None:
        return None  # html_url names another repository than the one the entry matched
    chosen = instance or named
    return RunId(chosen, repo_id, run, scheme, attempt) if chosen else None


def _common(
    payload: dict[str, Any], run: RunId, node: dict[str, Any], *, forgejo: bool = False
) -> dict[str, Attribute]:
    """The attributes every span of a run carries; Forgejo's own run payload names the ref,
    the commit and the actor by other fields than Gitea's and GitHub's."""
    branch, sha = ("prettyref", "commit_sha") if forgejo else ("head_branch", "head_sha")
    actor = get(node, "trigger_user", "login") if forgejo else get(payload, "sender", "login")
    return {
        "cicd.pipeline.run.id": int(run.pipeline_id),
        "vcs.repository.url.full": link_on(text(get(payload, "repository", "html_url"), 1024), run.instance) or "",
        "vcs.ref.head.name": text(node.get(branch)) or "",
        "vcs.ref.head.revision": text(node.get(sha), 64) or "",
        "tracegate.project.id": run.project_id,
        "tracegate.actor.login": text(actor) or "",
    }


def run_span(
    payload: dict[str, Any], instance: str | None = None, *, source: str = "gitea", scheme: str = trace_ids.TRACEGATE
) -> CiSpan | Skip:
    node = payload.get("workflow_run")
    if not isinstance(node, dict):
        return Skip("malformed-workflow-run")
    if node.get("status") != "completed":
        return Skip("not-final")
    attempt = positive_id(node.get("run_attempt")) or "1"
    run = run_of(payload, node.get("id"), instance, scheme=scheme, attempt=attempt)
    began, ended = RUN_TIMES.get(source, GITEA_RUN_TIMES)
    start = parse_time(node.get(began))
    if run is None or start is None:
        return Skip("malformed-workflow-run")
    conclusion = text(node.get("conclusion"), 32) or "failure"
    result = _RESULTS.get(conclusion, "failure")
    name = text(get(payload, "workflow", "name")) or text(node.get("name")) or text(node.get("display_title"))
    name = name or text(node.get("path")) or f"run {run.pipeline_id}"
    return CiSpan(
        run=run,
        name=f"workflow {name}",
        start_ns=start,
        end_ns=parse_time(node.get(ended)) or start,
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


def job_span(
    payload: dict[str, Any], instance: str | None = None, *, scheme: str = trace_ids.TRACEGATE
) -> CiSpan | Skip:
    node = payload.get("workflow_job")
    if not isinstance(node, dict):
        return Skip("malformed-workflow-job")
    status = text(node.get("status"), 32) or ""
    if status in FORGEJO_FINAL and not node.get("conclusion"):  # Forgejo's: the status is the outcome
        node = {**node, "status": "completed", "conclusion": status}
    elif status != "completed":
        return Skip("not-final")
    attempt = positive_id(node.get("run_attempt")) or "1"
    run = run_of(payload, node.get("run_id"), instance, scheme=scheme, attempt=attempt)
    job_id = positive_id(node.get("id"))
    created, started = parse_time(node.get("created_at")), parse_time(node.get("started_at"))
    completed = parse_time(node.get("completed_at"))
    start = started or created or completed
    if run is None or job_id is None or start is None:
        return Skip("malformed-workflow-job")
    conclusion = text(node.get("conclusion"), 32) or "failure"
    result = _RESULTS.get(conclusion, "failure")
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
    failed_steps = [
        text(get(s, "name"), 64) or "?" for s in steps if (get(s, "conclusion") or get(s, "status")) == "failure"
    ]
    failure = f"{conclusion}: {', '.join(failed_steps)}" if failed_steps else conclusion
    inner: tuple[CiSpan, ...] = ()
    if scheme == trace_ids.OTEL_COLLECTOR:  # the Collector's shape: created → completed, queue and steps as spans
        start = created or start
        inner = _collector_inner(run, job_id, created, started, steps)
        events = events[:1] if started is not None else []
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
        inner=inner,
    )


def forgejo_run_span(
    payload: dict[str, Any], instance: str | None = None, *, scheme: str = trace_ids.TRACEGATE
) -> CiSpan | Skip:
    """A Forgejo ``action_run_*`` or ``workflow_run_<status>`` payload's root span."""
    node = payload.get("run")
    if not isinstance(node, dict):
        return Skip("malformed-workflow-run")
    status = text(node.get("status"), 32) or ""
    result = FORGEJO_FINAL.get(status)
    if result is None:
        return Skip("not-final")
    run = run_of(payload, node.get("id"), instance, scheme=scheme)
    start = parse_time(node.get("started")) or parse_time(node.get("created"))
    if run is None or start is None:
        return Skip("malformed-workflow-run")
    name = text(node.get("workflow_id")) or text(node.get("title")) or f"run {run.pipeline_id}"
    return CiSpan(
        run=run,
        name=f"workflow {name}",
        start_ns=start,
        end_ns=parse_time(node.get("stopped")) or start,
        result=result,
        attributes={
            **_common(payload, run, node, forgejo=True),
            "cicd.pipeline.name": name,
            "cicd.pipeline.run.url.full": link_on(text(node.get("html_url"), 1024), run.instance) or "",
            "cicd.pipeline.result": result,
            "tracegate.cicd.run.number": int(positive_id(node.get("index_in_repo")) or 0),
            "tracegate.cicd.pipeline.source": text(node.get("trigger_event"), 64) or text(node.get("event"), 64) or "",
        },
        failure_reason=status if result != "success" else None,
        final_state=status,
    )


def forgejo_job_span(
    payload: dict[str, Any], instance: str | None = None, *, scheme: str = trace_ids.TRACEGATE
) -> CiSpan | Skip:
    """A Forgejo ``workflow_job_<status>`` payload's job attempt span: (job id, ``attempt``),
    timed by the job's own ``started`` → ``stopped`` when the release sends them."""
    job, node = payload.get("job"), payload.get("run")
    if not isinstance(job, dict) or not isinstance(node, dict):
        return Skip("malformed-workflow-job")
    status = text(job.get("status"), 32) or ""
    result = FORGEJO_FINAL.get(status)
    if result is None:
        return Skip("not-final")
    attempt = positive_id(job.get("attempt")) or "1"
    run, job_id = run_of(payload, node.get("id"), instance, scheme=scheme, attempt=attempt), positive_id(job.get("id"))
    named_run = positive_id(job.get("run_id"))
    if run is None or job_id is None or (named_run is not None and named_run != run.pipeline_id):
        return Skip("malformed-workflow-job")
    created, started = parse_time(job.get("created")), parse_time(job.get("started"))
    completed = parse_time(job.get("stopped"))
    start = started or completed
    if start is None:
        return Skip("job-without-times")
    queued = max(started - created, 0) / 1e9 if started is not None and created is not None else None
    name = text(job.get("name")) or job_id
    return CiSpan(
        run=run,
        name=f"job {name}",
        start_ns=start,
        end_ns=completed or start,
        result=result,
        attributes={
            **_common(payload, run, node, forgejo=True),
            "cicd.pipeline.task.name": name,
            "cicd.pipeline.task.run.id": int(job_id),
            "cicd.pipeline.task.run.url.full": link_on(text(job.get("html_url"), 1024), run.instance) or "",
            "cicd.pipeline.task.run.result": result,
            "tracegate.cicd.run.attempt": int(attempt),
            "tracegate.cicd.queued_seconds": queued if queued is not None else "",
            "tracegate.cicd.failure_reason": status if result != "success" else "",
        },
        job_id=job_id,
        attempt=attempt,
        started_ns=started,
        failure_reason=status if result != "success" else None,
        final_state=status,
        events=(("started", started, {"tracegate.cicd.queued_seconds": queued} if queued is not None else {}),)
        if started is not None
        else (),
    )


def _collector_inner(
    run: RunId, job_id: str, created: int | None, started: int | None, steps: list[Any]
) -> tuple[CiSpan, ...]:
    """The githubreceiver's queue span (``created_at`` → ``started_at``) and one span per step,
    children of the job's span, with its ids (:mod:`.trace_ids`). A step's id is over its raw
    name, so steps sharing a name share an id there: only the first of them is sent. Times
    in reverse order become a zero-length span at the earlier one's place, as the Collector's
    ``correctActionTimestamps`` does."""
    parent = run.job_span_id(job_id)
    out: list[CiSpan] = []
    if created is not None and started is not None:
        own = (trace_ids.collector_queue_span_id(job_id), parent)
        attributes: dict[str, Attribute] = {"tracegate.cicd.queued_seconds": max(started - created, 0) / 1e9}
        out.append(_inner(run, job_id, "queue", created, max(started, created), "success", attributes, own))
    seen: set[str] = set()
    for step in steps:
        raw, at = get(step, "name"), parse_time(get(step, "started_at"))
        if not isinstance(raw, str) or raw in seen or at is None:
            continue
        seen.add(raw)
        outcome = text(get(step, "conclusion"), 32)
        result = _RESULTS.get(outcome, "failure") if outcome else "skip"
        end = parse_time(get(step, "completed_at")) or at
        own = (trace_ids.collector_step_span_id(job_id, raw), parent)
        attributes = {"tracegate.cicd.step.number": int(positive_id(get(step, "number")) or 0)}
        out.append(_inner(run, job_id, f"step {raw[:200]}", at, max(end, at), result, attributes, own))
    return tuple(out)


def _inner(
    run: RunId,
    job_id: str,
    name: str,
    start: int,
    end: int,
    result: str,
    attributes: dict[str, Attribute],
    own: tuple[str, str],
) -> CiSpan:
    return CiSpan(
        run=run,
        name=name,
        start_ns=start,
        end_ns=end,
        result=result,
        attributes={**attributes, "cicd.pipeline.task.run.result": result},
        job_id=job_id,
        failure_reason=result if result != "success" else None,
        own_ids=own,
    )


def spans_for(
    event: str,
    payload: dict[str, Any],
    instance: str | None = None,
    *,
    source: str = "gitea",
    scheme: str = trace_ids.TRACEGATE,
) -> CiSpan | Skip:
    """The span an authentic run or job event of ``source`` draws, in the trace of
    ``instance`` (the entry's pinned one) or, when None, of the instance its ``html_url``
    names, with the ids of ``scheme`` (the entry's ``trace_ids:``). Gitea's and GitHub's
    shape (``workflow_run`` / ``workflow_job`` objects) or Forgejo's (``run`` / ``job``)."""
    listed, payload = listed_as(event), with_repository(payload)
    if listed == "workflow_job":
        if "workflow_job" in payload or "job" not in payload:
            return job_span(payload, instance, scheme=scheme)
        return forgejo_job_span(payload, instance, scheme=scheme)
    if listed == "workflow_run" and ("workflow_run" in payload or "run" not in payload):
        return run_span(payload, instance, source=source, scheme=scheme)
    if listed is not None:
        return forgejo_run_span(payload, instance, scheme=scheme)
    return Skip("event-not-listed")


async def receive(
    outbox: OutboxStore, hook: WebhookSource, source: str, event: str, payload: dict[str, Any]
) -> tuple[int, str, str, dict[str, Any]]:
    """An authentic workflow_run / workflow_job for ``hook``: (status, decision, reason,
    answer fields) for the Gitea or GitHub door to answer and record."""
    if listed_as(event) not in hook.events:
        return 202, "ignored", "event-not-listed", {}
    span = spans_for(event, payload, pinned_instance(hook), source=source, scheme=trace_ids_of(hook))
    if isinstance(span, Skip):
        return 202, "ignored", span.reason, {}
    [outcome] = await store_spans(outbox, [span], source=source, hook=hook)  # routes.outbox_unavailable: 503
    if outcome != "stored":
        return 202, "ignored", outcome, {"duplicate": True}
    return 202, "accepted", "stored", {}
