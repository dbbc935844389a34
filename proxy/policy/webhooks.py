"""The ``webhooks:`` section of the policy files: which repositories may send, signed how.

Trust, per entry: its secret (a Gitea/Forgejo HMAC key, a GitLab token) is the whole of
what authenticates a delivery, so whoever holds it can write any payload. What the entry
pins is therefore all that binds what is drawn:

* ``project_id`` (GitLab) pins the projects by their immutable ids; such an entry never
  matches by path. An entry with ``repository:`` only matches the path the payload names,
  and then the payload's ``project.id`` — the key of the trace its spans join — is the
  sender's word: :func:`warnings` says so, and ``project_id`` with ``repository`` in one
  entry is refused (split it: one entry binds ids, another a path glob).
* ``instance`` pins the forge's base URL (as its ID tokens name it in ``iss``): the trace is
  keyed on it, never on ``X-Gitlab-Instance`` or a payload URL, and links that name another
  host are dropped. Without it the sender names the instance (:func:`warnings` again).

What a marker becomes, per entry (``markers:``, default ``[otlp]``): ``otlp``, a span that every
backend takes; ``native``, the backend's own deployment event (proxy/backends/native.py), for
an account whose backend has such an API and the settings it needs (:func:`native_problems`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from proxy.backends.native import missing
from proxy.errors import PolicyProblem
from proxy.policy.checker import Checker
from proxy.policy.matchers import Matcher
from proxy.policy.model import DEFAULT_MARKERS, ServiceAccount, WebhookSource
from proxy.secrets import SecretUnavailable, resolve

EVENTS = ("push", "tag", "release")
#: What each source may send (``events:``), and what an entry listens to when it lists none.
#: pipeline/job and workflow_run/workflow_job become CI traces (see ``proxy/ci/pipeline.py``).
SOURCE_EVENTS = {
    "gitea": ("push", "tag", "release", "workflow_run", "workflow_job"),
    "forgejo": ("push", "tag", "release", "workflow_run", "workflow_job"),
    "gitlab": ("pipeline", "job"),
}
DEFAULT_EVENTS = {"gitea": EVENTS, "forgejo": EVENTS, "gitlab": ("pipeline", "job")}
KEYS = (
    "name",
    "source",
    "repository",
    "project_id",
    "secret",
    "events",
    "refs",
    "service_account",
    "services",
    "service_name",
    "instance",
    "markers",
)
#: Events that draw CI trace spans, whose trace id is keyed on the forge instance.
CI_EVENTS = frozenset({"pipeline", "job", "workflow_run", "workflow_job"})
#: What a marker may become (``markers:``): an OTLP span, the backend's native deployment event.
MARKERS = ("otlp", "native")


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
            check.add(entry.line_of("source"), f"{what}: source must be gitea, forgejo or gitlab")
        repository = check.strings(entry, "repository", what)
        if repository and Matcher(repository).matches_everything:
            check.add(entry.line_of("repository"), f"{what}: a bare '*' repository lets any repository send; name it")
        project_ids = _project_ids(check, entry, what, source)
        if "repository" not in entry and "project_id" not in entry:
            which = "project_id (preferred: it never changes) or repository" if source == "gitlab" else "repository"
            check.add(entry.line, f"{what} is missing {which}")
        if source == "gitlab" and "repository" in entry and "project_id" in entry:
            check.add(
                entry.line_of("repository"),
                f"{what}: project_id and repository in one entry; an entry binds project ids (preferred: they "
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
        if "markers" in entry and not set(events) & set(EVENTS):
            check.add(entry.line_of("markers"), f"{what}: markers is for {'/'.join(EVENTS)} events; it lists none")
        service_name = check.string(entry, "service_name", what) or f"ci/{name}"
        refs = check.strings(entry, "refs", what) or ("*",)
        account = check.string(entry, "service_account", what)
        services = check.strings(entry, "services", what) or ()
        if not services and set(events) & set(EVENTS):
            check.add(entry.line, f"{what} is missing 'services' (the services its {'/'.join(EVENTS)} markers go to)")
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
        if set(events) & set(EVENTS) and not services:
            continue
        if any(r is None for r in secret_refs) or not secret_refs:
            continue
        out.append(
            WebhookSource(
                name=name,
                source=cast(Literal["gitea", "forgejo", "gitlab"], source),
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
            )
        )
    return out


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
    """GitLab ``project_id``: one id or a list, numbers as GitLab shows them (Settings → General)."""
    if "project_id" not in entry:
        return frozenset()
    if source != "gitlab":
        check.add(entry.line_of("project_id"), f"{what}: project_id is for source: gitlab; use repository")
        return frozenset()
    raw = entry.get("project_id")
    items = list(raw) if isinstance(raw, list) else [raw]
    out = set()
    for item in items:
        text = str(item) if isinstance(item, int) and not isinstance(item, bool) else item
        if not isinstance(text, str) or not text.isdecimal() or int(text) <= 0:
            check.add(entry.line_of("project_id"), f"{what}.project_id must hold positive project ids (numbers)")
            return frozenset()
        out.add(str(int(text)))
    if not out:
        check.add(entry.line_of("project_id"), f"{what}.project_id must not be empty")
    return frozenset(out)
