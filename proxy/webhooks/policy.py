"""The ``webhooks:`` section of the policy files: which repositories may send, signed how."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from proxy.policy.matchers import Matcher
from proxy.policy.model import WebhookSource
from proxy.policy.source import LList
from proxy.secrets import SecretUnavailable, resolve

if TYPE_CHECKING:
    from proxy.policy.loader import Checker

EVENTS = ("push", "tag", "release")
KEYS = ("name", "source", "repository", "secret", "events", "refs", "service_account", "services")


def parse_webhooks(check: Checker, section: Any, line: int, environ: Mapping[str, str] | None) -> list[WebhookSource]:
    if section is None:
        return []
    if not isinstance(section, LList):
        check.add(line, "webhooks must be a list of entries (- name: …)")
        return []
    out = []
    for raw, item_line in zip(section, section.item_lines, strict=True):
        entry = check.mapping(raw, item_line, "a webhook")
        if entry is None:
            continue
        name = check.string(entry, "name", "webhook") or f"<webhook at line {item_line}>"
        what = f"webhook {name!r}"
        check.keys(entry, KEYS, ("name", "source", "repository", "secret", "service_account", "services"), what)
        source = entry.get("source")
        if source not in ("gitea", "forgejo"):
            check.add(entry.line_of("source"), f"{what}: source must be gitea or forgejo")
        repository = check.strings(entry, "repository", what)
        if repository and Matcher(repository).matches_everything:
            check.add(entry.line_of("repository"), f"{what}: a bare '*' repository lets any repository send; name it")
        events = check.strings(entry, "events", what) or EVENTS
        for event in events:
            if event not in EVENTS:
                check.add(entry.line_of("events"), f"{what}: unknown event {event!r}; use push, tag or release")
        refs = check.strings(entry, "refs", what) or ("*",)
        account = check.string(entry, "service_account", what)
        services = check.strings(entry, "services", what)
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
        if source not in ("gitea", "forgejo") or not repository or account is None or not services:
            continue
        if any(r is None for r in secret_refs) or not secret_refs:
            continue
        out.append(
            WebhookSource(
                name=name,
                source=source,
                repository=Matcher(repository),
                secret_refs=tuple(r for r in secret_refs if r is not None),
                events=frozenset(events),
                refs=Matcher(refs),
                service_account=account,
                services=services,
                where=check.where(entry.line),
                secrets=tuple(secrets),
            )
        )
    return out
