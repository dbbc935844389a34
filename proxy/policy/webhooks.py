"""The ``webhooks:`` section of the policy files: which repositories may send, signed how.

Trust, per entry: its secret (a GitHub/Gitea/Forgejo HMAC key, a GitLab token) is the whole of
what authenticates a delivery, so whoever holds it can write any payload. What the entry
pins is therefore all that binds what is drawn:

* ``project_id`` (GitLab) and ``repository_id`` (GitHub) pin the projects by their
  immutable ids; such an entry never matches by path. An entry with ``repository:`` only
  matches the path the payload names, and then the payload's ``project.id`` (or
  ``repository.id``) — the key of the trace its spans join — is the sender's word:
  :func:`warnings` says so, and an id with ``repository`` in one entry is refused (split it:
  one entry binds ids, another a path glob).
* ``instance`` pins the forge's base URL (as its ID tokens name it in ``iss``): the trace is
  keyed on it, never on ``X-Gitlab-Instance`` or a payload URL, and links that name another
  host are dropped. Without it the sender names the instance (:func:`warnings` again).

Which ids its CI spans carry (``trace_ids:``, default ``tracegate``; :mod:`proxy.ci.trace_ids`):
tracegate's own, or the OpenTelemetry Collector githubreceiver's (``otel-collector``, GitHub
entries only); ``gitlab`` is refused until GitLab publishes its derivation. ``GET
/v1/traceparent`` follows the choice of the entry naming the job's repository.

What a marker becomes, per entry (``markers:``, default ``[otlp]``): ``otlp``, a span that every
backend takes; ``native``, the backend's own deployment event (proxy/backends/native.py), for
an account whose backend has such an API and the settings it needs (:func:`native_problems`).

Delivery metrics, per entry (``metrics:``, none by default; docs/delivery-metrics.md): ``cicd``,
the semantic-convention pipeline metrics from its CI events; ``dora``, the four keys from its
pushes and deployments, tuned by ``dora:`` (``environment``, ``failure_window``, ``settle``). Both
go out on the account's metrics route, so the account must allow ``metrics``
(:func:`metrics_problems`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from proxy.backends.native import missing
from proxy.errors import PolicyProblem
from proxy.policy.checker import Checker
from proxy.policy.matchers import Matcher
from proxy.policy.model import DEFAULT_MARKERS, DoraSettings, ServiceAccount, WebhookSource
from proxy.secrets import SecretUnavailable, resolve

EVENTS = ("push", "tag", "release")
#: Events that draw deployment markers (GitHub's tags arrive as pushes of ``refs/tags/…``).
MARKER_EVENTS = (*EVENTS, "deployment_status")
#: What each source may send (``events:``), and what an entry listens to when it lists none.
#: pipeline/job and workflow_run/workflow_job become CI traces (see ``proxy/ci/pipeline.py``);
#: Forgejo's ``workflow_run_<status>``/``workflow_job_<status>`` are listed as workflow_run/
#: workflow_job, its ``action_run_success|failure|recover`` as action_run (proxy/ci/actions.py).
SOURCE_EVENTS = {
    "gitea": ("push", "tag", "release", "workflow_run", "workflow_job"),
    "forgejo": ("push", "tag", "release", "workflow_run", "workflow_job", "action_run"),
    "gitlab": ("pipeline", "job"),
    "github": ("push", "release", "deployment_status", "workflow_run", "workflow_job"),
}
DEFAULT_EVENTS = {
    "gitea": EVENTS,
    "forgejo": EVENTS,
    "gitlab": ("pipeline", "job"),
    "github": ("push", "release", "deployment_status"),
}
#: ``trace_ids:`` — whose ids an entry's CI spans carry (derived in proxy/ci/trace_ids.py), the
#: forges each can derive them for, and why not the others: what ``tracegate check`` says.
TRACE_IDS = ("tracegate", "otel-collector", "gitlab")
TRACE_IDS_SOURCES = {"tracegate": ("gitea", "forgejo", "gitlab", "github"), "otel-collector": ("github",)}
_COLLECTOR_GITHUB_ONLY = "the Collector's githubreceiver derives ids for GitHub runs"
TRACE_IDS_REFUSED = {
    ("gitlab", ""): (
        "GitLab derives its CI Job Telemetry trace id from the root pipeline's id but has not published how "
        "(gitlab-org/gitlab#590587 shows zero-padded hex only as an example; its span ids are internal), and a "
        "job of a child pipeline cannot learn its root pipeline's id from its ID token; use tracegate"
    ),
    ("otel-collector", "gitlab"): (
        f"{_COLLECTOR_GITHUB_ONLY}; its gitlabreceiver keys the trace on the pipeline's finished_at, which a "
        "running job cannot know, so a job's own spans could never join it; use tracegate"
    ),
    ("otel-collector", "gitea"): (
        f"{_COLLECTOR_GITHUB_ONLY}; a Gitea or Forgejo job's token names no job (check_run_id), so a job's own "
        "spans could not find their parent; use tracegate"
    ),
}
TRACE_IDS_REFUSED["otel-collector", "forgejo"] = TRACE_IDS_REFUSED["otel-collector", "gitea"]


def trace_ids_problem(choice: str, source: str) -> str | None:
    """Why an entry of ``source`` may not choose ``choice``, or None when it may."""
    if choice not in TRACE_IDS:
        return f"must be one of {', '.join(TRACE_IDS)}"
    refused = TRACE_IDS_REFUSED.get((choice, "")) or TRACE_IDS_REFUSED.get((choice, source))
    if refused is None and source not in TRACE_IDS_SOURCES.get(choice, ()):
        refused = f"{choice} ids are not defined for source {source}"
    return refused


#: Where each source names the immutable id an entry may bind (``project_id`` / ``repository_id``).
ID_KEYS = {"gitlab": "project_id", "github": "repository_id"}
KEYS = (
    "name",
    "source",
    "repository",
    "project_id",
    "repository_id",
    "secret",
    "events",
    "refs",
    "service_account",
    "services",
    "service_name",
    "instance",
    "markers",
    "trace_ids",
    "metrics",
    "dora",
)
#: Events that draw CI trace spans, whose trace id is keyed on the forge instance.
CI_EVENTS = frozenset({"pipeline", "job", "workflow_run", "workflow_job", "action_run"})
#: What a marker may become (``markers:``): an OTLP span, the backend's native deployment event.
MARKERS = ("otlp", "native")
#: Delivery metrics an entry may send (``metrics:``), and the keys of its ``dora:``.
METRICS = ("cicd", "dora")
DORA_KEYS = ("environment", "failure_window", "settle")
#: Events that feed the DORA keys: pushes (commit times, reverts) and GitHub's deployments.
DORA_EVENTS = frozenset({"push", "deployment_status"})
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def trace_ids_of(hook: WebhookSource) -> str:
    """Whose ids ``hook``'s CI spans carry: ``tracegate`` (the default) or ``otel-collector``."""
    return hook.trace_ids


