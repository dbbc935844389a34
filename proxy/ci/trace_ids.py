"""Which trace and span ids a CI run's spans carry: tracegate's own, or another producer's.

A webhook entry chooses (``trace_ids:``), and ``GET /v1/traceparent`` follows the choice of
the entry naming the job's repository, so a job's own spans join whichever trace the team
already has:

``tracegate`` (the default)
    SHA-256 over the NUL-joined (label, forge instance, project id, pipeline id[, job id,
    attempt]), cut to 16 bytes (trace) and 8 bytes (span). One trace per run, every attempt
    of every job a child of the run's root span. Nothing else derives these.

``otel-collector``
    The OpenTelemetry Collector's ``githubreceiver``, exactly
    (opentelemetry-collector-contrib, ``receiver/githubreceiver/trace_event_handling.go``,
    read at commit 0829e775): ``newTraceID`` — the first 32 hex digits of
    sha256(``"<run_id><run_attempt>t"``); ``newParentSpanID`` (the run's root span) — hex
    digits 16–32 of sha256(``"<run_id><run_attempt>s"``); ``newSpanIDFromCheckRun`` (the
    ``receiver.githubreceiver.UseCheckRunID`` feature gate, beta and on by default since
    v0.151.0) — hex digits 16–32 of sha256(``"<check_run_id>-j"``) for the job,
    ``"<check_run_id>-q"`` for its queue span, ``"<check_run_id>-<step name>-s"`` for a step
    (the raw step name: steps sharing a name share a span id there, and tracegate sends the
    first of them only). ``check_run_id`` is the webhook's ``workflow_job.id`` and the ID
    token's ``check_run_id`` claim (GitHub, since 2025-11-13). Each run *attempt* is its own
    trace. The numbers are written in decimal without padding, as Go's ``%d`` does.
    GitHub runs only: the Collector's ``gitlabreceiver`` keys its trace on a pipeline's
    ``finished_at`` (``receiver/gitlabreceiver/traces_event_handling.go``, ``newTraceID``:
    sha256(``"<pipeline id>t<finished_at>"``) — "not possible to create the traceID during a
    pipeline execution", its comment says), which a running job cannot know; and Gitea and
    Forgejo tokens name no job.

``gitlab``
    GitLab's CI Job Telemetry takes its trace id from the *root* pipeline's id, but GitLab has
    not published how (gitlab-org/gitlab#590587 gives "zero-padded hex" only as an example,
    and the job span ids are Rails-internal), and a job of a child pipeline cannot learn its
    root pipeline's id from its ID token. ``tracegate check`` refuses the choice
    (:func:`proxy.policy.webhooks.trace_ids_problem`, where the choices are validated) rather
    than draw a trace that only might coincide.

The ids are not secret, only stable: anyone who can read the run can compute them.
"""

from __future__ import annotations

import hashlib

from proxy.policy.webhooks import TRACE_IDS

TRACEGATE, OTEL_COLLECTOR, GITLAB = TRACE_IDS
DEFAULT = TRACEGATE


def _nonzero(value: str) -> str:
    """W3C Trace Context forbids all-zero ids; a digest that is one becomes all ones."""
    return value if value.strip("0") else "1" * len(value)


def _tracegate(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def trace_id(instance: str, project_id: str, pipeline_id: str) -> str:
    """tracegate: the run's trace, 32 hex digits."""
    return _nonzero(_tracegate("tracegate-cicd-trace", instance, project_id, pipeline_id)[:32])


def pipeline_span_id(instance: str, project_id: str, pipeline_id: str) -> str:
    """tracegate: the run's root span."""
    return _nonzero(_tracegate("tracegate-cicd-pipeline", instance, project_id, pipeline_id)[:16])


def job_span_id(instance: str, project_id: str, pipeline_id: str, job_id: str, attempt: str = "") -> str:
    """tracegate: a job attempt's span. GitLab: ``attempt`` is empty (every retry is a new job
    id); GitHub, Gitea, Forgejo: the ``run_attempt``."""
    return _nonzero(_tracegate("tracegate-cicd-job", instance, project_id, pipeline_id, job_id, attempt)[:16])


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def collector_trace_id(run_id: str, run_attempt: str) -> str:
    """githubreceiver ``newTraceID``: sha256(``"<run_id><run_attempt>t"``)[:32]."""
    return _sha256_hex(f"{run_id}{run_attempt}t")[:32]


def collector_root_span_id(run_id: str, run_attempt: str) -> str:
    """githubreceiver ``newParentSpanID``: sha256(``"<run_id><run_attempt>s"``)[16:32]."""
    return _sha256_hex(f"{run_id}{run_attempt}s")[16:32]


def collector_job_span_id(check_run_id: str) -> str:
    """githubreceiver ``newSpanIDFromCheckRun("<check_run_id>-j")``."""
    return _sha256_hex(f"{check_run_id}-j")[16:32]


def collector_queue_span_id(check_run_id: str) -> str:
    """githubreceiver ``newSpanIDFromCheckRun("<check_run_id>-q")``."""
    return _sha256_hex(f"{check_run_id}-q")[16:32]


def collector_step_span_id(check_run_id: str, step_name: str) -> str:
    """githubreceiver ``newSpanIDFromCheckRun("<check_run_id>-<step name>-s")``, the raw name."""
    return _sha256_hex(f"{check_run_id}-{step_name}-s")[16:32]
