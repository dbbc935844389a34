"""The ``webhooks:`` section of the policy files: which repositories may send, signed how."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, cast

from proxy.policy.checker import Checker
from proxy.policy.matchers import Matcher
from proxy.policy.model import WebhookSource
from proxy.secrets import SecretUnavailable, resolve

EVENTS = ("push", "tag", "release")
#: What each source may send (``events:``), and what an entry listens to when it lists none.
#: pipeline/job and workflow_run/workflow_job become CI traces (see ``proxy/webhooks/pipeline.py``).
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
)


def parse_webhooks(check: Checker, section: Any, line: int, environ: Mapping[str, str] | None) -> list[WebhookSource]:
    out = []
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
        allowed = SOURCE_EVENTS.get(source, EVENTS)
        events = check.strings(entry, "events", what) or DEFAULT_EVENTS.get(source, EVENTS)
        for event in events:
            if event not in allowed:
                check.add(
                    entry.line_of("events"), f"{what}: unknown event {event!r} for {source}; use {', '.join(allowed)}"
                )
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
            )
        )
    return out


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