def markers_of(hook: WebhookSource) -> frozenset[str]:
    """What ``hook``'s markers become: ``otlp``, ``native`` or both."""
    return hook.markers


def native_problems(webhooks: Iterable[WebhookSource], accounts: Mapping[str, ServiceAccount]) -> list[PolicyProblem]:
    """Entries asking ``markers: [native]`` whose service account cannot send them: a backend
    without a native deployment API (reported at the entry's ``markers:``), or a native setting
    its vendor needs (``marker_token``, Grafana's ``stack_url``: reported at the account)."""
    out = []
    for hook in webhooks:
        account = accounts.get(hook.service_account)
        if "native" not in markers_of(hook) or account is None:  # an unknown account is reported already
            continue
        line = hook.markers_line or hook.where.line
        for problem in missing(account.native, account.backend):
            if problem.key == "backend":
                message = f"webhook {hook.name!r} asks markers: [native] as service account {account.name!r}, whose "
                out.append(PolicyProblem(hook.where.file, line, message + problem.message))
            else:
                message = f"service account {account.name!r}: {problem.message} (webhook {hook.name!r} asks "
                out.append(PolicyProblem(account.where.file, account.where.line, message + "markers: [native])"))
    return out


def metrics_of(hook: WebhookSource) -> frozenset[str]:
    """Which delivery metrics ``hook`` sends: ``cicd``, ``dora``, both or none."""
    return hook.metrics


