"""The trace of one CI pipeline run: ids, spans, and their OTLP/JSON encoding.

One run is one trace. Its id derives from (forge instance, project id, pipeline id) alone,
so every event of the run — a GitLab pipeline or job hook, a Gitea ``workflow_run`` or
``workflow_job``, a job's own ``/v1/traceparent`` request with its ID token — names the
same trace whatever order they arrive in and whichever replica takes them. The pipeline is
the root span; each job *attempt* is a child span (a GitLab retry is a new job id; a Gitea
re-run is the same job id with a new ``run_attempt``).

``instance`` is the forge's base URL as its ID tokens name it in ``iss`` (GitLab:
``https://gitlab.example.com``); :func:`instance_of` normalises any URL of the forge to it.
A webhook entry's ``instance:`` pins it; without one it is the sender's word
(``X-Gitlab-Instance``, a payload URL). Either way a span's links are kept only on that
instance (:func:`link_on`).
Which ids a run's spans carry is the webhook entry's choice (``trace_ids:``,
:mod:`.trace_ids`): tracegate's own (SHA-256 over the NUL-joined parts, the default) or
the OpenTelemetry Collector githubreceiver's, so that its traces and tracegate's coincide.
Not secret, only stable — anyone who can read the pipeline can compute them.

A downstream pipeline (GitLab's child and multi-project pipelines) stays one trace of its
own, as its jobs' hooks and ID tokens name only it; when its pipeline hook says which job
triggered it, its root span is drawn once more in the upstream pipeline's trace, as a child
of that job's span (:class:`Upstream`), each of the two linked to the other.

Attributes follow the OpenTelemetry CI/CD and VCS semantic conventions (``cicd.*``,
``vcs.*``); the stage and the triggering user, which those do not cover, go under
``tracegate.*``. Times are the forge's own, to the nanosecond it gives.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from proxy import __version__
from proxy.ci import trace_ids
from proxy.ci.trace_ids import job_span_id as job_span_id  # tracegate's derivation, re-exported
from proxy.ci.trace_ids import pipeline_span_id as pipeline_span_id
from proxy.ci.trace_ids import trace_id as trace_id

SCOPE = "tracegate.cicd"
#: OTLP span status codes.
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2
#: OTLP span kinds.
KIND_INTERNAL, KIND_SERVER = 1, 2
#: ``cicd.pipeline.result`` / ``cicd.pipeline.task.run.result`` values (semconv).
RESULTS = ("success", "failure", "error", "timeout", "cancellation", "skip")

Attribute = str | int | float | bool


def instance_of(url: str) -> str | None:
    """``scheme://host[:port][/path]`` of a forge URL: lower-cased host, no default port, no
    trailing ``/`` — one spelling per instance, so ``iss`` and a webhook's URLs agree. None
    for anything that is not an http(s) URL — or not printable ASCII, as a URL is (a header
    can carry any bytes; they would become part of a trace id and an outbox key)."""
    if not url.isascii() or not url.isprintable():
        return None
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname
    try:
        port = parts.port
    except ValueError:
        return None
    default = {"http": 80, "https": 443}[parts.scheme]
    netloc = f"{host}:{port}" if port and port != default else host
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"[:256]


def link_on(url: str | None, instance: str) -> str | None:
    """``url`` when it is an http(s) URL on the forge ``instance`` (under its base path),
    else None: a link a span carries never points at another host than the instance its
    trace is keyed on, whatever URL the sender wrote. URLs that parsers read differently
    (credentials before the host, a backslash) are left out too."""
    if not url or "\\" in url:
        return None
    try:
        if "@" in urlsplit(url).netloc:
            return None
    except ValueError:
        return None
    base = instance_of(url)
    return url if base is not None and (base == instance or base.startswith(instance + "/")) else None


def origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` of a URL: the instance of a forge installed at the root."""
    base = instance_of(url)
    if base is None:
        return None
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.netloc}"


def traceparent(instance: str, project_id: str, pipeline_id: str, job_id: str, attempt: str = "") -> str:
    """The W3C ``traceparent`` whose parent is the job's span (sampled)."""
    trace = trace_id(instance, project_id, pipeline_id)
    return f"00-{trace}-{job_span_id(instance, project_id, pipeline_id, job_id, attempt)}-01"


#: OTLP times are fixed64 nanoseconds: the last instant one holds (in the year 2554).
MAX_UNIX_NANOS = (1 << 64) - 1


