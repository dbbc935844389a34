"""GitLab pipeline and job hooks → the spans of a pipeline's trace (:mod:`.pipeline`).

Payload shapes follow GitLab's webhook events documentation and its data builders
(``lib/gitlab/data_builder/pipeline.rb``, ``build.rb``); ``examples/webhooks/`` holds one
of each. A **Pipeline Hook** (``object_kind: pipeline``) gives the root span: its
``object_attributes`` from ``created_at`` to ``finished_at`` (written ``2016-08-12 15:23:28
UTC``). A **Job Hook** (``object_kind: build``) gives one job attempt's span from
``build_started_at`` to ``build_finished_at`` (ISO 8601; the ``*_iso`` variants are
preferred when present). A retried job is a new job id, so each attempt is its own span.

Only final states draw spans (``success``, ``failed``, ``canceled``, ``skipped``); GitLab's
intermediate events (``created``, ``pending``, ``running``…) are acknowledged and ignored.
When an entry does not subscribe to job events, the pipeline hook's ``builds[]`` give the job
spans instead — but ``builds[]`` holds only the latest attempt of each job, so retried
attempts are then missing: subscribe to Job events for them.

A downstream pipeline (``source: parent_pipeline`` for a child pipeline, ``pipeline`` for a
multi-project one) carries ``source_pipeline``: the upstream ``project`` (``id``,
``web_url``, ``path_with_namespace``), its ``pipeline_id`` and the ``job_id`` of the trigger
job (``lib/gitlab/data_builder/pipeline.rb``, ``source_pipeline_attrs``). Its root span is
then drawn twice: in its own trace, as every downstream job hook and ID token name it (a
job hook carries no ``source_pipeline``, a token no upstream ids), and in the upstream
pipeline's trace as a child of the trigger job's span (:class:`.pipeline.Upstream`), each
linked to the other — the second as an ``inner`` span of the first, so that both travel in
one outbox row and the run is still one run (one root, for its metrics too). GitLab sends no
hook for a trigger job (``Ci::Bridge#execute_hooks`` raises ``NotImplementedError``;
``builds[]`` lists builds only), so that parent span is never drawn: the downstream root
hangs under an id the upstream trace does not hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from proxy.ci.payload import Skip, get, positive_id, text
from proxy.ci.pipeline import Attribute, CiSpan, RunId, Upstream, instance_of, link_on, origin_of, parse_time

FINAL = frozenset({"success", "failed", "canceled", "skipped"})
TIMEOUT_REASONS = frozenset({"job_execution_timeout", "stuck_or_timeout_failure"})
#: X-Gitlab-Event values this door takes, and the ``events:`` name each one is listed as.
EVENTS = {"Pipeline Hook": "pipeline", "Job Hook": "job"}


@dataclass(frozen=True)
class Spans:
    kind: str  # pipeline or job
    spans: list[CiSpan]


def _number(value: Any) -> float | None:
    """A finite duration in seconds (GitLab sends numbers; a NaN would make the export invalid JSON)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def project_of(payload: dict[str, Any]) -> tuple[str | None, str | None]:
    """(project id, ``path_with_namespace``) of a pipeline or job hook, for matching an entry."""
    project_id = positive_id(get(payload, "project", "id")) or positive_id(payload.get("project_id"))
    return project_id, text(get(payload, "project", "path_with_namespace"), 512)


def instance_for(payload: dict[str, Any], header: str | None) -> str | None:
    """The GitLab instance's base URL as the sender names it: ``X-Gitlab-Instance`` when
    sent, else the project's ``web_url`` without its path (a relative-URL install keeps its
    prefix). An entry with ``instance:`` pins it instead (the door decides)."""
    if header:
        return instance_of(header)
    web = text(get(payload, "project", "web_url"), 1024) or text(get(payload, "repository", "homepage"), 1024)
    if web is None:
        return None
    path = text(get(payload, "project", "path_with_namespace"), 512)
    if path and web.rstrip("/").endswith("/" + path):
        return instance_of(web.rstrip("/")[: -len(path) - 1])
    return origin_of(web)


def result_of(status: str, failure_reason: str | None) -> str:
    if status == "success":
        return "success"
    if status == "canceled":
        return "cancellation"
    if status == "skipped":
        return "skip"
    return "timeout" if failure_reason in TIMEOUT_REASONS else "failure"