def metrics_problems(webhooks: Iterable[WebhookSource], accounts: Mapping[str, ServiceAccount]) -> list[PolicyProblem]:
    """Entries asking ``metrics:`` whose service account may not send metrics (its points go
    out on the account's metrics route)."""
    out = []
    for hook in webhooks:
        account = accounts.get(hook.service_account)
        if not hook.metrics or account is None or "metrics" in account.signals:
            continue
        out.append(
            PolicyProblem(
                hook.where.file,
                hook.where.line,
                f"webhook {hook.name!r} asks metrics: [{', '.join(sorted(hook.metrics))}] as service account "
                f"{account.name!r}, which may not send metrics; add metrics to its signals or use another account",
            )
        )
    return out


def pinned_instance(hook: WebhookSource) -> str | None:
    """The forge base URL an entry pins (``instance:``, normalised), or None: the sender's."""
    return hook.instance


def normal_instance(value: str) -> str | None:
    """``scheme://host[:port][/path]`` of a forge's base URL — lower-case host, no default
    port, no trailing ``/``: the spelling :func:`proxy.ci.pipeline.instance_of` gives
    the URLs a forge sends — or None when ``value`` is not such a URL (credentials, a query
    or a fragment included)."""
    if not value.isascii() or not value.isprintable() or "\\" in value:
        return None
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host or parts.username or parts.password:
        return None
    if parts.query or parts.fragment or len(value) > 256:
        return None
    netloc = f"{host}:{port}" if port and port != {"http": 80, "https": 443}[parts.scheme] else host
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def warnings(webhooks: Iterable[WebhookSource]) -> list[PolicyProblem]:
    """Entries that bind weakly, as ``file:line: warning: …`` problems (``tracegate check``;
    ``--strict`` fails on them): a GitLab entry matched by path only, whose sender chooses
    the project id its spans are keyed on; an entry drawing CI traces without ``instance:``,
    whose sender chooses the forge instance they are keyed on and their links' host."""
    out = []
    for hook in webhooks:
        where, name = hook.where, hook.name
        if hook.source == "gitlab" and not hook.project_ids:
            out.append(
                PolicyProblem(
                    where.file,
                    where.line,
                    f"warning: webhook {name!r} names GitLab projects by path only: whoever holds its token "
                    "chooses the project id (and so the trace) its spans are keyed on, for any project no "
                    "other entry binds by id; pin project_id (Settings → General → Project ID)",
                )
            )
        if str(hook.source) == "github" and not hook.project_ids:
            out.append(
                PolicyProblem(
                    where.file,
                    where.line,
                    f"warning: webhook {name!r} names GitHub repositories by name only: a renamed or deleted "
                    "repository's name can be taken by another, and whoever holds its secret chooses the "
                    "repository id its traces are keyed on; pin repository_id (the API's repository.id)",
                )
            )
        if hook.events & CI_EVENTS and pinned_instance(hook) is None:
            out.append(
                PolicyProblem(
                    where.file,
                    where.line,
                    f"warning: webhook {name!r} draws CI traces without instance: — the sender names the forge "
                    "instance its traces are keyed on and its links point to; add instance: with the forge's "
                    "base URL (as its ID tokens name it in iss)",
                )
            )
    return out


