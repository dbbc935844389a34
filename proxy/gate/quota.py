"""Per-identity quotas: token buckets for requests and bytes and a daily byte budget, per
service account and per rule (``limits:``, proxy/policy/limits.py), held by this process.

What is charged, and when (exports only: the ingest and the gateway check, not deployment
markers nor ``/v1/traceparent``):

* one request token per admitted request, at admission, by every door;
* its bytes — the body as sent, compressed if it was — at admission from a declared
  ``Content-Length`` (OTLP/HTTP); for OTLP/gRPC once its one message has been read and
  before anything is forwarded (gRPC declares no length up front). A chunked OTLP/HTTP
  upload without a length is let in while the byte bucket is not in debt and the day's
  budget not spent, and is charged *after* it streamed (:meth:`Quotas.settle`): one such
  upload can overdraw by up to ``TRACEGATE_MAX_BODY_BYTES``, which the requests after it
  wait off. The gateway check carries no body: behind a gateway only requests count.
* A request larger than its bucket's burst passes when the bucket is full and leaves it in
  debt (else it could never pass); a request over the whole daily budget never passes.

A request is charged to its account's limits and its rule's. Every one must have room, or
nothing is charged and the refusal names the limit with the longest wait
(``quota-requests``, ``quota-bytes``, ``quota-daily-bytes``), which becomes Retry-After
(whole seconds, rounded up) or the gRPC pushback. A refused request is answered at the door
and never reaches the upstream.

Per process, unless shared: each tracegate process keeps its own buckets, so N replicas of W
workers (``TRACEGATE_WORKERS``, SO_REUSEPORT) admit up to N × W times the configured rates.
With the PostgreSQL outbox configured the limits are fleet-wide (:mod:`.quota_pg`): the same
buckets, filled by chunks leased from one row per limit instead of by the clock — the hooks
below (``refill``, ``low``, :meth:`Bucket.lack`, :meth:`Bucket.low_water`) are where it plugs
in, and cost a compare per bucket here. A reload keeps the state of each limit that did not
change: a SIGHUP grants no fresh burst.

Why not a library: ``limits`` has no token bucket (fixed, moving and sliding windows), its
memory storage reads ``time.time()`` itself and expires keys on a timer thread;
``aiolimiter`` is a leaky bucket that *waits* on the event loop's clock rather than refusing
with a delay; ``pyrate-limiter`` stores one list entry per unit of weight (20,000 for one
20 KB export). The bucket below is a few dozen lines with the clock passed in, so tests
control time without sleeping.

Cost, limits configured and not reached (``python bench/quota.py``: timeit of admission's
quota step, best of 15 × 100,000; CPython 3.11 on a shared 2-core machine where a
six-argument call costs 45 ns): an account with requests, bytes and a daily budget 2.2 µs
per admission (the Content-Length parse 0.3 µs, two clock reads 0.15 µs, the buckets the
rest); the same plus rule limits 2.7 µs; a rule without limits in a policy that has some
0.25 µs (one dict lookup); a policy without limits 0.04 µs (``gate.quotas is None``). A
20 KB export costs about 190 µs of CPU in the same run (``--e2e``), so the dearest case is
about 1.2 %. The hooks for fleet-wide limits added about 0.2 µs to the first case (measured
interleaved against the code before them); fleet-wide, the check costs the same
(:mod:`.quota_pg`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Final, NamedTuple, Protocol

from multidict import MultiMapping

from proxy.policy.model import Limits, Policy

REQUESTS: Final = "quota-requests"
BYTES: Final = "quota-bytes"
DAILY_BYTES: Final = "quota-daily-bytes"
#: Seconds in a UTC day (POSIX time has no leap seconds).
DAY: Final = 86_400
#: The admissions quotas apply to (``admit``'s ``mode``): exports, not markers nor traceparent.
METERED_MODES: Final = frozenset({"ingest", "authz"})
#: Float slack: refilling 0.1 s at 10/s gives 0.9999999999999999 tokens.
_EPSILON = 1e-9

Clock = Callable[[], float]


class Exhausted(NamedTuple):
    """A limit without room: its reason code, and seconds until it has room."""

    reason: str
    wait: float

    @property
    def retry_after(self) -> int:
        """Whole seconds to wait (Retry-After), rounded up, at least 1."""
        return max(1, math.ceil(self.wait))


class Bucket:
    """A token bucket: ``rate`` tokens a second, holding at most ``burst``. It may run into
    debt (a charge over what it holds), which refills like any shortfall. Refilled and
    charged inline by :func:`_take`, which runs on every metered admission.

    ``refill`` is the rate it refills at by itself (``rate``; 0 for a bucket filled by leases,
    :mod:`.quota_pg`); below ``low`` tokens :meth:`low_water` is called (never, here)."""

    __slots__ = ("at", "burst", "low", "rate", "refill", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = self.refill = rate
        self.burst = self.tokens = burst
        self.at, self.low = now, -math.inf

    def lack(self, cost: float, tokens: float, now: float) -> float:
        """Seconds until ``cost`` tokens are there, holding ``tokens`` (fewer) at ``now``;
        0: it may pass anyway (a shared bucket borrowing ahead of its lease)."""
        return (cost - tokens) / self.rate

    def low_water(self) -> None:
        """It holds fewer than ``low`` tokens (a shared bucket leases more)."""


class Budget:
    """Bytes a UTC day: ``spent`` counts ``day`` (days since the epoch) against ``limit``;
    below ``low`` bytes left, :meth:`low_water` is called (never, here)."""

    __slots__ = ("day", "limit", "low", "spent")

    def __init__(self, limit: float) -> None:
        self.limit, self.day, self.spent, self.low = limit, -1, 0.0, -math.inf

    def roll(self, day: int) -> None:
        """A new UTC day: nothing spent yet."""
        self.day, self.spent = day, 0.0

    def lack(self, need: float, wall: float, day: int) -> float:
        """Seconds until ``need`` more bytes fit (they do not now); 0: they may pass anyway."""
        return (day + 1) * DAY - wall

    def low_water(self) -> None:
        """Fewer than ``low`` bytes are left (a shared budget leases more)."""


class Shared(Protocol):
    """Where a fleet's limits are kept (:class:`.quota_pg.SharedQuotas`): it makes the buckets
    and budgets that lease from there, and learns which are in force after each (re)load."""

    def bucket(self, key: str, rate: float, burst: float, now: float) -> Bucket: ...

    def budget(self, key: str, limit: int, rate: float | None) -> Budget: ...

    def serving(self, meters: Iterable[Meter]) -> None: ...


class Meter:
    """The state of one ``limits:`` (an account's or a rule's), kept across reloads. ``key``
    (``account:NAME``, ``rule:NAME``) names its rows when ``shared``."""

    __slots__ = ("budget", "bytes", "limits", "requests")

    def __init__(self, limits: Limits, now: float, key: str = "", shared: Shared | None = None) -> None:
        self.limits = limits
        rps, bps, daily = limits.requests_per_second, limits.bytes_per_second, limits.daily_bytes

        def bucket(kind: str, rate: float, burst: float) -> Bucket:
            return Bucket(rate, burst, now) if shared is None else shared.bucket(f"{key}:{kind}", rate, burst, now)

        self.requests = bucket("requests", rps, limits.requests_burst or 1) if rps is not None else None
        self.bytes = bucket("bytes", bps, limits.bytes_burst or 1) if bps is not None else None
        self.budget: Budget | None = None
        if daily is not None:
            self.budget = Budget(daily) if shared is None else shared.budget(f"{key}:daily", daily, bps)


class Plan(NamedTuple):
    """What a request admitted by one rule is charged to: its account's and its own."""

    requests: tuple[Bucket, ...]
    bytes: tuple[Bucket, ...]
    budgets: tuple[Budget, ...]