def _web(payload: dict[str, Any], instance: str) -> str | None:
    """The project's web URL, when it is on ``instance`` (links never name another host)."""
    web = text(get(payload, "project", "web_url"), 1024) or text(get(payload, "repository", "homepage"), 1024)
    return link_on(web, instance)


def _common(payload: dict[str, Any], run: RunId, ref: str | None, sha: str | None) -> dict[str, Attribute]:
    web = _web(payload, run.instance)
    return {
        "cicd.pipeline.run.id": int(run.pipeline_id),
        "vcs.repository.url.full": web or "",
        "vcs.ref.head.name": ref or "",
        "vcs.ref.head.revision": sha or "",
        "tracegate.project.id": run.project_id,
    }


def _job_span(
    run: RunId,
    common: dict[str, Attribute],
    *,
    job_id: str,
    name: str,
    stage: str | None,
    status: str,
    created: int | None,
    started: int | None,
    finished: int | None,
    queued: float | None,
    failure: str | None,
    runner: Any,
    user: str | None,
    url: str | None,
) -> CiSpan | Skip:
    start = started or created or finished
    if start is None:
        return Skip("job-without-times")
    end = finished or start
    if queued is None and started is not None and created is not None:
        queued = max(started - created, 0) / 1e9
    result = result_of(status, failure)
    attributes: dict[str, Attribute] = {
        **common,
        "cicd.pipeline.task.name": name,
        "cicd.pipeline.task.run.id": int(job_id),
        "cicd.pipeline.task.run.url.full": url or "",
        "cicd.pipeline.task.run.result": result,
        "cicd.worker.id": positive_id(get(runner, "id")) or "",
        "cicd.worker.name": text(get(runner, "description")) or "",
        "tracegate.cicd.stage": stage or "",
        "tracegate.cicd.queued_seconds": queued if queued is not None else "",
        "tracegate.actor.login": user or "",
        "tracegate.cicd.failure_reason": failure if result != "success" and failure else "",
    }
    events: tuple[tuple[str, int, dict[str, Attribute]], ...] = ()
    if started is not None:
        events = (("started", started, {"tracegate.cicd.queued_seconds": queued} if queued is not None else {}),)
    return CiSpan(
        run=run,
        name=f"job {name}",
        start_ns=start,
        end_ns=end,
        result=result,
        attributes=attributes,
        job_id=job_id,
        started_ns=started,
        failure_reason=failure if result != "success" else None,
        final_state=status,
        events=events,
    )


def upstream_of(payload: dict[str, Any], run: RunId) -> Upstream | None:
    """The trigger job of a downstream pipeline, from ``source_pipeline``, on ``run``'s
    instance (a multi-project pipeline's upstream is on the same GitLab); None when the
    hook names none, or names the pipeline itself."""
    source = payload.get("source_pipeline")
    project = positive_id(get(source, "project", "id"))
    pipeline, job = positive_id(get(source, "pipeline_id")), positive_id(get(source, "job_id"))
    if project is None or pipeline is None or job is None or (project, pipeline) == (run.project_id, run.pipeline_id):
        return None
    return Upstream(RunId(run.instance, project, pipeline, run.scheme), job)


