"""The background sender: delivers outbox events upstream until the upstream takes them.

Exponential backoff with jitter (``base`` doubling up to ``cap`` seconds, each delay drawn
from its upper half, or the upstream's ``Retry-After`` when it gives one). A 2xx marks the
event delivered; 408, 429, 5xx and network errors retry; any other 4xx is a permanent
failure, kept in the outbox and counted, never retried. Delivery is at least once: a crash
between the upstream's 2xx and the outbox update resends, with the same span ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections.abc import Callable

from proxy.errors import UpstreamError
from proxy.runtime import Runtime
from proxy.webhooks.outbox import Outbox, Pending

log = logging.getLogger("tracegate.outbox")

RETRYABLE_4XX = frozenset({408, 429})
IDLE_POLL_SECONDS = 5.0


class Sender:
    def __init__(
        self,
        outbox: Outbox,
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
        while True:
            self._outbox.wake.clear()  # before reading: an add from now on wakes the next wait
            try:
                lease = self._runtime.settings.upstream_timeout + 5  # longer than any one send
                for event in await self._outbox.due(lease=lease):
                    await self._deliver(event)
                stats = await self._outbox.stats()
                if self._clock() - last_prune > 3600:
                    await self._outbox.prune()
                    last_prune = self._clock()
            except (sqlite3.Error, OSError, RuntimeError) as exc:  # keep the loop alive; retry next pass
                log.error("outbox pass failed", extra={"error": type(exc).__name__})
                stats = {"depth": 0, "oldest_age": 0.0, "next_due": None}
            metrics.outbox_depth.set(stats["depth"])
            metrics.outbox_oldest_age.set(stats["oldest_age"])
            wait = IDLE_POLL_SECONDS
            if stats["next_due"] is not None:
                wait = min(max(stats["next_due"] - self._clock(), 0.01), IDLE_POLL_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox.wake.wait(), wait)

    async def _deliver(self, event: Pending) -> None:
        metrics = self._runtime.metrics
        account = self._runtime.gate.policy.service_accounts.get(event.service_account)
        forwarder = self._runtime.forwarder
        if account is None or account.access_token is None or forwarder is None:
            metrics.outbox_deliveries.labels("no-account").inc()
            await self._outbox.retry_later(event.id, "no-account", self.backoff(event.attempts))
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
            await self._outbox.delivered(event.id, result)
            outcome = "delivered"
        elif 400 <= status < 500 and status not in RETRYABLE_4XX:
            await self._outbox.failed(event.id, result)
            outcome = "failed-permanently"
            log.error(
                "outbox event refused by upstream; kept, not retried", extra={"event": event.key, "status": status}
            )
        else:
            await self._outbox.retry_later(event.id, result, self.backoff(event.attempts, retry_after))
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
