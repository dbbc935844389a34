"""Delivery facts for the DORA keys, from verified events of entries with ``metrics: [dora]``.

Three doors record them, each after its signature or token checked out:

* a **push** (GitHub, Gitea, Forgejo) to a branch the entry's ``refs:`` lists: ``before``,
  ``after`` and each commit's SHA, timestamp and the commit it reverts. GitHub and Gitea send
  ``commits[].timestamp`` (Gitea: the author date; GitHub documents "the timestamp of the
  commit"); the push's own time is GitHub's ``repository.pushed_at``, else its newest commit.
* a **GitHub deployment_status**: ``success`` is a successful deployment, ``failure`` and
  ``error`` a failed one (other states are not final); its time is the status's
  ``created_at``, its environment the status's (else the deployment's), its commit
  ``deployment.sha``, its services the entry's.
* a **CI job's deployment call** (``POST /v1/deployments``, optionally ``"result": "failure"``):
  its time is when tracegate received it, its commit, environment and job the verified token's;
  the entry is the one with ``metrics: [dora]`` naming the job's repository.

Each fact is stored once, under a key derived from what it is — (ref, before, after) of a push;
the deployment id and result; the job, service and result — never from a delivery id, so a
redelivery, a racing duplicate or a replay stores nothing new. A deployment outside the entry's
``dora.environment`` is not recorded. A new deployment also stores its count right away
(:func:`.dora_settle.deployment_points`); its other points come due later (:mod:`.dora_settle`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from proxy.ci import github
from proxy.ci.dora import Commit, Deployment, deployment_body, push_body, reverted_sha
from proxy.ci.dora_settle import deployment_points, store_export
from proxy.ci.gitlab_routes import candidates as gitlab_candidates
from proxy.ci.marker import is_commit_sha
from proxy.ci.payload import get, positive_id, text
from proxy.ci.pipeline import parse_time
from proxy.ci.store import OutboxStore
from proxy.identity.forges import CiFacts
from proxy.policy.model import WebhookSource
from proxy.policy.webhooks import metrics_of, pinned_instance

PREFIX = "dora:"
#: GitHub deployment states → the deployment's result; the others are not final.
GITHUB_RESULTS = {"success": "success", "failure": "failure", "error": "failure"}
RESULTS = ("success", "failure")


def wants_dora(hook: WebhookSource) -> bool:
    return "dora" in metrics_of(hook)


def _commits(payload: dict[str, Any]) -> list[Commit]:
    listed = payload.get("commits")
    out = []
    for node in listed if isinstance(listed, list) else []:
        sha, at = text(get(node, "id"), 64), parse_time(get(node, "timestamp"))
        if is_commit_sha(sha) and at is not None:
            out.append(Commit(sha, at, reverted_sha(text(get(node, "message"), 65536))))
    return out


def _pushed_at(payload: dict[str, Any], commits: list[Commit]) -> int | None:
    pushed = get(payload, "repository", "pushed_at")
    if isinstance(pushed, int) and not isinstance(pushed, bool) and 0 < pushed < 1 << 33:
        return pushed * 1_000_000_000
    times = [c.at_ns for c in commits]
    head = parse_time(get(payload, "head_commit", "timestamp"))
    return max([*times, head] if head is not None else times, default=None)


async def record_push(outbox: OutboxStore, hook: WebhookSource, payload: dict[str, Any]) -> bool:
    """Store a branch push's commits (True: new). Tags and deleted branches are not changes."""
    ref, before, after = text(payload.get("ref"), 256), text(payload.get("before"), 64), text(payload.get("after"), 64)
    if ref is None or not ref.startswith("refs/heads/") or not hook.refs.match_text(ref):
        return False
    if not is_commit_sha(after) or before is None or not (is_commit_sha(before) or set(before) == {"0"}):
        return False
    commits = _commits(payload)
    at_ns = _pushed_at(payload, commits)
    if at_ns is None:
        return False
    return await outbox.add_fact(
        key=f"{PREFIX}push:{hook.name}:{ref}:{before}:{after}",
        scope=hook.name,
        kind="push",
        at_ns=at_ns,
        body=push_body(before, after, commits),
        settle=None,
        window_ends=None,
    )


