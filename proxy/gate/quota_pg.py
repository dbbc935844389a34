"""Fleet-wide quotas: the buckets of :mod:`.quota`, filled by chunks leased from PostgreSQL.

With ``TRACEGATE_OUTBOX=postgresql://…`` every tracegate process of the fleet charges its
requests to the same limits. Not by a round trip per request: each process keeps its local
bucket (the same inline check, :func:`.quota._take`) and tops it up by leasing a *chunk* from
one shared row per limit — one ``INSERT … ON CONFLICT DO UPDATE … RETURNING`` per chunk, run
by a background task when the local bucket runs below half a chunk, never awaited by a
request. The row refills at the configured rate from its stored timestamp, computed in SQL
from the leasing process's wall clock (the runtime's injected ``clock``; the timestamp only
moves forward, so a replica whose clock is s seconds ahead shifts at most s × rate tokens to
itself, never more in total); a daily budget is a row per limit and UTC day.

* **Chunk**: a tenth of a second's rate, at least 1 (a request, a byte), at most the burst;
  for a daily budget 1/10,000 of it, or the bytes chunk if that is larger.
* **Borrowing**: a bucket short of a request while its lease is on the way may borrow up to
  one chunk (or that one request, if larger) from what it last saw in the row, so a fresh
  process, or one whose lease is late, does not refuse what the fleet still holds. Its next
  lease pays it back. With one replica this is exactly the per-process bucket.
* **Tolerance**: over any window of T seconds the fleet admits at most ``burst + rate × T``
  plus, per process and limit, the chunk it held when the window opened and what it had
  borrowed when it closed: two chunks (0.2 s of the rate), or a chunk and one request where
  requests are larger than a chunk; a daily budget, a chunk and one request per process.
  Chunked uploads settle after they streamed, as per process. Below the limit, what idle
  processes hold (a chunk each) is out of the others' reach, and a lease whose answer was lost
  (the database answered after the timeout) is lost to the fleet: both under-admit.
* **Bursts at one process**: it holds about a chunk and may borrow another; requests faster
  than that within one lease round trip are refused (Retry-After 1 s) while it leases more.
* **Database slow or down**: a lease not answered within ``timeout`` (0.5 s, for a
  connection and again for the answer), or a heartbeat within 2 s, or any database error,
  means the database is out of reach.
  The process then refills its buckets by the clock at its *local share*: each rate, burst
  and daily budget over the processes last counted in ``tracegate_quota_members`` (each
  process says it is alive every 10 s; forgotten after 30 s without). Before its first
  contact it knows only itself and admits the full limits. Counted in
  ``tracegate_quota_fallbacks_total``, shown by ``tracegate_quota_shared`` (0). It tries again
  after 0.5 s, doubling to 5 s; once back, it leases again (its local-share tokens are
  dropped; what it spent of a daily budget meanwhile is charged to the day's row). No request
  ever waits for the database.

Cost, measured on the busy shared 2-core machine of bench/quota.py (CPython 3.11, local
PostgreSQL 15): while the local bucket holds tokens, ``Quotas.admit`` for an account with
requests, bytes and a daily budget (bench/quota.py's limits) took 2.2 µs fleet-wide against
2.5 µs per process, interleaved in one run (timeit, best of 9 × 50,000): the same inline
check, the leases off the request path; the hooks they need (``low``, ``refill``) cost the
per-process check about 0.2 µs over what it was. A lease: 0.8 ms (median of 2,000; p99 5 ms).
Lease rate: a process consuming a limit at its full rate leases about 20 times a second for it
(a chunk is 0.1 s of rate, topped up from half), so a fleet at its limit leases 10 to 20 times
a second per limit in all, whatever its size, plus at most 10 a second per process refused by
an empty row (a short grant waits for the row to refill what was missing, at least 10 ms).
Two processes offered 50 requests/s each on a limit of 20/s (burst 20) for 5 s admitted 121
between them (one bucket: 120) with 89 leases, 17.8 a second.

Tables (created here, ``IF NOT EXISTS`` under an advisory lock, beside the outbox's):
``tracegate_quota_buckets`` (key, tokens, at), ``tracegate_quota_days`` (key, day, spent),
``tracegate_quota_members`` (process, seen_at). Rows are keyed ``account:NAME:requests``,
``rule:NAME:bytes``, ``account:NAME:daily``: a changed limit keeps its row's level (clamped to
the new burst) rather than starting full as a per-process one does; one database per fleet.
Each process opens up to two connections of its own. The connection string is a
:class:`~proxy.secrets.Secret`; errors are logged by class name only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import uuid
from collections.abc import Callable, Iterable
from typing import TypeAlias

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.gate.quota import DAY, Bucket, Budget, Meter
from proxy.secrets import Secret

log = logging.getLogger("tracegate.quota")

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
#: A chunk of a bucket: this much of one second's rate.
CHUNK_OF_RATE = 0.1
#: A chunk of a daily budget: this fraction of it (at least).
DAILY_CHUNKS = 10_000
#: After a short grant: not before the row has refilled what was missing, nor sooner than this.
MIN_BACKOFF = 0.01
#: After a short grant of a daily budget (it does not refill): ask again this much later.
DAY_BACKOFF = 5.0
#: Reconnecting: the first wait and the longest (seconds, with jitter).
RETRY_FIRST, RETRY_MAX = 0.5, 5.0
#: The key of the advisory lock the tables are created under (the outbox's is another).
SCHEMA_LOCK = 0x7472_6163_6571_7561  # "tracequa"
_EPSILON = 1e-9

_LINK_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)
_DB_ERRORS = (asyncpg.PostgresError, *_LINK_ERRORS)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tracegate_quota_buckets (
    key TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    granted DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS tracegate_quota_days (
    key TEXT NOT NULL,
    day INTEGER NOT NULL,
    spent DOUBLE PRECISION NOT NULL,
    granted DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (key, day)
);
CREATE TABLE IF NOT EXISTS tracegate_quota_members (
    id TEXT PRIMARY KEY,
    seen_at DOUBLE PRECISION NOT NULL
);
"""
# $1 key, $2 rate, $3 burst, $4 wanted, $5 now (wall clock). SET sees the row as it was, so
# ``granted`` and ``tokens`` both start from the level refilled to now; a concurrent lease
# waits for the row lock and then recomputes from the updated row (READ COMMITTED).
_LEASE = """
INSERT INTO tracegate_quota_buckets AS b (key, tokens, at, granted)
VALUES ($1, $3::float8 - LEAST($4::float8, $3::float8), $5::float8, LEAST($4::float8, $3::float8))
ON CONFLICT (key) DO UPDATE SET
    granted = LEAST($4, LEAST($3, b.tokens + GREATEST(0, $5 - b.at) * $2)),
    tokens = LEAST($3, b.tokens + GREATEST(0, $5 - b.at) * $2)
        - LEAST($4, LEAST($3, b.tokens + GREATEST(0, $5 - b.at) * $2)),
    at = GREATEST(b.at, $5)
RETURNING granted, tokens
"""
# $1 key, $2 day, $3 wanted, $4 the daily limit.
_LEASE_DAY = """
INSERT INTO tracegate_quota_days AS d (key, day, spent, granted)
VALUES ($1, $2, LEAST($3::float8, $4::float8), LEAST($3::float8, $4::float8))
ON CONFLICT (key, day) DO UPDATE SET
    granted = LEAST($3::float8, GREATEST(0, $4::float8 - d.spent)),
    spent = d.spent + LEAST($3::float8, GREATEST(0, $4::float8 - d.spent))
RETURNING granted, $4::float8 - spent
"""
_MEMBER = """
INSERT INTO tracegate_quota_members (id, seen_at) VALUES ($1, $2)
ON CONFLICT (id) DO UPDATE SET seen_at = EXCLUDED.seen_at
"""