def parse_webhooks(check: Checker, section: Any, line: int, environ: Mapping[str, str] | None) -> list[WebhookSource]:
    out: list[WebhookSource] = []
    for entry, name, what in check.named_entries(
        section, line, "webhook", "webhooks must be a list of entries (- name: …)"
    ):
        check.keys(entry, KEYS, ("name", "source", "secret", "service_account"), what)
        raw_source = entry.get("source")
        source = raw_source if isinstance(raw_source, str) else ""
        if source not in SOURCE_EVENTS:
            check.add(entry.line_of("source"), f"{what}: source must be gitea, forgejo or gitlab, or github")
        repository = check.strings(entry, "repository", what)
        if repository and Matcher(repository).matches_everything:
            check.add(entry.line_of("repository"), f"{what}: a bare '*' repository lets any repository send; name it")
        project_ids = _project_ids(check, entry, what, source)
        id_key = ID_KEYS.get(source)
        if "repository" not in entry and not any(k in entry for k in ID_KEYS.values()):
            which = f"{id_key} (preferred: it never changes) or repository" if id_key else "repository"
            check.add(entry.line, f"{what} is missing {which}")
        if id_key and "repository" in entry and id_key in entry:
            check.add(
                entry.line_of("repository"),
                f"{what}: {id_key} and repository in one entry; an entry binds ids (preferred: they "
                "never change) or a path glob, not both: drop repository, or split the entry in two",
            )
        instance = _instance(check, entry, what)
        allowed = SOURCE_EVENTS.get(source, EVENTS)
        events = check.strings(entry, "events", what) or DEFAULT_EVENTS.get(source, EVENTS)
        for event in events:
            if event not in allowed:
                check.add(
                    entry.line_of("events"), f"{what}: unknown event {event!r} for {source}; use {', '.join(allowed)}"
                )
        markers = check.strings(entry, "markers", what) or tuple(DEFAULT_MARKERS)
        for marker in markers:
            if marker not in MARKERS:
                check.add(
                    entry.line_of("markers"),
                    f"{what}: unknown marker {marker!r}; markers lists otlp (a span: every backend), "
                    "native (the backend's deployment API) or both",
                )
        marking = [e for e in MARKER_EVENTS if e in events]
        if "markers" in entry and not marking:
            kinds = [e for e in SOURCE_EVENTS.get(source, ()) if e in MARKER_EVENTS] or EVENTS
            check.add(entry.line_of("markers"), f"{what}: markers is for {'/'.join(kinds)} events; it lists none")
        service_name = check.string(entry, "service_name", what) or f"ci/{name}"
        refs = check.strings(entry, "refs", what) or ("*",)
        account = check.string(entry, "service_account", what)
        services = check.strings(entry, "services", what) or ()
        if not services and marking:
            check.add(entry.line, f"{what} is missing 'services' (the services its {'/'.join(marking)} markers go to)")
        trace_choice = check.string(entry, "trace_ids", what) or "tracegate"
        refused = trace_ids_problem(trace_choice, source) if source in SOURCE_EVENTS else None
        if refused is not None:
            check.add(entry.line_of("trace_ids"), f"{what}.trace_ids {trace_choice[:40]!r}: {refused}")
        metrics, dora = _metrics(check, entry, what, frozenset(events))
        refs_secret = entry.get("secret")
        secret_list = refs_secret if isinstance(refs_secret, list) else [refs_secret] if refs_secret is not None else []
        secret_refs = [check.secret_ref(r, entry.line_of("secret"), f"{what}.secret") for r in secret_list]
        if "secret" in entry and not secret_list:
            check.add(entry.line_of("secret"), f"{what}.secret must list at least one secret reference")
        secrets = []
        if environ is not None:
            for ref in secret_refs:
                if ref is None:
                    continue
                try:
                    secrets.append(resolve(ref, environ))
                except SecretUnavailable as exc:
                    check.add(entry.line_of("secret"), f"{what}.secret: {exc}; set it or fix the reference")
        if source not in SOURCE_EVENTS or not (repository or project_ids) or account is None:
            continue
        if marking and not services:
            continue
        if any(r is None for r in secret_refs) or not secret_refs:
            continue
        out.append(
            WebhookSource(
                name=name,
                # github is a source the shared model's Literal does not list yet (proxy/policy/model.py)
                source=cast(Literal["gitea", "forgejo", "gitlab", "github"], source),
                repository=Matcher(repository or ()),
                secret_refs=tuple(r for r in secret_refs if r is not None),
                events=frozenset(events),
                refs=Matcher(refs),
                service_account=account,
                services=services,
                where=check.where(entry.line),
                secrets=tuple(secrets),
                project_ids=project_ids,
                service_name=service_name,
                instance=instance,
                markers=frozenset(m for m in markers if m in MARKERS),
                markers_line=entry.line_of("markers") if "markers" in entry else entry.line,
                trace_ids=trace_choice if refused is None else "tracegate",
                metrics=metrics,
                dora=dora,
            )
        )
    return out