def _take(plan: Plan, request: bool, need: int, size: int, now: float, clock: Clock) -> Exhausted | None:
    """Refill ``plan``'s buckets to ``now`` and charge one request (when ``request``) and
    ``size`` bytes, if one request and ``need`` bytes fit everywhere; else undo the charges
    and return the longest wait. (One pass that charges as it checks, undone on a refusal:
    passing is the common case.)"""
    wait, why = 0.0, None  # the longest wait, and which limit it is
    for bucket in plan.requests if request else ():
        tokens = bucket.tokens
        if now > bucket.at:
            tokens += (now - bucket.at) * bucket.refill
            if tokens > bucket.burst:
                tokens = bucket.burst
            bucket.at = now
        if tokens < 1 - _EPSILON:
            lack = bucket.lack(1, tokens, now)
            if lack > wait:
                wait, why = lack, REQUESTS
        tokens -= 1
        bucket.tokens = tokens
        if tokens < bucket.low:
            bucket.low_water()
    for bucket in plan.bytes if need else ():
        tokens = bucket.tokens
        if now > bucket.at:
            tokens += (now - bucket.at) * bucket.refill
            if tokens > bucket.burst:
                tokens = bucket.burst
            bucket.at = now
        cost = need if need < bucket.burst else bucket.burst
        if cost - tokens > _EPSILON:
            lack = bucket.lack(cost, tokens, now)
            if lack > wait:
                wait, why = lack, BYTES
        tokens -= size
        bucket.tokens = tokens
        if tokens < bucket.low:
            bucket.low_water()
    if need and plan.budgets:
        wall = clock()
        day = int(wall // DAY)
        for budget in plan.budgets:
            if budget.day != day:
                budget.roll(day)
            spent, limit = budget.spent, budget.limit
            if spent + need > limit:
                lack = budget.lack(need, wall, day)
                if lack > wait:
                    wait, why = lack, DAILY_BYTES
            spent += size
            budget.spent = spent
            if limit - spent < budget.low:
                budget.low_water()
    if why is None:
        return None
    for bucket in plan.requests if request else ():
        bucket.tokens += 1
    for bucket in plan.bytes if need else ():
        bucket.tokens += size
    for budget in plan.budgets if need else ():
        budget.spent -= size
    return Exhausted(why, wait)


class Quotas:
    """Every metered rule's :class:`Plan`. Built per policy load by :func:`build_quotas`;
    None where a policy sets no limits."""

    def __init__(self, plans: dict[str, Plan], meters: dict[tuple[str, str], Meter]) -> None:
        self._plans = plans  # rule name → plan
        self._meters = meters  # ("account" | "rule", name) → its state: kept across reloads

    def covers(self, rule: str) -> bool:
        """Whether a request admitted by ``rule`` is charged to any limit."""
        return rule in self._plans

    def admit(
        self, rule: str, transport: str, mode: str, headers: MultiMapping[str], now: float, clock: Clock
    ) -> Exhausted | bool:
        """Charge an admission by ``rule``: one request and its declared bytes. Exhausted:
        refuse it (nothing charged). True: its bytes are not known yet — charge them with
        :meth:`settle` once they are (OTLP/HTTP without Content-Length). False: done."""
        plan = self._plans.get(rule)
        if plan is None or mode not in METERED_MODES:
            return False
        # Declared up front: OTLP/HTTP's Content-Length, unless Transfer-Encoding overrides it
        # (RFC 9112 §6.3); OTLP/gRPC's message is charged when read; the gateway check has no body.
        size: int | None = 0 if transport == "authz" else None
        if transport == "http":
            length = headers.get("Content-Length")
            if length is not None and length.isdigit() and "Transfer-Encoding" not in headers:
                size = int(length)
        found = _take(plan, True, 1 if size is None else size, size or 0, now, clock)
        if found is not None:
            return found
        return size is None and transport == "http" and bool(plan.bytes or plan.budgets)

    def take_bytes(self, rule: str, size: int, now: float, clock: Clock) -> Exhausted | None:
        """Charge ``size`` bytes read before forwarding (an OTLP/gRPC message), or refuse."""
        plan = self._plans.get(rule)
        return _take(plan, False, size, size, now, clock) if plan is not None else None

    def settle(self, rule: str, size: int, now: float, clock: Clock) -> None:
        """Charge ``size`` bytes already sent (a chunked upload): never refuses; a debt
        makes the next requests wait."""
        plan = self._plans.get(rule)
        if plan is not None:
            _take(plan, False, 1, 0, now, clock)  # refills to now and rolls the day over; charges nothing
            for bucket in plan.bytes:
                bucket.tokens -= size
                if bucket.tokens < bucket.low:
                    bucket.low_water()
            for budget in plan.budgets:
                budget.spent += size
                if budget.limit - budget.spent < budget.low:
                    budget.low_water()


def build_quotas(
    policy: Policy, now: float, previous: Quotas | None = None, shared: Shared | None = None
) -> Quotas | None:
    """The plans of ``policy`` (None: it sets no limits). A limit unchanged since
    ``previous`` keeps its state, so a reload neither refills nor empties a bucket.
    ``shared``: the fleet's store (its limits lease from there; it learns which serve)."""
    kept = previous._meters if previous is not None else {}
    meters: dict[tuple[str, str], Meter] = {}

    def meter(kind: str, name: str, limits: Limits) -> Meter:
        found = meters.get((kind, name)) or kept.get((kind, name))
        if found is None or found.limits != limits:
            found = Meter(limits, now, f"{kind}:{name}", shared)
        meters[(kind, name)] = found
        return found

    plans: dict[str, Plan] = {}
    for rule in policy.rules:
        account = policy.service_accounts.get(rule.service_account or "")
        if rule.effect != "allow" or account is None:
            continue
        owned = [meter("account", account.name, account.limits)] if account.limits is not None else []
        if rule.limits is not None:
            owned.append(meter("rule", rule.name, rule.limits))
        if owned:
            plans[rule.name] = Plan(
                tuple(m.requests for m in owned if m.requests is not None),
                tuple(m.bytes for m in owned if m.bytes is not None),
                tuple(m.budget for m in owned if m.budget is not None),
            )
    if shared is not None:
        shared.serving(meters.values())
    return Quotas(plans, meters) if plans else None