def is_postgres(spec: str) -> bool:
    """Whether ``TRACEGATE_OUTBOX`` names PostgreSQL (then the quotas are shared there too)."""
    return spec.startswith(POSTGRES_SCHEMES)


class SharedBucket(Bucket):
    """A bucket filled by leases from its row (``refill`` 0), or, while the database is out
    of reach, by the clock at its local share (``refill`` rate / processes)."""

    __slots__ = ("chunk", "fleet", "full", "inflight", "key", "not_before", "row_left", "row_seen", "short")

    def __init__(self, fleet: SharedQuotas, key: str, rate: float, burst: float, now: float) -> None:
        super().__init__(rate, burst, now)
        self.fleet, self.key, self.full = fleet, key, burst
        self.chunk = min(burst, max(1.0, rate * CHUNK_OF_RATE))
        self.inflight, self.not_before, self.short = False, -math.inf, 0.0
        self.row_left, self.row_seen = burst, now  # not seen yet: as a new row, full
        if fleet.up:
            self.leasing(now)
        else:
            self.alone(fleet.members, now)

    def leasing(self, now: float) -> None:
        self.refill, self.burst, self.low = 0.0, self.full, self.chunk / 2
        self.tokens = min(self.tokens, 0.0)  # nothing from the local share; a debt stays owed
        self.row_left, self.row_seen, self.not_before = self.full, now, -math.inf

    def alone(self, processes: int, now: float) -> None:
        self.refill, self.burst, self.low = self.rate / processes, self.full / processes, -math.inf
        self.tokens, self.at = min(self.tokens, self.burst), now

    def lack(self, cost: float, tokens: float, now: float) -> float:
        if self.refill:  # the local share
            return (cost - tokens) / self.refill
        row = self.row_left + (now - self.row_seen) * self.rate
        credit = max(self.chunk, cost)
        avail = tokens + min(credit, row, self.full)
        if avail > cost - _EPSILON:
            return 0.0  # borrowed: the lease this charge sets off pays it back
        self.short = max(self.short, cost)
        self.fleet.want(self)
        return (cost - avail) / self.rate

    def low_water(self) -> None:
        self.fleet.want(self)

    def wanted(self) -> float:
        """Enough to hold a chunk (or the request that was short), with any debt paid."""
        return max(self.chunk, self.short) - self.tokens

    def landed(self, want: float, granted: float, left: float, now: float, day: int) -> bool:
        """A lease's answer; whether to lease again at once (granted in full, still low)."""
        self.tokens += granted
        self.row_left, self.row_seen, self.short = left, now, 0.0
        if granted < want - _EPSILON:  # the row is short: ask when it should have refilled
            self.not_before = now + max(MIN_BACKOFF, (want - granted) / self.rate)
            return False
        return self.tokens < self.low