def _metrics(check: Checker, entry: Any, what: str, events: frozenset[str]) -> tuple[frozenset[str], DoraSettings]:
    """``metrics:`` (``cicd``, ``dora``) and ``dora:`` (``environment``: names or globs, default
    every environment; ``failure_window`` and ``settle``: seconds, or a number with ``s``, ``m``,
    ``h`` or ``d``)."""
    listed = check.strings(entry, "metrics", what) or ()
    for name in listed:
        if name not in METRICS:
            check.add(entry.line_of("metrics"), f"{what}: unknown metrics {name[:40]!r}; use cicd, dora or both")
    metrics = frozenset(m for m in listed if m in METRICS)
    if "cicd" in metrics and not events & CI_EVENTS:
        check.add(
            entry.line_of("metrics"),
            f"{what}: metrics: [cicd] comes from CI events; list pipeline/job or workflow_run/workflow_job in events",
        )
    defaults = DoraSettings()
    if "dora" not in entry:
        return metrics, defaults
    if "dora" not in metrics:
        check.add(entry.line_of("dora"), f"{what}: dora: tunes metrics: [dora]; add dora to metrics")
    section = check.mapping(entry.get("dora"), entry.line_of("dora"), f"{what}.dora")
    if section is None:
        return metrics, defaults
    check.keys(section, DORA_KEYS, (), f"{what}.dora", entry.line_of("dora"))
    environments = check.strings(section, "environment", f"{what}.dora")
    window = _duration(check, section, "failure_window", what, defaults.failure_window, minimum=1.0)
    settle = _duration(check, section, "settle", what, defaults.settle, minimum=0.0)
    matcher = Matcher(environments) if environments else defaults.environments
    return metrics, DoraSettings(environments=matcher, failure_window=window, settle=settle)


def _duration(check: Checker, section: Any, key: str, what: str, default: float, *, minimum: float) -> float:
    """Seconds: a number, or a string such as ``90s``, ``30m``, ``24h``, ``7d``; at least ``minimum``."""
    if key not in section:
        return default
    raw = section.get(key)
    seconds: float | None = None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        seconds = float(raw)
    elif isinstance(raw, str) and (found := _DURATION.match(raw)) is not None:
        seconds = float(found[1]) * _UNIT_SECONDS[found[2]]
    if seconds is None or seconds != seconds or seconds < minimum or seconds > 366 * 86400:
        check.add(
            section.line_of(key),
            f"{what}.dora.{key} {str(raw)[:40]!r} must be a duration of at least {minimum:g} s and at most 366 days: "
            "seconds, or a number with s, m, h or d (30m, 24h, 7d)",
        )
        return default
    return seconds


def _instance(check: Checker, entry: Any, what: str) -> str | None:
    """``instance``: the forge's base URL, normalised (:func:`normal_instance`)."""
    raw = check.string(entry, "instance", what)
    if raw is None:
        return None
    found = normal_instance(raw)
    if found is None:
        check.add(
            entry.line_of("instance"),
            f"{what}.instance {raw[:100]!r} must be the forge's base URL, http(s)://HOST[:PORT][/PATH] "
            "(as its ID tokens name it in iss), without credentials, query or fragment",
        )
    return found


def _project_ids(check: Checker, entry: Any, what: str, source: str) -> frozenset[str]:
    """GitLab ``project_id`` / GitHub ``repository_id`` (:data:`ID_KEYS`): one id or a list,
    numbers as the forge shows them (GitLab: Settings → General; GitHub: the API's
    ``repository.id``, the ID token's ``repository_id``). Kept as the entry's ``project_ids``."""
    for key, owner in ((k, s) for s, k in ID_KEYS.items()):
        if key in entry and source != owner:
            mine = ID_KEYS.get(source)
            check.add(entry.line_of(key), f"{what}: {key} is for source: {owner}; use {mine or 'repository'}")
    key = ID_KEYS.get(source, "")
    if key not in entry:
        return frozenset()
    raw = entry.get(key)
    items = list(raw) if isinstance(raw, list) else [raw]
    out = set()
    for item in items:
        text = str(item) if isinstance(item, int) and not isinstance(item, bool) else item
        if not isinstance(text, str) or not text.isdecimal() or int(text) <= 0 or len(text) > 19:
            noun = "project" if source == "gitlab" else "repository"
            check.add(entry.line_of(key), f"{what}.{key} must hold positive {noun} ids (numbers)")
            return frozenset()
        out.add(str(int(text)))
    if not out:
        check.add(entry.line_of(key), f"{what}.{key} must not be empty")
    return frozenset(out)
