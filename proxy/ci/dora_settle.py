"""Settling the DORA keys: the points of each deployment, once the deliveries they depend on are in.

Each replica runs a :class:`Settler`. A successful deployment's lead time and time to restore
are due ``settle`` seconds after tracegate stored it; whether it was a failed change is due
``settle`` seconds after the later of its arrival and the end of its failure window (the
entry's ``dora:``). When a point is due, the settler reads the facts of the entry (its
*scope*) **that tracegate had received by the due time**, orders them by their own
timestamps (:mod:`.dora`) and stores the point in the outbox under a key derived from the
deployment's fact key. So:

* a push or deployment delivered up to ``settle`` seconds after the others, in any order,
  to any replica, is counted as if it had come in order;
* two replicas that compute the same point — both see it due — read the same facts (those
  received by the due time; the settler waits ``GRACE`` seconds more for commits in flight)
  and store the same key: the outbox keeps one;
* a fact arriving after a point's due time is not part of that point (the point was already
  sent); it is part of every point due later.

The deployment count (deployment frequency) needs no settling: :mod:`.dora_facts` stores it
when the deployment arrives. Points go out with the fact's account on its metrics route.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable

from proxy.ci import metric_points
from proxy.ci.dora import Deployment, Push, decode, failure_of, history, lead_time, time_to_restore
from proxy.ci.metric_points import DORA_BOUNDS, Point, counter, observation
from proxy.ci.outbox import Fact
from proxy.ci.store import OutboxStore
from proxy.errors import OutboxUnavailable

log = logging.getLogger("tracegate.dora")

SCOPE = "tracegate.dora"
DEPLOYMENTS = "tracegate.dora.deployments"
LEAD_TIME = "tracegate.dora.change.lead_time"
CHANGES = "tracegate.dora.changes"
TIME_TO_RESTORE = "tracegate.dora.time_to_restore"
ENVIRONMENT = "deployment.environment.name"
RESULT = "tracegate.dora.result"
#: Seconds a due point waits more, for a fact whose transaction began before the due time.
GRACE = 1.0
POLL_SECONDS = 1.0
#: How far back (event time) from a deployment the pushes and deployments it depends on are read.
LOOKBACK_NS = 90 * 86400 * 10**9
#: Settled facts older than this (event time) are forgotten.
RETENTION_NS = 180 * 86400 * 10**9


def deployment_points(d: Deployment) -> list[tuple[dict[str, str], list[Point]]]:
    """A deployment's count, per service: deployment frequency is the ``success`` count."""
    attributes = {ENVIRONMENT: d.environment, RESULT: d.result}
    description = "Deployments, by environment and result."
    return [({"service.name": s}, [counter(DEPLOYMENTS, "{deployment}", description, attributes)]) for s in d.services]


def _export_key(metric: str, fact_key: str) -> str:
    return f"{metric_points.PREFIX}dora:{metric}:{fact_key}"


async def store_export(
    outbox: OutboxStore, key: str, account: str, resources: list[tuple[dict[str, str], list[Point]]], time_ns: int
) -> bool:
    """One metrics export in the outbox under ``key`` (nothing when no resource has a point)."""
    if not any(points for _, points in resources):
        return False
    payload = metric_points.export(resources, SCOPE, time_ns)
    digest = hashlib.sha256(key.encode()).hexdigest()
    added = await outbox.add(key=key, body_digest=digest, source="dora", service_account=account, payload=payload)
    return added == "stored"


def _visible(facts: Iterable[Fact], by: float) -> tuple[list[Deployment], list[Push]]:
    deployments: list[Deployment] = []
    pushes: list[Push] = []
    for fact in facts:
        if fact.received_at > by:
            continue
        decoded = decode(fact.key, fact.kind, fact.at_ns, fact.received_at, fact.body)
        if isinstance(decoded, Deployment):
            deployments.append(decoded)
        elif isinstance(decoded, Push):
            pushes.append(decoded)
    return deployments, pushes


