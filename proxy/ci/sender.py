"""The background sender: delivers outbox events upstream until the upstream takes them.

Three kinds of event (:func:`proxy.ci.native_events.is_native`,
:func:`proxy.ci.metric_points.is_metrics`): an OTLP trace export (a marker, a CI span) goes
through the forwarder on the account's traces route, an OTLP metrics export (delivery metrics)
on its metrics route — stored as OTLP/JSON, each is re-encoded as protobuf for a route that
takes no JSON (:mod:`.otlp_proto`); a native
deployment event becomes the vendor's request (proxy/backends/native.py), built now from the
account's current settings and sent with this sender's own session.

Exponential backoff with jitter (``base`` doubling up to ``cap`` seconds, each delay drawn
from its upper half, or the upstream's ``Retry-After`` when it gives one). A 2xx marks the
event delivered; 408, 429, 5xx and network errors retry; any other 4xx is a permanent
failure, kept in the outbox and counted, never retried — as is an event refused before it is
sent (the forwarder's ``signal-not-accepted``, ``otlp-conversion-failed``, an account that no
longer has a native API, ``no-native-api``, or its token, ``no-native-credentials``) and a New
Relic answer carrying GraphQL errors (``graphql-errors``): its reason code is the row's
``last_result``, the audit line's reason and the log line's. Delivery is at least once: a
crash between the upstream's 2xx and the outbox update resends, with the same span ids (and,
natively, the same Datadog deployment id and New Relic groupId).

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
from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy import __version__, untrusted
from proxy.backends.native import native_request
from proxy.ci import native_events
from proxy.ci.metric_points import is_metrics
from proxy.ci.otlp_proto import PROTOBUF, metrics_to_protobuf, traces_to_protobuf
from proxy.ci.outbox import Pending
from proxy.ci.store import OutboxStore
from proxy.errors import BodyError, OutboxUnavailable, UpstreamError
from proxy.gate.runtime import Runtime
from proxy.policy.model import ServiceAccount
from proxy.upstream.forward import Forwarder

log = logging.getLogger("tracegate.outbox")

RETRYABLE_4XX = frozenset({408, 429})
IDLE_POLL_SECONDS = 5.0
RECONNECT_BASE_SECONDS = 0.2
#: Bytes of a native API's answer read (to find New Relic's GraphQL errors); the rest is dropped.
MAX_NATIVE_ANSWER = 64 * 1024


@dataclass(frozen=True)
class Outcome:
    """One attempt: the upstream's status (0: none answered), the reason code recorded (the
    status as text, or what went wrong), its Retry-After, and whether it is final (``refused``:
    never retried, kept as failed)."""

    status: int
    result: str
    retry_after: float | None = None
    refused: bool = False


class Sender:
    def __init__(
        self,
        outbox: OutboxStore,
        runtime: Runtime,
        *,
        base: float = 1.0,
        cap: float = 300.0,
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        """``session`` carries the native deployment events (the OTLP ones go through the
        runtime's forwarder); its opener closes it."""
        self._outbox = outbox
        self._runtime = runtime
        self._session = session
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
        native = native_events.is_native(event.key)
        if native:
            attempt = await self._send_native(account, event)
        else:
            attempt = await self._send_otlp(forwarder, account, event)
        status, result = attempt.status, attempt.result
        if attempt.refused or (400 <= status < 500 and status not in RETRYABLE_4XX):
            await self._record(lambda: self._outbox.failed(event.id, result), deadline)
            outcome = "failed-permanently"
            log.error(
                "outbox event refused; kept, not retried",
                extra={"event": event.key, "status": status, "reason": result},
            )
        elif 200 <= status < 300:
            await self._record(lambda: self._outbox.delivered(event.id, result), deadline)
            outcome = "delivered"
        else:
            delay = self.backoff(event.attempts, attempt.retry_after)
            await self._record(lambda: self._outbox.retry_later(event.id, result, delay), deadline)
            outcome = "retry"
        metrics.outbox_deliveries.labels(outcome).inc()
        fields: dict[str, Any] = {"delivery": event.key, "attempts": event.attempts + 1}
        if native:  # which vendor's API; an OTLP event's line is as it always was
            fields["native"] = account.backend.backend if account.backend is not None else None
        self._runtime.audit(
            kind="outbox",
            decision=outcome,
            reason=result,
            service_account=event.service_account,
            upstream_status=status or result,
            **fields,
        )

    async def _send_otlp(self, forwarder: Forwarder, account: ServiceAccount, event: Pending) -> Outcome:
        """The export on the account's traces route (metrics: its metrics route): its JSON as
        stored, or as protobuf for a route that takes no JSON."""
        signal, encode = ("metrics", metrics_to_protobuf) if is_metrics(event.key) else ("traces", traces_to_protobuf)
        try:
            body, content_type = event.payload, "application/json"
            if not forwarder.route(account, signal).json:
                body, content_type = encode(event.payload), PROTOBUF
            status, retry_header = await forwarder.send(account, signal, body, content_type)
        except BodyError as exc:  # signal-not-accepted, backend-json-unsupported: the policy says no
            return Outcome(0, exc.reason, refused=True)
        except ValueError:
            return Outcome(0, "otlp-conversion-failed", refused=True)
        except UpstreamError as exc:
            return Outcome(0, "timeout" if exc.status == 504 else "unreachable")
        retry_after = float(retry_header) if retry_header is not None and retry_header.isdigit() else None
        return Outcome(status, str(status), retry_after)

    async def _send_native(self, account: ServiceAccount, event: Pending) -> Outcome:
        """The vendor's deployment request, built now from the account as loaded (a reload that
        rotates its marker_token applies). Its secrets are revealed only into the headers."""
        native = account.native
        if native is None:  # its backend changed since to one without a native API
            return Outcome(0, "no-native-api", refused=True)
        try:
            facts = native_events.decode(event.payload)
            request = native_request(native, account.credentials or {}, account.native_token, facts)
        except KeyError:  # its marker_token was removed since, and the vendor takes no ingest key
            return Outcome(0, "no-native-credentials", refused=True)
        except ValueError:  # a row this version cannot read, or facts the vendor's syntax cannot carry
            return Outcome(0, "native-event-invalid", refused=True)
        headers = {**dict(request.reveal()), "User-Agent": f"tracegate/{__version__}"}
        timeout = aiohttp.ClientTimeout(total=self._runtime.settings.upstream_timeout)
        try:
            async with self._session.request(
                request.method,
                request.url,
                data=request.body_bytes(),
                headers=headers,
                timeout=timeout,
                allow_redirects=False,  # a redirect would carry the credential to another host
            ) as resp:
                answer = await _read_some(resp)
                status, retry_header = resp.status, resp.headers.get("Retry-After")
        except TimeoutError:
            return Outcome(0, "timeout")
        except (aiohttp.ClientError, OSError):
            return Outcome(0, "unreachable")
        if 200 <= status < 300 and native.backend.backend == "newrelic" and _graphql_errors(answer):
            # NerdGraph answers 200 with "errors" for a mutation it refused (a bad key, no such entity).
            return Outcome(status, "graphql-errors", refused=True)
        retry_after = float(retry_header) if retry_header is not None and retry_header.isdigit() else None
        return Outcome(status, str(status), retry_after)


async def _read_some(resp: aiohttp.ClientResponse) -> bytes:
    """Up to MAX_NATIVE_ANSWER bytes of the answer (a longer one is cut; its connection closes)."""
    body = bytearray()
    while len(body) < MAX_NATIVE_ANSWER and (chunk := await resp.content.read(MAX_NATIVE_ANSWER - len(body))):
        body += chunk
    return bytes(body)


def _graphql_errors(answer: bytes) -> bool:
    """Whether a NerdGraph answer lists errors (a GraphQL response's top-level ``errors``)."""
    try:
        document = untrusted.loads(answer)
    except (ValueError, RecursionError):
        return False
    return isinstance(document, dict) and bool(document.get("errors"))
