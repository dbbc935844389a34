"""``GET /v1/traceparent``: a CI job asks, with its ID token, for its own span's ``traceparent``.

A door like the OTLP ingest: the token is identified and decided by
:func:`proxy.gate.admission.admit` for the ``traces`` signal (a token whose account may not send
traces may not ask). The answer is computed from the *verified* claims only — ``iss`` (the
forge instance), ``project_id`` (``job_project_id`` when present: where the job ran),
``pipeline_id``, ``job_id`` — with the derivation the
webhook side uses for that job's span (:mod:`proxy.ci.pipeline`), so spans the job
exports with this parent nest under its job span in the pipeline's trace:

    export TRACEPARENT=$(curl -fsS -H "Authorization: Bearer $ID_TOKEN" "$TRACEGATE/v1/traceparent")
    export OTEL_RESOURCE_ATTRIBUTES=$(curl -fsS -H "Authorization: Bearer $ID_TOKEN" \\
        "$TRACEGATE/v1/traceparent?format=resource")

GitHub and Forgejo Actions tokens work too (:func:`job_of`): the trace is the run's —
(the repository's web origin, ``repository_id``, ``run_id``) — and the parent is the job's
own span when the token names the job (``check_run_id``, with ``run_attempt``), else the
run's root span, so that the spans of every job of one run share one trace.

Whose ids: the choice (``trace_ids:``, :mod:`.trace_ids`) of the first webhook entry that
names the token's repository — for a GitHub token, a ``source: github`` entry binding its
``repository_id`` (else its name) on its instance — so that the job's spans join the trace
its team draws; ``tracegate`` when no entry names it. With ``otel-collector`` ids the trace
is the Collector githubreceiver's for (``run_id``, ``run_attempt``), the parent its job span
for ``check_run_id`` (else its root span), and ``?step=NAME`` answers the span of the step
of that name instead (its ids are over the raw step name).

``format``: ``traceparent`` (default; ``text/plain``), ``resource`` (``key=value,…`` for
``OTEL_RESOURCE_ATTRIBUTES``, values percent-encoded), ``env`` (``NAME=value`` lines after
the OpenTelemetry environment-variable carrier, spec ``context/env-carriers.md``:
``TRACEPARENT``, ``TRACESTATE`` — empty: the trace is new to the job, and a state left from
another trace must not ride along —, ``OTEL_RESOURCE_ATTRIBUTES``; nothing in them needs
shell quoting, so they can be appended to ``$GITHUB_ENV`` or sourced with ``set -a``) or
``json`` (all of them). Nothing is sent upstream. The ids are not secret (anyone who can
read the pipeline can compute them); the token check is there so the answer is only ever
derived from claims the issuer signed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from aiohttp import web

from proxy.ci import github, trace_ids
from proxy.ci.pipeline import instance_of, pipeline_span_id, trace_id, traceparent
from proxy.doors.ingest import RUNTIME
from proxy.gate.admission import Refused, admit
from proxy.identity.forges import ci_facts, forge_of
from proxy.policy.model import WebhookSource
from proxy.policy.webhooks import pinned_instance, trace_ids_of

FORMATS = ("traceparent", "resource", "env", "json")
#: Longest ``?step=`` name taken (GitHub bounds step names far below this).
MAX_STEP = 512
_MESSAGES = {
    400: "bad request",
    401: "the request's token is missing or invalid",
    403: "this token may not send traces",
    503: "identity provider keys not yet available; retry",
}


def _claim_id(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(text, str) and text.isdecimal() and 0 < len(text) <= 20 and int(text) > 0:
        return str(int(text))
    return None


def job_of(issuer_url: str, claims: Mapping[str, Any]) -> tuple[str, str, str, str | None, str] | None:
    """(instance, project id, pipeline id, job id or None, attempt) from verified claims, or
    None when the token names no CI job. GitLab: ``iss``, ``project_id`` (``job_project_id``
    when present: a fork's merge-request pipeline runs in the parent project, but since
    GitLab 18.2.2 its ``project_*`` claims name the fork), ``pipeline_id``, ``job_id``.
    GitHub/Forgejo: the repository's web origin, ``repository_id``, ``run_id`` and, when the
    token has it, ``check_run_id`` with ``run_attempt``."""
    if "project_path" in claims or "project_id" in claims:
        instance = instance_of(str(claims.get("iss", "")))
        project = "job_project_id" if _claim_id(claims, "job_project_id") else "project_id"
        ids = [_claim_id(claims, name) for name in (project, "pipeline_id", "job_id")]
        if instance is None or ids[0] is None or ids[1] is None or ids[2] is None:
            return None
        return instance, ids[0], ids[1], ids[2], ""
    facts = ci_facts(issuer_url, claims)
    repository, run = _claim_id(claims, "repository_id"), _claim_id(claims, "run_id")
    if facts is None or repository is None or run is None:
        return None
    instance = instance_of(facts.repository_url.removesuffix("/" + facts.repository))
    if instance is None:
        return None
    return instance, repository, run, _claim_id(claims, "check_run_id"), _claim_id(claims, "run_attempt") or "1"


def resource_attributes(claims: Mapping[str, Any], instance: str, issuer_url: str = "") -> str:
    """``OTEL_RESOURCE_ATTRIBUTES`` text tying the job's own telemetry to its run."""
    facts = None if "project_path" in claims else ci_facts(issuer_url, claims)
    repository_url = facts.repository_url if facts is not None else None
    if isinstance(claims.get("project_path"), str):
        repository_url = f"{instance}/{claims['project_path']}"
    values = {
        "cicd.pipeline.run.id": _claim_id(claims, "pipeline_id") or _claim_id(claims, "run_id"),
        "cicd.pipeline.task.run.id": _claim_id(claims, "job_id") or _claim_id(claims, "check_run_id"),
        "vcs.ref.head.name": claims.get("ref"),
        "vcs.ref.head.revision": claims.get("sha"),
        "vcs.repository.url.full": repository_url,
    }
    # Percent-encoded (``~`` too, which quote() keeps): no character a shell reads specially.
    encoded = {k: quote(v[:256], safe="").replace("~", "%7E") for k, v in values.items() if isinstance(v, str) and v}
    return ",".join(f"{k}={v}" for k, v in encoded.items())