def settled_points(d: Deployment, facts: list[Fact], by: float) -> dict[str, list[tuple[dict[str, str], list[Point]]]]:
    """Lead time and time to restore of ``d`` per service, from the facts received by ``by``."""
    deployments, pushes = _visible(facts, by)
    lead: list[tuple[dict[str, str], list[Point]]] = []
    restore: list[tuple[dict[str, str], list[Point]]] = []
    attributes = {ENVIRONMENT: d.environment}
    for service in d.services:
        hist = history(deployments, service, d.environment)
        resource = {"service.name": service}
        seconds = lead_time(d, hist, pushes)
        if seconds is not None:
            what = "Lead time for changes: first commit of a deployment's change to the deployment."
            lead.append((resource, [observation(LEAD_TIME, "s", what, attributes, seconds, DORA_BOUNDS)]))
        seconds = time_to_restore(d, hist)
        if seconds is not None:
            what = "Time to restore: first failed deployment to the next successful one."
            restore.append((resource, [observation(TIME_TO_RESTORE, "s", what, attributes, seconds, DORA_BOUNDS)]))
    return {"lead": lead, "restore": restore}


def change_points(d: Deployment, facts: list[Fact], by: float) -> list[tuple[dict[str, str], list[Point]]]:
    """Whether ``d`` was a failed change, per service, from the facts received by ``by``."""
    deployments, pushes = _visible(facts, by)
    out = []
    for service in d.services:
        reason = failure_of(d, history(deployments, service, d.environment), pushes)
        if reason is not None:
            log.info("failed change", extra={"deployment": d.key, "service": service, "cause": reason})
        attributes = {ENVIRONMENT: d.environment, RESULT: "failure" if reason else "success"}
        what = "Successful deployments whose failure window closed, by whether they were a failed change."
        out.append(({"service.name": service}, [counter(CHANGES, "{deployment}", what, attributes)]))
    return out


class Settler:
    """Stores the DORA points that have come due, every ``poll`` seconds, from any replica."""

    def __init__(
        self,
        outbox: OutboxStore,
        *,
        clock: Callable[[], float] = time.time,
        poll: float = POLL_SECONDS,
        rng: random.Random | None = None,
    ) -> None:
        self._outbox = outbox
        self._clock = clock
        self._poll = poll
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self._last_prune = 0.0

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await self.settle_due()
                if self._clock() - self._last_prune > 3600:
                    await self._outbox.prune_facts(int(self._clock() * 1e9) - RETENTION_NS)
                    self._last_prune = self._clock()
                failures = 0
            except OutboxUnavailable as exc:
                failures += 1
                log.error("settling delivery metrics failed", extra={"error": exc.reason})
            await asyncio.sleep(min(self._poll * 2 ** min(failures, 5), 30.0) * self._rng.uniform(0.8, 1.2))

    async def settle_due(self) -> int:
        """Store every point due now; how many exports were new."""
        due = await self._outbox.due_facts(GRACE)
        until = self._clock() - GRACE
        stored = 0
        scopes: dict[str, list[Fact]] = {}
        for fact in due:
            scopes.setdefault(fact.scope, []).append(fact)
        for scope, anchors in scopes.items():
            facts = await self._outbox.scope_facts(scope, min(a.at_ns for a in anchors) - LOOKBACK_NS)
            for anchor in anchors:
                stored += await self.settle_one(anchor, facts, until)
        return stored

    async def settle_one(self, fact: Fact, facts: list[Fact], until: float) -> int:
        """Store the points of ``fact`` due by ``until`` (computed from ``facts``); how many were new."""
        d = decode(fact.key, fact.kind, fact.at_ns, fact.received_at, fact.body)
        now_ns = int(self._clock() * 1e9)
        stored = 0
        if fact.settle_at is not None and fact.settle_at <= until:
            if isinstance(d, Deployment):
                for metric, resources in settled_points(d, facts, fact.settle_at).items():
                    stored += await store_export(self._outbox, _export_key(metric, d.key), d.account, resources, now_ns)
            await self._outbox.settle_fact(fact.key, "settle")
        if fact.window_at is not None and fact.window_at <= until:
            if isinstance(d, Deployment):
                resources = change_points(d, facts, fact.window_at)
                stored += await store_export(self._outbox, _export_key("change", d.key), d.account, resources, now_ns)
            await self._outbox.settle_fact(fact.key, "window")
        return stored