class SharedBudget(Budget):
    """A daily budget whose bytes are leased from the day's row (``limit``: what was granted
    today), or, while the database is out of reach, its local share of the day."""

    __slots__ = ("chunk", "daily", "fleet", "granted", "inflight", "key", "not_before", "row_left", "share", "short")

    def __init__(self, fleet: SharedQuotas, key: str, limit: int, rate: float | None) -> None:
        super().__init__(0.0)
        self.fleet, self.key, self.daily = fleet, key, float(limit)
        self.chunk = min(self.daily, max(1.0, limit / DAILY_CHUNKS, (rate or 0.0) * CHUNK_OF_RATE))
        self.inflight, self.not_before, self.short = False, -math.inf, 0.0
        self.granted, self.row_left, self.share = 0.0, self.daily, 0.0
        if fleet.up:
            self.leasing(0.0)
        else:
            self.alone(fleet.members, 0.0)

    def leasing(self, now: float) -> None:
        self.share, self.limit, self.low = 0.0, self.granted, self.chunk / 2
        self.row_left, self.not_before = self.daily, -math.inf  # what was spent alone is charged next

    def alone(self, processes: int, now: float) -> None:
        self.share, self.low = self.daily / processes, -math.inf
        self.limit = max(self.granted, self.share)

    def roll(self, day: int) -> None:
        self.day, self.spent, self.granted, self.row_left = day, 0.0, 0.0, self.daily
        self.limit, self.not_before = self.share, -math.inf

    def lack(self, need: float, wall: float, day: int) -> float:
        until_midnight = (day + 1) * DAY - wall
        if self.share:  # the local share
            return until_midnight
        left = self.limit - self.spent
        if left + min(max(self.chunk, need), self.row_left) >= need:
            return 0.0  # borrowed, as a bucket does
        if left + self.row_left < need:
            return until_midnight  # the fleet's day cannot take it
        self.short = max(self.short, need)
        self.fleet.want(self)
        return 1.0  # borrowed too much already: its lease is on the way

    def low_water(self) -> None:
        self.fleet.want(self)

    def wanted(self) -> float:
        return max(self.chunk, self.short) - (self.limit - self.spent)

    def landed(self, want: float, granted: float, left: float, now: float, day: int) -> bool:
        if day != self.day:
            return False  # granted for a day gone by
        self.granted += granted
        self.limit = max(self.granted, self.share)
        self.row_left, self.short = left, 0.0
        if granted < want - _EPSILON:
            self.not_before = now + DAY_BACKOFF
            return False
        return self.limit - self.spent < self.low