def pipeline_spans(payload: dict[str, Any], instance: str, *, with_jobs: bool) -> Spans | Skip:
    attrs = payload.get("object_attributes")
    project_id, path = project_of(payload)
    if not isinstance(attrs, dict) or project_id is None:
        return Skip("malformed-pipeline")
    pipeline_id, status = positive_id(attrs.get("id")), text(attrs.get("status"), 32)
    if pipeline_id is None or status is None:
        return Skip("malformed-pipeline")
    if status not in FINAL:
        return Skip("not-final")
    created, finished = parse_time(attrs.get("created_at")), parse_time(attrs.get("finished_at"))
    if created is None:
        return Skip("malformed-pipeline")
    run = RunId(instance, project_id, pipeline_id)
    ref, sha = text(attrs.get("ref")), text(attrs.get("sha"), 64)
    common = _common(payload, run, ref, sha)
    upstream = upstream_of(payload, run)
    listed = payload.get("builds")
    builds = [b for b in listed if isinstance(b, dict)] if isinstance(listed, list) else []
    failed = [
        f"{text(b.get('name'), 64)}: {text(b.get('failure_reason'), 64) or 'failed'}"
        for b in builds
        if b.get("status") == "failed" and not b.get("allow_failure")
    ]
    name = text(attrs.get("name")) or f"{path or project_id} #{positive_id(attrs.get('iid')) or pipeline_id}"
    result = result_of(status, None)
    root = CiSpan(
        run=run,
        name=f"pipeline {name}",
        start_ns=created,
        end_ns=finished or created,
        result=result,
        attributes={
            **common,
            "cicd.pipeline.name": name,
            "cicd.pipeline.run.url.full": link_on(text(attrs.get("url"), 1024), instance) or "",
            "cicd.pipeline.result": result,
            "tracegate.cicd.pipeline.iid": positive_id(attrs.get("iid")) or "",
            "tracegate.cicd.pipeline.source": text(attrs.get("source"), 64) or "",
            "tracegate.cicd.queued_seconds": q if (q := _number(attrs.get("queued_duration"))) is not None else "",
            "tracegate.actor.login": text(get(payload, "user", "username")) or "",
            "vcs.ref.head.type": "tag" if attrs.get("tag") is True else "branch",
            "tracegate.cicd.upstream.project.id": upstream.run.project_id if upstream else "",
            "tracegate.cicd.upstream.pipeline.id": upstream.run.pipeline_id if upstream else "",
            "tracegate.cicd.upstream.job.id": upstream.job_id if upstream else "",
        },
        failure_reason="; ".join(failed)[:256] if result == "failure" and failed else None,
        final_state=status,
        links=((upstream.run.trace_id, upstream.span_id),) if upstream else (),
    )
    if upstream is not None:  # the same root in the upstream trace, under the trigger job: one row, one run
        root = replace(root, inner=(replace(root, upstream=upstream, links=((run.trace_id, run.root_span_id),)),))
    spans = [root]
    if with_jobs:
        web = _web(payload, instance)
        for build in builds:
            job_id, job_status = positive_id(build.get("id")), text(build.get("status"), 32)
            if job_id is None or job_status not in FINAL:
                continue
            span = _job_span(
                run,
                common,
                job_id=job_id,
                name=text(build.get("name")) or job_id,
                stage=text(build.get("stage")),
                status=job_status,
                created=parse_time(build.get("created_at")),
                started=parse_time(build.get("started_at")),
                finished=parse_time(build.get("finished_at")),
                queued=_number(build.get("queued_duration")),
                failure=text(build.get("failure_reason"), 128),
                runner=build.get("runner"),
                user=text(get(build, "user", "username")),
                url=f"{web}/-/jobs/{job_id}" if web else None,
            )
            if isinstance(span, CiSpan):
                spans.append(span)
    return Spans("pipeline", spans)


def job_spans(payload: dict[str, Any], instance: str) -> Spans | Skip:
    project_id, _path = project_of(payload)
    job_id, pipeline_id = positive_id(payload.get("build_id")), positive_id(payload.get("pipeline_id"))
    status = text(payload.get("build_status"), 32)
    if project_id is None or job_id is None or pipeline_id is None or status is None:
        return Skip("malformed-job")
    if status not in FINAL:
        return Skip("not-final")
    run = RunId(instance, project_id, pipeline_id)

    def when(name: str) -> int | None:
        return parse_time(payload.get(f"{name}_iso")) or parse_time(payload.get(name))

    web = _web(payload, instance)
    span = _job_span(
        run,
        _common(payload, run, text(payload.get("ref")), text(payload.get("sha"), 64)),
        job_id=job_id,
        name=text(payload.get("build_name")) or job_id,
        stage=text(payload.get("build_stage")),
        status=status,
        created=when("build_created_at"),
        started=when("build_started_at"),
        finished=when("build_finished_at"),
        queued=_number(payload.get("build_queued_duration")),
        failure=text(payload.get("build_failure_reason"), 128),
        runner=payload.get("runner"),
        user=text(get(payload, "user", "username")),
        url=f"{web}/-/jobs/{job_id}" if web else None,
    )
    return span if isinstance(span, Skip) else Spans("job", [span])


def spans_for(event: str, payload: dict[str, Any], instance: str, *, with_jobs: bool) -> Spans | Skip:
    """The spans an authentic hook draws, in the trace of ``instance`` (the entry's pinned
    one, else the sender's); payload URLs on another host are left out. ``with_jobs``:
    take job spans from a pipeline hook's ``builds[]`` (when the entry does not listen to
    job events)."""
    if event == "Pipeline Hook" and payload.get("object_kind") == "pipeline":
        return pipeline_spans(payload, instance, with_jobs=with_jobs)
    if event == "Job Hook" and payload.get("object_kind") == "build":
        return job_spans(payload, instance)
    return Skip("event-not-listed")
