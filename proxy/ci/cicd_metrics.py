"""The OpenTelemetry CI/CD metrics of a finished pipeline run (semantic conventions, CICD metrics).

From a run's root span — the one a GitLab pipeline hook, or a GitHub/Gitea ``workflow_run``,
draws (:mod:`.pipeline`) — for an entry with ``metrics: [cicd]``:

* ``cicd.pipeline.run.duration`` (histogram, ``s``) with ``cicd.pipeline.run.state``:
  ``executing`` (with ``cicd.pipeline.result``, and ``error.type`` when the run failed) and, when
  the forge says how long the run waited (GitLab's ``queued_duration``), ``pending`` — the queue
  time, from the event that triggered the run until it started executing.
* ``cicd.pipeline.run.errors`` (counter, ``{error}``) with ``error.type``: one per run whose result
  is ``failure``, ``error`` or ``timeout`` (a cancelled or skipped run is not an error).

Every point carries ``cicd.pipeline.name`` (required by the conventions): the pipeline's name —
GitLab's ``name``, else its project path; GitHub's and Gitea's workflow name — never anything
that names one run (GitLab's fallback ``<path> #<iid>`` loses its ``#<iid>``; a name holding the
run's id becomes the entry's service name). ``error.type`` is the run's result, one of three
values. The resource is the entry's ``service_name``.

One outbox event per run *result*, keyed by the root span's outbox key
(:meth:`.pipeline.CiSpan.outbox_key`): a redelivered or duplicated hook adds nothing; a re-run
that ends with another result is another run (as its root span is sent again).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable

from proxy.ci import metric_points
from proxy.ci.metric_points import RUN_BOUNDS, Point, counter, observation
from proxy.ci.outbox import Added
from proxy.ci.pipeline import CiSpan
from proxy.ci.store import OutboxStore
from proxy.policy.model import WebhookSource

SCOPE = "tracegate.cicd"
DURATION = "cicd.pipeline.run.duration"
ERRORS = "cicd.pipeline.run.errors"
#: Results the conventions count as errors; each is its own ``error.type``.
ERROR_RESULTS = frozenset({"failure", "error", "timeout"})
_NAME_LIMIT = 128


def is_run(span: CiSpan) -> bool:
    """A pipeline run's root span (not a job's, not the Collector's queue or step spans)."""
    return span.job_id is None and span.own_ids is None


def pipeline_name(span: CiSpan, fallback: str) -> str:
    """The run's pipeline name without anything that names the run itself (bounded cardinality)."""
    name = str(span.attributes.get("cicd.pipeline.name") or "")
    iid = str(span.attributes.get("tracegate.cicd.pipeline.iid") or "")
    if iid:
        name = name.removesuffix(f" #{iid}")
    if not name or re.search(rf"\b{re.escape(span.run.pipeline_id)}\b", name):  # "run 22259804324"
        name = fallback
    return name[:_NAME_LIMIT]


def points(span: CiSpan, fallback_name: str) -> list[Point]:
    """The run's points: its executing duration, its queue time when known, an error when it failed."""
    name = pipeline_name(span, fallback_name)
    total = max(span.end_ns - span.start_ns, 0) / 1e9
    queued = span.attributes.get("tracegate.cicd.queued_seconds")
    pending = float(queued) if isinstance(queued, (int, float)) and not isinstance(queued, bool) else None
    executing: dict[str, str] = {
        "cicd.pipeline.name": name,
        "cicd.pipeline.run.state": "executing",
        "cicd.pipeline.result": span.result,
    }
    if span.result in ERROR_RESULTS:
        executing["error.type"] = span.result
    description = "Duration of a pipeline run grouped by pipeline, state and result."
    # A GitLab pipeline's span runs from created_at: its queue time is not execution.
    out = [observation(DURATION, "s", description, executing, max(total - (pending or 0.0), 0.0), RUN_BOUNDS)]
    if pending is not None and pending >= 0:
        state = {"cicd.pipeline.name": name, "cicd.pipeline.run.state": "pending"}
        out.append(observation(DURATION, "s", description, state, pending, RUN_BOUNDS))
    if span.result in ERROR_RESULTS:
        errors = {"cicd.pipeline.name": name, "error.type": span.result}
        out.append(counter(ERRORS, "{error}", "The number of errors encountered in pipeline runs.", errors))
    return out


async def store_run_metrics(
    outbox: OutboxStore,
    span: CiSpan,
    *,
    source: str,
    hook: WebhookSource,
    clock: Callable[[], int] = time.time_ns,
) -> Added | None:
    """Store the run's points as one metrics export under ``hook``'s account, keyed by the run's
    final event; None when ``span`` is not a run's root span."""
    if not is_run(span):
        return None
    key = metric_points.PREFIX + "cicd:" + span.outbox_key(source)
    resource = {"service.name": hook.service_name}
    payload = metric_points.export([(resource, points(span, hook.service_name))], SCOPE, clock())
    return await outbox.add(
        key=key,
        body_digest=hashlib.sha256(key.encode()).hexdigest(),
        source=source,
        service_account=hook.service_account,
        payload=payload,
    )
