"""The background sender: delivers outbox events upstream until the upstream takes them.

Exponential backoff with jitter (``base`` doubling up to ``cap`` seconds, each delay drawn
from its upper half, or the upstream's ``Retry-After`` when it gives one). A 2xx marks the
event delivered; 408, 429, 5xx and network errors retry; any other 4xx is a permanent
failure, kept in the outbox and counted, never retried. Delivery is at least once: a crash
between the upstream's 2xx and the outbox update resends, with the same span ids.

The store may be shared by several replicas (PostgreSQL): each pass leases the events it
sends. When the store is unreachable the sender backs off (0.2 s doubling to 5 s) and
reconnects; an outcome it could not record is retried until the lease would run out, so a
database restart does not make an already delivered event due again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable

from proxy.ci.outbox import Pending
from proxy.ci.store import OutboxStore
from proxy.errors import OutboxUnavailable, UpstreamError
from proxy.gate.runtime import Runtime

log = logging.getLogger("tracegate.outbox")

RETRYABLE_4XX = frozenset({408, 429})
IDLE_POLL_SECONDS = 5.0
RECONNECT_BASE_SECONDS = 0.2


class Sender:
    def __init__(
        self,
        outbox: OutboxStore,
        runtime: Runtime,
        *,
        base: float = 1.0,
        cap: float = 300.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._outbox = outbox
        self._runtime = runtime
        self._base = base
        self._cap = cap
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto

    def backoff(self, attempts: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(max(retry_after, self._base), self._cap)
        ceiling: float = min(self._cap, self._base * 2.0 ** min(attempts, 30))
        return ceiling * self._rng.uniform(0.5, 1.0)

    async def run(self) -> None:
        metrics = self._runtime.metrics
        last_prune = 0.0
        failures = 0
        while True:
            self._outbox.wake.clear()  # before reading: an add from now on wakes the next wait
            try:
                timeout = self._runtime.settings.upstream_timeout
                lease = 2 * timeout + 5
                deadline = time.monotonic() + lease
                for event in await self._outbox.due(lease=lease):
                    if time.monotonic() + timeout + 1 > deadline:
                        break  # too late to send within this lease: left for the next pass, anyone's
                    await self._deliver(event, deadline)
                stats = await self._outbox.stats()
                if self._clock() - last_prune > 3600:
                    await self._outbox.prune()
                    last_prune = self._clock()
            except OutboxUnavailable as exc:  # keep the loop alive; reconnect with backoff
                failures += 1
                log.error("outbox pass failed", extra={"error": exc.reason})
                wait = min(RECONNECT_BASE_SECONDS * 2 ** min(failures, 10), IDLE_POLL_SECONDS)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._outbox.wake.wait(), wait * self._rng.uniform(0.5, 1.0))
                continue
            failures = 0
            metrics.outbox_depth.set(stats["depth"])
            metrics.outbox_oldest_age.set(stats["oldest_age"])
            wait = IDLE_POLL_SECONDS
            if stats["next_due"] is not None:
                wait = min(max(stats["next_due"] - self._clock(), 0.01), IDLE_POLL_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox.wake.wait(), wait)

    async def _record(self, write: Callable[[], Awaitable[None]], deadline: float) -> None:
        """Record an outcome, retrying while the store is unreachable and the lease holds:
        once it runs out another sender may take the event, and recording no longer helps."""
        failures = 0
        while True:
            try:
                await write()
                return
            except OutboxUnavailable:
                failures += 1
                delay = min(RECONNECT_BASE_SECONDS * 2**failures, IDLE_POLL_SECONDS) * self._rng.uniform(0.5, 1.0)
                if time.monotonic() + delay >= deadline:
                    raise
                await asyncio.sleep(delay)

    async def _deliver(self, event: Pending, deadline: float) -> None:
        metrics = self._runtime.metrics
        account = self._runtime.gate.policy.service_accounts.get(event.service_account)
        forwarder = self._runtime.forwarder
        if account is None or (account.credentials is None and account.access_token is None) or forwarder is None:
            metrics.outbox_deliveries.labels("no-account").inc()
            delay = self.backoff(event.attempts)
            await self._record(lambda: self._outbox.retry_later(event.id, "no-account", delay), deadline)
            return
        retry_after: float | None = None
        try:
            status, retry_header = await forwarder.send(account, "traces", event.payload, "application/json")
        except UpstreamError as exc:
            status, result = 0, "timeout" if exc.status == 504 else "unreachable"
        else:
            result = str(status)
            if retry_header is not None and retry_header.isdigit():
                retry_after = float(retry_header)
        if 200 <= status < 300:
            await self._record(lambda: self._outbox.delivered(event.id, result), deadline)
            outcome = "delivered"
        elif 400 <= status < 500 and status not in RETRYABLE_4XX:
            await self._record(lambda: self._outbox.failed(event.id, result), deadline)
            outcome = "failed-permanently"
            log.error(
                "outbox event refused by upstream; kept, not retried", extra={"event": event.key, "status": status}
            )
        else:
            delay = self.backoff(event.attempts, retry_after)
            await self._record(lambda: self._outbox.retry_later(event.id, result, delay), deadline)
            outcome = "retry"
        metrics.outbox_deliveries.labels(outcome).inc()
        self._runtime.audit(
            kind="outbox",
            decision=outcome,
            reason=result,
            service_account=event.service_account,
            upstream_status=status or result,
            delivery=event.key,
            attempts=event.attempts + 1,
        )
