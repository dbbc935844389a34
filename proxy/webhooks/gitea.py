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

from proxy.webhooks.marker import Marker, is_commit_sha

_ZERO = re.compile(r"^0+$")


@dataclass(frozen=True)
class Skip:
    """An authentic event that draws no marker; ``reason`` goes to the body and the log."""

    reason: str


@dataclass(frozen=True)
class Classified:
    kind: str  # push, tag, release
    ref: str  # full ref, for matching: refs/heads/main, refs/tags/v1
    marker: Marker


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _get(payload: dict[str, Any], *path: str) -> Any:
    node: Any = payload
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def repository_name(payload: dict[str, Any]) -> str | None:
    return _text(_get(payload, "repository", "full_name"))


def repository_url(payload: dict[str, Any], full_name: str) -> str | None:
    """The repository's web URL, if the payload's ``html_url`` names the same repository as
    ``full_name`` (its path is ``/<full_name>``, as Gitea and Forgejo build it); else None."""
    url = _text(_get(payload, "repository", "html_url"))
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


def classify(source: str, event: str, delivery_id: str, payload: dict[str, Any]) -> Classified | Skip:
    """The marker an authentic event draws. Its repository identity — name, owner, URL —
    comes only from ``repository.full_name``, the value the webhook entry was matched on:
    the payload's other fields (``name``, ``owner.login``) are not trusted to agree, and an
    ``html_url`` that names another repository is a refusal (``repository-mismatch``)."""
    full_name = repository_name(payload) or ""
    owner, _, name = full_name.rpartition("/")
    url = repository_url(payload, full_name)
    if url is None and _get(payload, "repository", "html_url") is not None:
        return Skip("repository-mismatch")
    actor = _text(_get(payload, "sender", "login")) or _text(_get(payload, "pusher", "login"))

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
        ref, after = _text(payload.get("ref")), _text(payload.get("after"))
        if ref is None or after is None:
            return Skip("malformed-push")
        if _ZERO.match(after):
            return Skip("branch-deleted")
        if not is_commit_sha(after):
            return Skip("malformed-push")
        ref_type = "tag" if ref.startswith("refs/tags/") else "branch"
        short = ref.removeprefix("refs/heads/").removeprefix("refs/tags/")
        title = _text(_get(payload, "head_commit", "message"))
        return Classified(
            "push",
            ref,
            marker(
                "push",
                short,
                ref_type,
                after,
                title=title.splitlines()[0][:200] if title else None,
                compare_url=_text(payload.get("compare_url")),
            ),
        )
    if event == "create":
        if payload.get("ref_type") != "tag":
            return Skip("event-not-listed")
        tag, sha = _text(payload.get("ref")), _text(payload.get("sha"))
        if tag is None or sha is None or not is_commit_sha(sha):
            return Skip("malformed-tag")
        tag = tag.removeprefix("refs/tags/")
        return Classified("tag", "refs/tags/" + tag, marker("tag", tag, "tag", sha))
    if event == "release":
        if payload.get("action") != "published":
            return Skip("release-action-not-published")
        tag = _text(_get(payload, "release", "tag_name"))
        target = _text(_get(payload, "release", "target_commitish"))
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
                title=_text(_get(payload, "release", "name")),
            ),
        )
    return Skip("event-not-listed")
