"""The four DORA keys, computed from delivery facts in the order of their own timestamps.

Pure functions over :class:`Push` and :class:`Deployment` facts (stored by :mod:`.dora_facts`,
settled by :mod:`.dora_settle`); the definitions, and how they differ from Four Keys' and
Apache DevLake's, are in docs/delivery-metrics.md. Everything is per (service, environment):
a deployment's *history* is every deployment of that service to that environment, ordered by
(event time, fact key) — never by arrival.

* **Lead time for changes** of a successful deployment D: D's time minus the earliest commit
  time of *D's change* — the commits D brings that no earlier successful deployment of the
  service to the environment brought. The change is found by walking the pushes back from
  D's SHA (``after`` → ``before``) until a SHA deployed before; a redeploy or a rollback
  brings no change and has no lead time.
* **Change failure**: a successful deployment D is a failed change when, within the failure
  window after it, (a) the next deployment that is not a redeploy of D's SHA failed, (b) that
  next deployment rolled back to a SHA deployed before D, or (c) a pushed commit reverts a
  commit of D's change (``This reverts commit <sha>``, as ``git revert`` writes it).
* **Time to restore** of a successful deployment D that follows one or more failed
  deployments: D's time minus the first failed deployment since the previous success.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: At most this many pushes walked back from a deployed SHA, and commits kept per push.
MAX_PUSHES = 200
MAX_COMMITS = 2048
#: ``git revert`` writes "This reverts commit <full sha>." into the message body.
_REVERTS = re.compile(r"This reverts commit ([0-9a-f]{40}(?:[0-9a-f]{24})?)")


def reverted_sha(message: str | None) -> str | None:
    """The commit a ``git revert`` message names, or None."""
    found = _REVERTS.search(message or "")
    return found[1] if found else None


@dataclass(frozen=True)
class Commit:
    sha: str
    at_ns: int  # the commit's own timestamp as the forge sends it (GitHub, Gitea: the author date)
    reverts: str | None = None


@dataclass(frozen=True)
class Push:
    key: str
    at_ns: int  # when the push happened (GitHub: repository.pushed_at; else its newest commit)
    received_at: float
    before: str
    after: str
    commits: tuple[Commit, ...]


@dataclass(frozen=True)
class Deployment:
    key: str
    at_ns: int  # when the deployment finished (GitHub: the status's created_at; a job's call: its arrival)
    received_at: float
    sha: str
    environment: str
    services: tuple[str, ...]
    result: str  # success | failure
    window_ns: int  # the entry's failure window when the fact was stored
    account: str = ""


def push_body(before: str, after: str, commits: Iterable[Commit]) -> str:
    listed = [[c.sha, c.at_ns, c.reverts] for c in list(commits)[:MAX_COMMITS]]
    return json.dumps({"before": before, "after": after, "commits": listed}, separators=(",", ":"))


def deployment_body(d: Deployment) -> str:
    fields = {
        "sha": d.sha,
        "environment": d.environment,
        "services": list(d.services),
        "result": d.result,
        "window_ns": d.window_ns,
        "account": d.account,
    }
    return json.dumps(fields, separators=(",", ":"))


def decode(key: str, kind: str, at_ns: int, received_at: float, body: str) -> Push | Deployment | None:
    """A stored fact as this version reads it; None for a row it does not understand."""
    try:
        data: Any = json.loads(body)
        if kind == "push":
            commits = tuple(Commit(str(s), int(t), str(r) if r else None) for s, t, r in data["commits"])
            return Push(key, at_ns, received_at, str(data["before"]), str(data["after"]), commits)
        if kind == "deployment":
            return Deployment(
                key,
                at_ns,
                received_at,
                str(data["sha"]),
                str(data["environment"]),
                tuple(str(s) for s in data["services"]),
                str(data["result"]),
                int(data["window_ns"]),
                str(data.get("account", "")),
            )
    except (ValueError, KeyError, TypeError):
        return None
    return None


def _order(d: Deployment) -> tuple[int, str]:
    return d.at_ns, d.key


def history(deployments: Iterable[Deployment], service: str, environment: str) -> list[Deployment]:
    """Every deployment of ``service`` to ``environment``, in event-time order."""
    return sorted((d for d in deployments if service in d.services and d.environment == environment), key=_order)


def _by_after(pushes: Iterable[Push]) -> dict[str, Push]:
    """The push that brought each SHA: the earliest (event time, key) when several did."""
    found: dict[str, Push] = {}
    for push in sorted(pushes, key=lambda p: (p.at_ns, p.key)):
        found.setdefault(push.after, push)
    return found


def change_of(d: Deployment, hist: list[Deployment], pushes: Iterable[Push]) -> list[Commit] | None:
    """The commits ``d`` brings to its environment that no earlier successful deployment
    brought, or None for a redeploy or rollback (its SHA was deployed before) and when no
    push names the deployed commit."""
    deployed = {x.sha for x in hist if x.result == "success" and _order(x) < _order(d)}
    if d.sha in deployed:
        return None
    pushes = list(pushes)
    by_after = _by_after(pushes)
    commits: dict[str, Commit] = {}
    current, seen = d.sha, set[str]()
    while current not in deployed and current not in seen and len(seen) < MAX_PUSHES:
        seen.add(current)
        push = by_after.get(current)
        if push is None:
            break
        for commit in push.commits:
            if commit.sha not in deployed:
                commits.setdefault(commit.sha, commit)
        current = push.before
    if not commits:  # no push ends at the SHA: the deployed commit alone, if a push carried it
        for push in sorted(pushes, key=lambda p: (p.at_ns, p.key)):
            for commit in push.commits:
                if commit.sha == d.sha:
                    return [commit]
        return None
    return list(commits.values())


def lead_time(d: Deployment, hist: list[Deployment], pushes: Iterable[Push]) -> float | None:
    """Seconds from the first commit of ``d``'s change to ``d`` (never negative), or None."""
    if d.result != "success":
        return None
    change = change_of(d, hist, pushes)
    if not change:
        return None
    return max(d.at_ns - min(c.at_ns for c in change), 0) / 1e9


def time_to_restore(d: Deployment, hist: list[Deployment]) -> float | None:
    """Seconds from the first failed deployment since the previous success to ``d``, when
    ``d`` is the success that ends such a run of failures; else None."""
    if d.result != "success":
        return None
    first: Deployment | None = None
    for earlier in reversed([x for x in hist if _order(x) < _order(d)]):
        if earlier.result != "failure":
            break
        first = earlier
    return None if first is None else max(d.at_ns - first.at_ns, 0) / 1e9


def failure_of(d: Deployment, hist: list[Deployment], pushes: Iterable[Push]) -> str | None:
    """Why the successful deployment ``d`` is a failed change — ``failed-deployment``,
    ``rollback`` or ``revert`` — or None when nothing in its failure window says so."""
    if d.result != "success":
        return None
    end = d.at_ns + d.window_ns
    before = {x.sha for x in hist if x.result == "success" and _order(x) < _order(d)}
    for later in (x for x in hist if _order(x) > _order(d) and x.at_ns <= end):
        if later.result == "failure":
            return "failed-deployment"
        if later.sha != d.sha:
            if later.sha in before:
                return "rollback"
            break  # a newer change took over the environment: what follows is its own
    pushes = list(pushes)
    changed = {c.sha for c in change_of(d, hist, pushes) or ()} | {d.sha}
    for push in pushes:
        if d.at_ns < push.at_ns <= end and any(c.reverts in changed for c in push.commits if c.reverts):
            return "revert"
    return None