_Leased: TypeAlias = SharedBucket | SharedBudget


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.leases = Counter(
            "tracegate_quota_leases",
            "Chunks leased from the shared quota rows by result: granted (in full), short (the fleet is at "
            "its limit), failed (the database is out of reach).",
            ("result",),
            registry=registry,
        )
        self.fallbacks = Counter(
            "tracegate_quota_fallbacks",
            "Times this process lost the quota database and admitted its local share of each limit.",
            registry=registry,
        )
        self.shared = Gauge(
            "tracegate_quota_shared",
            "1 while limits are leased from PostgreSQL (fleet-wide); 0 while this process admits its local share.",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.processes = Gauge(
            "tracegate_quota_processes",
            "Processes sharing the quotas, as last counted: the local share is each limit over this.",
            registry=registry,
            multiprocess_mode="livemax",
        )


class SharedQuotas:
    """The fleet's limits in PostgreSQL, for :func:`.quota.build_quotas` (``shared=``).

    ``clock``: wall-clock seconds (the rows' timestamps and days); ``monotonic``: the buckets'
    clock, as passed to :meth:`.quota.Quotas.admit`. ``timeout``: seconds a lease may take
    (waiting for a connection, then for the answer, each) before the database counts as out
    of reach. ``heartbeat``: seconds between the process's "still here" rows."""

    def __init__(
        self,
        dsn: Secret,
        *,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        registry: CollectorRegistry | None = None,
        timeout: float = 0.5,
        connect_timeout: float = 2.0,
        heartbeat: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self._clock, self._monotonic = clock, monotonic
        self._timeout, self._connect_timeout, self._every = timeout, connect_timeout, heartbeat
        self._metrics = _Metrics(registry) if registry is not None else None
        #: Leasing from the database (else: each limit's local share).
        self.up = False
        #: Processes last counted alive (the local share is each limit over this).
        self.members = 1
        self._id = uuid.uuid4().hex
        self._items: list[_Leased] = []
        self._pool: asyncpg.Pool | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._leases: set[asyncio.Task[None]] = set()
        self._tried = asyncio.Event()  # the first contact was attempted
        self._lost = asyncio.Event()  # a lease failed: the keeper retries from now
        self._told = False  # the fallback was logged and counted

    # -- what build_quotas calls ------------------------------------------------------------------

    def bucket(self, key: str, rate: float, burst: float, now: float) -> Bucket:
        return SharedBucket(self, key, rate, burst, now)

    def budget(self, key: str, limit: int, rate: float | None) -> Budget:
        return SharedBudget(self, key, limit, rate)

    def serving(self, meters: Iterable[Meter]) -> None:
        """The limits in force; the first ones start the connection (in the background)."""
        self._items = [
            item
            for m in meters
            for item in (m.requests, m.bytes, m.budget)
            if isinstance(item, SharedBucket | SharedBudget)
        ]
        if self._items and self._keeper is None:
            self._keeper = asyncio.get_running_loop().create_task(self._keep())

    # -- lifecycle --------------------------------------------------------------------------------

    async def started(self) -> None:
        """Wait for the first contact with the database (bounded), if any limit was set, so
        that a process starting beside a reachable database leases from its first request."""
        if self._keeper is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tried.wait(), 2 * self._connect_timeout + 1)

    async def settled(self) -> None:
        """Wait until no lease is under way (a test, between its steps)."""
        while self._leases:
            await asyncio.gather(*self._leases, return_exceptions=True)

    async def close(self) -> None:
        tasks = [t for t in (self._keeper, *self._leases) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._keeper, self.up = None, False
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:  # gone: no longer counted in the others' local shares
            async with pool.acquire(timeout=self._timeout) as db:
                await db.execute("DELETE FROM tracegate_quota_members WHERE id = $1", self._id, timeout=self._timeout)
            await asyncio.wait_for(pool.close(), 5.0)
        except _DB_ERRORS:
            pool.terminate()

    async def _connect(self) -> asyncpg.Pool:
        pool = await asyncpg.create_pool(
            self._dsn.reveal(),
            min_size=1,
            max_size=2,
            timeout=self._connect_timeout,
            command_timeout=self._connect_timeout,
        )
        try:
            async with pool.acquire() as db, db.transaction():
                await db.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                await db.execute(_SCHEMA)
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool
        return pool

    async def heartbeat(self) -> int:
        """Say this process is alive, forget the long gone, and count the live processes
        (seen within three heartbeats). Connects first if need be; raises if it cannot."""
        pool = self._pool or await self._connect()
        now, wait = self._clock(), self._connect_timeout
        async with pool.acquire(timeout=wait) as db:
            await db.execute(_MEMBER, self._id, now, timeout=wait)
            count = await db.fetchval(
                "SELECT count(*) FROM tracegate_quota_members WHERE seen_at > $1", now - 3 * self._every, timeout=wait
            )
            await db.execute("DELETE FROM tracegate_quota_members WHERE seen_at < $1", now - 30 * self._every)
            await db.execute("DELETE FROM tracegate_quota_days WHERE day < $1", int(now // DAY) - 1)
        self.members = max(1, int(count or 0))
        if self._metrics is not None:
            self._metrics.processes.set(self.members)
        return self.members

    async def _keep(self) -> None:
        """Heartbeats while the database answers; while it does not (a heartbeat or a lease
        failed), retries with backoff."""
        delay = RETRY_FIRST
        while True:
            self._lost.clear()
            try:
                await self.heartbeat()
            except _DB_ERRORS as exc:
                self._alone(exc)
            else:
                delay = RETRY_FIRST
                if not self.up:
                    self._leasing()
                self._tried.set()
                with contextlib.suppress(TimeoutError):  # until the next heartbeat, or a failed lease
                    await asyncio.wait_for(self._lost.wait(), self._every)
                continue
            self._tried.set()
            if self._pool is not None:
                await self._pool.expire_connections()  # a restarted server left them all dead
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
            delay = min(2 * delay, RETRY_MAX)

    def _alone(self, exc: BaseException) -> None:
        self._lost.set()
        if not self.up and self._told:
            return
        self.up, self._told = False, True
        log.warning(
            "quota database out of reach; each limit admits its local share (1/%d) until it is back",
            self.members,
            extra={"error": type(exc).__name__},
        )
        if self._metrics is not None:
            self._metrics.fallbacks.inc()
            self._metrics.shared.set(0)
        now = self._monotonic()
        for item in self._items:
            item.alone(self.members, now)

    def _leasing(self) -> None:
        if self._told:
            log.info("quota database reached again; limits are fleet-wide")
        self.up, self._told = True, False
        if self._metrics is not None:
            self._metrics.shared.set(1)
        now = self._monotonic()
        for item in self._items:
            item.leasing(now)

    # -- leases -----------------------------------------------------------------------------------

    def want(self, item: _Leased) -> None:
        """Lease for ``item`` in the background, unless a lease is under way, the database is
        out of reach or the row was short a moment ago. Called on the request path: no wait."""
        if item.inflight or not self.up or item.not_before > self._monotonic():
            return
        item.inflight = True
        task = asyncio.get_running_loop().create_task(self._lease(item))
        self._leases.add(task)
        task.add_done_callback(self._leases.discard)

    async def _lease(self, item: _Leased) -> None:
        try:
            again = True
            while again and self.up and self._pool is not None:
                want = item.wanted()
                if want < _EPSILON:
                    return
                day = item.day if isinstance(item, SharedBudget) else 0
                try:
                    granted, left = await self._ask(self._pool, item, want, day)
                except _DB_ERRORS as exc:
                    if self._metrics is not None:
                        self._metrics.leases.labels("failed").inc()
                    self._alone(exc)
                    return
                if self._metrics is not None:
                    self._metrics.leases.labels("granted" if granted > want - _EPSILON else "short").inc()
                again = item.landed(want, granted, left, self._monotonic(), day)
        finally:
            item.inflight = False

    async def _ask(self, pool: asyncpg.Pool, item: _Leased, want: float, day: int) -> tuple[float, float]:
        """One lease: (granted, what the row holds after it)."""
        async with pool.acquire(timeout=self._timeout) as db:
            if isinstance(item, SharedBudget):
                row = await db.fetchrow(_LEASE_DAY, item.key, day, want, item.daily, timeout=self._timeout)
            else:
                args = (item.key, item.rate, item.full, want, self._clock())
                row = await db.fetchrow(_LEASE, *args, timeout=self._timeout)
        if row is None:  # pragma: no cover - an upsert with RETURNING always answers a row
            raise asyncpg.InterfaceError("no row")
        return float(row[0]), float(row[1])
