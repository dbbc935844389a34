"""Gitea / Forgejo events → :class:`Marker` facts, or the reason an event draws none.

Event mapping: ``push`` → push (``after`` is the commit; all zeros means a deleted branch,
which draws no marker); ``create`` with ``ref_type: tag`` → tag (``sha``); ``release`` with
``action: published`` → release (``target_commitish`` when it is a commit SHA — Gitea sends
the branch name when the release was cut from a branch, and then the marker's version is
the release's tag name instead). Anything else is an unlisted event.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from proxy.ci.marker import Marker, is_commit_sha
from proxy.ci.payload import Skip, get, text
from proxy.ci.pipeline import instance_of, link_on

_ZERO = re.compile(r"^0+$")


@dataclass(frozen=True)
class Classified:
    kind: str  # push, tag, release
    ref: str  # full ref, for matching: refs/heads/main, refs/tags/v1
    marker: Marker


def repository_name(payload: dict[str, Any]) -> str | None:
    return text(get(payload, "repository", "full_name"), None)


def repository_url(payload: dict[str, Any], full_name: str) -> str | None:
    """The repository's web URL, if the payload's ``html_url`` names the same repository as
    ``full_name`` (its path is ``/<full_name>``, as Gitea and Forgejo build it); else None."""
    url = text(get(payload, "repository", "html_url"), None)
    if url is None:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return None
    if unquote(parts.path).rstrip("/").lower().endswith("/" + full_name.lower()):
        return url
    return None


def repository_instance(payload: dict[str, Any]) -> str | None:
    """The forge instance as the payload names it: ``repository.html_url`` without its
    ``/<full_name>`` (a sub-path install keeps its prefix), or None when the payload has no
    ``html_url``, or one that names another repository than ``full_name``."""
    html = text(get(payload, "repository", "html_url"), 1024)
    full_name = text(get(payload, "repository", "full_name"), 512)
    if html is None or not full_name:
        return None
    html = html.rstrip("/")
    if not html.lower().endswith("/" + full_name.lower()):
        return None
    return instance_of(html[: -len(full_name) - 1])


def classify(
    source: str, event: str, delivery_id: str, payload: dict[str, Any], *, instance: str | None = None
) -> Classified | Skip:
    """The marker an authentic event draws. Its repository identity — name, owner, URL —
    comes only from ``repository.full_name``, the value the webhook entry was matched on:
    the payload's other fields (``name``, ``owner.login``) are not trusted to agree, and an
    ``html_url`` that names another repository is a refusal (``repository-mismatch``).
    Links (the repository's, the compare view's) are kept only on the forge ``instance``
    the entry pins, else on the one ``html_url`` names: never on a host of their own."""
    full_name = repository_name(payload) or ""
    owner, _, name = full_name.rpartition("/")
    url = repository_url(payload, full_name)
    if url is None and get(payload, "repository", "html_url") is not None:
        return Skip("repository-mismatch")
    home = instance or repository_instance(payload)
    url = link_on(url, home) if home else None
    actor = text(get(payload, "sender", "login"), None) or text(get(payload, "pusher", "login"), None)

    def marker(kind: str, ref_name: str, ref_type: str, sha: str, **more: str | None) -> Marker:
        return Marker(
            provider=source,
            repository_url=url or "",
            repository_name=name,
            owner=owner,
            ref_name=ref_name,
            ref_type=ref_type,
            revision=sha,
            event=kind,
            delivery_id=delivery_id,
            actor=actor,
            **more,  # type: ignore[arg-type]
        )

    if event == "push":
        ref, after = text(payload.get("ref"), None), text(payload.get("after"), None)
        if ref is None or after is None:
            return Skip("malformed-push")
        if _ZERO.match(after):
            return Skip("branch-deleted")
        if not is_commit_sha(after):
            return Skip("malformed-push")
        ref_type = "tag" if ref.startswith("refs/tags/") else "branch"
        short = ref.removeprefix("refs/heads/").removeprefix("refs/tags/")
        title = text(get(payload, "head_commit", "message"), None)
        return Classified(
            "push",
            ref,
            marker(
                "push",
                short,
                ref_type,
                after,
                title=title.splitlines()[0][:200] if title else None,
                compare_url=link_on(text(payload.get("compare_url"), None), home) if home else None,
            ),
        )
    if event == "create":
        if payload.get("ref_type") != "tag":
            return Skip("event-not-listed")
        tag, sha = text(payload.get("ref"), None), text(payload.get("sha"), None)
        if tag is None or sha is None or not is_commit_sha(sha):
            return Skip("malformed-tag")
        tag = tag.removeprefix("refs/tags/")
        return Classified("tag", "refs/tags/" + tag, marker("tag", tag, "tag", sha))
    if event == "release":
        if payload.get("action") != "published":
            return Skip("release-action-not-published")
        tag = text(get(payload, "release", "tag_name"), None)
        target = text(get(payload, "release", "target_commitish"), None)
        if tag is None:
            return Skip("malformed-release")
        version = target if target and is_commit_sha(target) else tag
        return Classified(
            "release",
            "refs/tags/" + tag,
            marker(
                "release",
                tag,
                "tag",
                version,
                title=text(get(payload, "release", "name"), None),
            ),
        )
    return Skip("event-not-listed")