def scheme_for(hooks: tuple[WebhookSource, ...], issuer_url: str, claims: Mapping[str, Any], instance: str) -> str:
    """Whose ids the token's job carries: the ``trace_ids:`` of the first entry naming its
    repository on its instance (GitHub tokens: :func:`.github.candidates`, by
    ``repository_id`` first), else tracegate's. Other forges' entries can only choose
    tracegate (``tracegate check`` refuses the rest)."""
    if forge_of(issuer_url, claims) != github.SOURCE:
        return trace_ids.TRACEGATE
    facts = ci_facts(issuer_url, claims)
    name = facts.repository if facts is not None else None
    named = github.candidates(hooks, _claim_id(claims, "repository_id"), name)
    found = [h for h in named if pinned_instance(h) in (None, instance)]
    return trace_ids_of(found[0]) if found else trace_ids.TRACEGATE


def collector_parent(claims: Mapping[str, Any], step: str | None) -> str | None:
    """The W3C ``traceparent`` in the Collector githubreceiver's trace: its job span when the
    token names the job (``check_run_id``), or the named step's span; else the run's root.
    None when the token names no run, or a step without a job."""
    run, attempt = _claim_id(claims, "run_id"), _claim_id(claims, "run_attempt") or "1"
    job = _claim_id(claims, "check_run_id")
    if run is None or (step is not None and job is None):
        return None
    if step is not None and job is not None:
        span = trace_ids.collector_step_span_id(job, step)
    elif job is not None:
        span = trace_ids.collector_job_span_id(job)
    else:
        span = trace_ids.collector_root_span_id(run, attempt)
    return f"00-{trace_ids.collector_trace_id(run, attempt)}-{span}-01"


def _text(status: int, *, retry_after: int | None = None) -> web.Response:
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return web.Response(status=status, text=_MESSAGES[status] + "\n", headers=headers)


async def handle_traceparent(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    fmt = request.query.get("format", "traceparent")
    admitted = await admit(
        runtime, request.headers, request.query, signal="traces", transport="http", mode="traceparent"
    )
    if isinstance(admitted, Refused):
        return _text(admitted.status, retry_after=admitted.retry_after)
    if fmt not in FORMATS:
        admitted.record("refused", "unknown-format")
        return _text(400)
    claims = admitted.identity.claims
    issuer = admitted.policy.issuers.get(admitted.identity.issuer)  # None: an AWS caller, no job claims
    issuer_url = issuer.issuer if issuer is not None else ""
    job = job_of(issuer_url, claims) if issuer is not None else None
    if job is None:
        admitted.record("refused", "token-lacks-job-claims")
        return _text(400)
    step = request.query.get("step")
    if step is not None and (not step or len(step) > MAX_STEP or not step.isprintable()):
        admitted.record("refused", "bad-step")
        return _text(400)
    instance, project_id, pipeline_id, job_id, attempt = job
    scheme = scheme_for(admitted.policy.webhooks, issuer_url, claims, instance)
    if scheme == trace_ids.OTEL_COLLECTOR:
        found = collector_parent(claims, step)
        if found is None:
            admitted.record("refused", "token-lacks-job-claims")
            return _text(400)
        parent = found
    elif step is not None:  # tracegate draws steps as span events: there is no step span to parent on
        admitted.record("refused", "steps-are-not-spans")
        return _text(400)
    elif job_id is not None:
        parent = traceparent(instance, project_id, pipeline_id, job_id, attempt)
    else:  # the token does not name its job: the run's root span
        root = pipeline_span_id(instance, project_id, pipeline_id)
        parent = f"00-{trace_id(instance, project_id, pipeline_id)}-{root}-01"
    admitted.record("allowed", "traceparent")
    if fmt == "traceparent":
        return web.Response(text=parent + "\n")
    resource = resource_attributes(claims, instance, issuer_url)
    if fmt == "resource":
        return web.Response(text=resource + "\n")
    if fmt == "env":
        lines = [f"TRACEPARENT={parent}", "TRACESTATE="]
        lines += [f"OTEL_RESOURCE_ATTRIBUTES={resource}"] if resource else []
        return web.Response(text="\n".join(lines) + "\n")
    body = {"traceparent": parent, "tracestate": "", "otel_resource_attributes": resource, "trace_ids": scheme}
    return web.Response(text=json.dumps(body), content_type="application/json")


def add_traceparent_route(app: web.Application) -> None:
    app.router.add_get("/v1/traceparent", handle_traceparent)