async def record_deployment(
    outbox: OutboxStore, hook: WebhookSource, d: Deployment, *, clock: Callable[[], int] = time.time_ns
) -> bool:
    """Store a deployment (True: new) and its count. A successful one's points come due
    ``dora.settle`` seconds later, and after its failure window."""
    if not d.environment or not hook.dora.environments.match_text(d.environment):
        return False
    success = d.result == "success"
    new = await outbox.add_fact(
        key=d.key,
        scope=hook.name,
        kind="deployment",
        at_ns=d.at_ns,
        body=deployment_body(d),
        settle=hook.dora.settle if success else None,
        window_ends=(d.at_ns + d.window_ns) / 1e9 if success else None,
    )
    # Also after a duplicate: a 503 between the two stores is redelivered and completes here.
    counted = await store_export(outbox, f"metrics:dora:deploy:{d.key}", d.account, deployment_points(d), clock())
    return new or counted


def _deployment(
    hook: WebhookSource, key: str, at_ns: int, sha: str, env: str, services: Iterable[str], result: str
) -> Deployment:
    return Deployment(
        key=key,
        at_ns=at_ns,
        received_at=0.0,
        sha=sha,
        environment=env,
        services=tuple(services),
        result=result,
        window_ns=int(hook.dora.failure_window * 1e9),
        account=hook.service_account,
    )


async def record_github_deployment(outbox: OutboxStore, hook: WebhookSource, payload: dict[str, Any]) -> bool:
    result = GITHUB_RESULTS.get(text(get(payload, "deployment_status", "state"), 32) or "")
    deployment_id = positive_id(get(payload, "deployment", "id"))
    sha = text(get(payload, "deployment", "sha"), 64)
    env = text(get(payload, "deployment_status", "environment")) or text(get(payload, "deployment", "environment"))
    at_ns = (
        parse_time(get(payload, "deployment_status", "created_at"))
        or parse_time(get(payload, "deployment_status", "updated_at"))
        or parse_time(get(payload, "deployment", "updated_at"))
    )
    if result is None or deployment_id is None or not is_commit_sha(sha) or not env or at_ns is None:
        return False
    key = f"{PREFIX}deploy:{hook.name}:github:{deployment_id}:{result}"
    return await record_deployment(outbox, hook, _deployment(hook, key, at_ns, sha, env, hook.services, result))


async def record(outbox: OutboxStore, hook: WebhookSource, event: str, payload: dict[str, Any]) -> bool:
    """A door's authentic ``push`` or ``deployment_status`` for ``hook``: its fact, when the
    entry asks for the DORA keys and listens to the event (True: something new was stored)."""
    if not wants_dora(hook) or event not in hook.events:
        return False
    if event == "push":
        return await record_push(outbox, hook, payload)
    if event == "deployment_status":
        return await record_github_deployment(outbox, hook, payload)
    return False


def entry_for_job(hooks: Iterable[WebhookSource], facts: CiFacts, claims: Mapping[str, Any]) -> WebhookSource | None:
    """The first entry with ``metrics: [dora]`` naming the job's repository: GitLab by project
    id (``job_project_id``, else ``project_id``) or path, GitHub by repository id or name, Forgejo
    by name — on the token's instance when the entry pins one."""
    dora = [h for h in hooks if wants_dora(h)]
    if facts.provider == "gitlab":
        project = positive_id(claims.get("job_project_id")) or positive_id(claims.get("project_id"))
        found = gitlab_candidates(dora, project, facts.repository)
    elif facts.provider == github.SOURCE:
        found = github.candidates(dora, positive_id(claims.get("repository_id")), facts.repository)
    else:
        found = [h for h in dora if h.source in ("gitea", "forgejo") and h.repository.match_text(facts.repository)]
    home = facts.repository_url.removesuffix("/" + facts.repository)
    pinned = [h for h in found if pinned_instance(h) in (None, home.rstrip("/"))]
    return pinned[0] if pinned else None


async def record_job_deployment(
    outbox: OutboxStore,
    hooks: Iterable[WebhookSource],
    facts: CiFacts,
    claims: Mapping[str, Any],
    *,
    job: str,
    service: str,
    result: str,
    at_ns: int,
) -> bool:
    """A CI job's deployment of ``service`` (``/v1/deployments``): its fact under the entry naming
    the job's repository, when one asks for the DORA keys (True: something new was stored)."""
    hook = entry_for_job(hooks, facts, claims)
    if hook is None or not is_commit_sha(facts.revision) or not facts.environment:
        return False
    key = f"{PREFIX}deploy:{hook.name}:job:{job}:{service}:{result}"
    d = _deployment(hook, key, at_ns, facts.revision, facts.environment, (service,), result)
    return await record_deployment(outbox, hook, d)