def parse_time(value: Any) -> int | None:
    """A forge timestamp as Unix nanoseconds, or None when unset. Accepts GitLab's pipeline
    hook form ``2016-08-12 15:23:28 UTC``, ISO 8601 with ``Z`` or an offset and any
    fraction (job hooks, Gitea), and treats Go's zero time (year 1) as unset."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text.endswith(" UTC"):
        text = text[:-4].replace(" ", "T") + "+00:00"
    elif text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    fraction = ""
    head, dot, rest = text.partition(".")
    if dot:  # keep nanoseconds that datetime would drop
        digits = len(rest) - len(rest.lstrip("0123456789"))
        fraction, text = rest[:digits], head + rest[digits:]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = int(moment.timestamp())
    if seconds <= 0:  # Go's zero time (year 1), or anything before 1970: not a CI time
        return None
    nanos = seconds * 1_000_000_000 + int((fraction + "000000000")[:9] or 0)
    return nanos if nanos <= MAX_UNIX_NANOS else None  # OTLP's fixed64: past 2554 is no time


@dataclass(frozen=True)
class RunId:
    """Which trace: the forge instance, the project (repository) id, the pipeline (run) id —
    and whose ids it carries (``scheme``, :mod:`.trace_ids`). ``attempt`` is the run attempt,
    which only ``otel-collector`` ids depend on (there each attempt is its own trace)."""

    instance: str
    project_id: str
    pipeline_id: str
    scheme: str = trace_ids.TRACEGATE
    attempt: str = "1"

    @property
    def trace_id(self) -> str:
        if self.scheme == trace_ids.OTEL_COLLECTOR:
            return trace_ids.collector_trace_id(self.pipeline_id, self.attempt)
        return trace_id(self.instance, self.project_id, self.pipeline_id)

    @property
    def root_span_id(self) -> str:
        if self.scheme == trace_ids.OTEL_COLLECTOR:
            return trace_ids.collector_root_span_id(self.pipeline_id, self.attempt)
        return pipeline_span_id(self.instance, self.project_id, self.pipeline_id)

    def job_span_id(self, job_id: str, attempt: str = "") -> str:
        """A job attempt's span: tracegate's over the run and (job, attempt); the Collector's
        over the job id alone (GitHub's check run id, new on every attempt)."""
        if self.scheme == trace_ids.OTEL_COLLECTOR:
            return trace_ids.collector_job_span_id(job_id)
        return job_span_id(self.instance, self.project_id, self.pipeline_id, job_id, attempt)


@dataclass(frozen=True)
class Upstream:
    """The job that triggered a downstream run: its run (the upstream pipeline's trace) and
    its job id, whose span — as tracegate derives it, whether or not any hook draws it —
    parents the downstream run's root span in that trace. GitLab: ``source_pipeline``'s
    ``project.id``, ``pipeline_id`` and ``job_id`` (the trigger job, which sends no hook of
    its own)."""

    run: RunId
    job_id: str
    attempt: str = ""

    @property
    def span_id(self) -> str:
        return self.run.job_span_id(self.job_id, self.attempt)


@dataclass(frozen=True)
class CiSpan:
    """One finished pipeline or job attempt, ready to encode. ``job_id`` None: the root.
    ``inner`` spans travel with it in the same export and outbox row (the Collector's queue
    and step spans under ``otel-collector`` ids, which name their own ids in ``own_ids``
    (span id, parent span id); a downstream run's root drawn again in its upstream run's
    trace, which has ``upstream``: a child of the triggering job's span there). ``links``
    are (trace id, span id) of spans in other traces: the same run drawn there."""

    run: RunId
    name: str
    start_ns: int
    end_ns: int
    result: str  # one of RESULTS
    attributes: dict[str, Attribute]
    job_id: str | None = None
    attempt: str = ""
    started_ns: int | None = None  # a job's "started" event
    failure_reason: str | None = None
    final_state: str = ""  # the forge's own final status, part of the outbox key
    events: tuple[tuple[str, int, dict[str, Attribute]], ...] = field(default=())
    inner: tuple[CiSpan, ...] = field(default=())
    own_ids: tuple[str, str] | None = None
    upstream: Upstream | None = None
    links: tuple[tuple[str, str], ...] = field(default=())

    @property
    def trace_id(self) -> str:
        return self.upstream.run.trace_id if self.upstream is not None else self.run.trace_id

    @property
    def span_id(self) -> str:
        if self.own_ids is not None:
            return self.own_ids[0]
        if self.job_id is None:
            return self.run.root_span_id
        return self.run.job_span_id(self.job_id, self.attempt)

    @property
    def parent_span_id(self) -> str:
        if self.own_ids is not None:
            return self.own_ids[1]
        if self.upstream is not None:
            return self.upstream.span_id
        return "" if self.job_id is None else self.run.root_span_id

    def outbox_key(self, source: str) -> str:
        """Once per final state of a span: the span's stable ids (instance, project, run,
        job, attempt) and the forge's final status are one outbox row, however many
        deliveries carry them and whatever end time each one says (GitLab retries, racing
        replicas, a redelivery whose finish moved). A span that reaches another final state
        — a skipped GitLab job that runs after a retry, a re-run pipeline that ends with
        another result — is a new row with the same span id. The end time is not part of
        the key: it is the sender's to change, and a key on it let one span be sent twice."""
        what = "pipeline" if self.job_id is None else f"job:{self.job_id}:{self.attempt}"
        run = self.run
        if run.scheme != trace_ids.TRACEGATE:  # other ids, another span: keys before the choice stay as they were
            what = f"{what}:{run.scheme}"
        if self.upstream is not None:  # the same run's root, drawn in the upstream trace: another span
            up = self.upstream
            what = f"{what}:upstream:{up.run.project_id}:{up.run.pipeline_id}:{up.job_id}:{up.attempt}"
        return ":".join(("ci", source, run.instance, run.project_id, run.pipeline_id, what, self.final_state))


def _value(value: Attribute) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    return {"stringValue": value}


def _attributes(values: dict[str, Attribute]) -> list[dict[str, Any]]:
    """Set attributes only: empty strings and non-finite numbers (not JSON) are left out."""
    return [
        {"key": k, "value": _value(v)}
        for k, v in values.items()
        if v is not None and v != "" and not (isinstance(v, float) and not math.isfinite(v))
    ]


def span_json(span: CiSpan) -> dict[str, Any]:
    status: dict[str, Any] = {"code": STATUS_OK}
    if span.result in ("failure", "error", "timeout"):
        status = {"code": STATUS_ERROR, "message": (span.failure_reason or span.result)[:256]}
    elif span.result in ("cancellation", "skip"):
        status = {"code": STATUS_UNSET}
    events = [
        {"timeUnixNano": str(at), "name": name, "attributes": _attributes(attrs)} for name, at, attrs in span.events
    ]
    body: dict[str, Any] = {
        "traceId": span.trace_id,
        "spanId": span.span_id,
        "name": span.name,
        "kind": KIND_SERVER if span.job_id is None and span.own_ids is None else KIND_INTERNAL,
        "startTimeUnixNano": str(span.start_ns),
        "endTimeUnixNano": str(max(span.end_ns, span.start_ns)),
        "attributes": _attributes(span.attributes),
        "status": status,
    }
    if span.parent_span_id:
        body["parentSpanId"] = span.parent_span_id
    if events:
        body["events"] = events
    if span.links:
        body["links"] = [{"traceId": trace, "spanId": other} for trace, other in span.links]
    return body


def otlp_json(spans: list[CiSpan], service_name: str, provider: str) -> bytes:
    """An ExportTraceServiceRequest (OTLP/JSON) carrying ``spans`` under one resource."""
    resource = _attributes({"service.name": service_name, "vcs.provider.name": provider})
    scope = {"name": SCOPE, "version": __version__}
    encoded = [span_json(s) for top in spans for s in (top, *top.inner)]
    scope_spans = [{"scope": scope, "spans": encoded}]
    request = {"resourceSpans": [{"resource": {"attributes": resource}, "scopeSpans": scope_spans}]}
    return json.dumps(request, separators=(",", ":")).encode()


def describe(span: CiSpan) -> str:
    """One line for ``tracegate explain``: name, ids, times, result."""
    seconds = (span.end_ns - span.start_ns) / 1e9
    parent = f" parent {span.parent_span_id}" if span.parent_span_id else " (root)"
    if span.upstream is not None:
        parent = f" in upstream trace {span.trace_id}{parent}"
    start = datetime.fromtimestamp(span.start_ns / 1e9, UTC).isoformat(timespec="seconds")
    return f"span {span.span_id}{parent} {span.name!r}: {start} + {seconds:.1f}s, result {span.result}" + (
        f" ({span.failure_reason})" if span.failure_reason else ""
    )
