"""GitHub webhook payloads: which entry a delivery speaks for, and the markers it draws.

Shapes after GitHub's documentation (webhook events and payloads): every event names its
``repository`` (``id``, ``full_name``, ``html_url``) and ``sender``; ``push`` is Gitea's
shape (``ref``, ``before``, ``after``, ``head_commit``) with the compare view in ``compare``
(Gitea: ``compare_url``), and a tag arrives as a push of ``refs/tags/…`` (GitHub's
``create`` event carries no commit); ``release`` with ``action: published`` is Gitea's
shape too; ``deployment_status`` carries ``deployment`` (``sha``, ``ref``, ``environment``,
``id``) and ``deployment_status`` (``state``, ``environment``). ``workflow_run`` and
``workflow_job`` are read by :mod:`.actions`.

A deployment's ``ref`` may be a branch, a tag or a SHA and the payload does not say which:
a name is taken for a branch (``refs/heads/<ref>`` for ``refs:`` and ``vcs.ref.head.type``)
unless it is written ``refs/tags/…``. Only ``state: success`` draws a marker.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from proxy.ci.gitea import Classified, classify, repository_instance, repository_name, repository_url
from proxy.ci.marker import Marker, is_commit_sha
from proxy.ci.payload import Skip, get, positive_id, text
from proxy.ci.pipeline import link_on
from proxy.policy.model import WebhookSource

SOURCE = "github"
MARKER_EVENTS = ("push", "release", "deployment_status")


def repository_of(payload: dict[str, Any]) -> tuple[str | None, str | None]:
    """(``repository.id``, ``repository.full_name``) as the payload names them."""
    return positive_id(get(payload, "repository", "id")), repository_name(payload)


def candidates(hooks: Iterable[WebhookSource], repository_id: str | None, full_name: str | None) -> list[WebhookSource]:
    """GitHub entries naming the repository. Entries that bind its id (``repository_id:``)
    are the only ones when any exist: the secret of an entry matched by name (which the
    sender also writes, and which a renamed repository frees for another) must not speak
    for a repository another entry binds by its immutable id. An entry that binds ids
    matches those ids only, never by name."""
    github = [h for h in hooks if str(h.source) == SOURCE]
    by_id = [h for h in github if repository_id is not None and repository_id in h.project_ids]
    if by_id:
        return by_id
    return [h for h in github if not h.project_ids and full_name is not None and h.repository.match_text(full_name)]


def markers_for(event: str, delivery: str, payload: dict[str, Any], *, instance: str | None) -> Classified | Skip:
    """The marker an authentic ``push``, ``release`` or ``deployment_status`` draws, or why
    none. Identity — name, owner, URL — comes from ``repository.full_name`` only, as for
    Gitea (:func:`.gitea.classify`); links stay on the pinned ``instance`` (else the one
    ``html_url`` names)."""
    if event in ("push", "release"):
        found = classify(SOURCE, event, delivery, payload, instance=instance)
        if isinstance(found, Classified) and event == "push":
            home = instance or repository_instance(payload)
            compare = link_on(text(payload.get("compare"), 1024), home) if home else None
            found = replace(found, marker=replace(found.marker, compare_url=compare))
        return found
    if event == "deployment_status":
        return _deployment(delivery, payload, instance)
    return Skip("event-not-listed")


def _deployment(delivery: str, payload: dict[str, Any], instance: str | None) -> Classified | Skip:
    full_name = repository_name(payload) or ""
    owner, _, name = full_name.rpartition("/")
    url = repository_url(payload, full_name)
    if url is None and get(payload, "repository", "html_url") is not None:
        return Skip("repository-mismatch")
    state = text(get(payload, "deployment_status", "state"), 32)
    if state is None:
        return Skip("malformed-deployment")
    if state != "success":
        return Skip("deployment-not-successful")
    sha, ref = text(get(payload, "deployment", "sha"), None), text(get(payload, "deployment", "ref"), 256)
    if not is_commit_sha(sha) or ref is None:
        return Skip("malformed-deployment")
    full_ref = ref if ref.startswith("refs/") or is_commit_sha(ref) else f"refs/heads/{ref}"
    home = instance or repository_instance(payload)
    environment = text(get(payload, "deployment_status", "environment")) or text(
        get(payload, "deployment", "environment")
    )
    actor = text(get(payload, "sender", "login")) or text(get(payload, "deployment", "creator", "login"))
    deployment_id = positive_id(get(payload, "deployment", "id"))
    marker = Marker(
        provider=SOURCE,
        repository_url=(link_on(url, home) if home else None) or "",
        repository_name=name,
        owner=owner,
        ref_name=full_ref.removeprefix("refs/heads/").removeprefix("refs/tags/"),
        ref_type="tag" if full_ref.startswith("refs/tags/") else "branch",
        revision=sha,
        event="deployment",
        delivery_id=delivery,
        actor=actor,
        title=text(get(payload, "deployment", "description"), 200),
        environment=environment,
        extra={"tracegate.deployment.id": deployment_id} if deployment_id else {},
    )
    return Classified("deployment_status", full_ref, marker)
