"""The shared outbox on PostgreSQL: one database for every replica of tracegate.

The same contract as the SQLite outbox (:mod:`.outbox`), held by the database rather than by
one process, so that replicas may receive, dedupe and send the same events together:

- **Dedupe by constraint, not by a read.** ``key`` (the delivery id) is the primary key of
  the events table; the body digest is the primary key of a digests table whose row is only
  taken over once it is older than the dedupe window (``INSERT … ON CONFLICT DO UPDATE …
  WHERE``). Two replicas inserting the same delivery at once: the second blocks on the first's
  uncommitted row and then sees the conflict. Both statements run in one transaction, so a
  duplicate body leaves no event behind.
- **Leases with ``FOR UPDATE SKIP LOCKED``.** :meth:`due` moves each claimed event's
  ``next_attempt_at`` past the lease; replicas skip rows another is claiming; a replica that
  dies holding leases leaves those events due again when the lease runs out.
- **Commit before 202.** :meth:`add` returns after PostgreSQL's COMMIT (``synchronous_commit``
  as the server sets it; the default waits for the WAL flush). Any database failure raises
  :class:`~proxy.errors.OutboxUnavailable`, and the route answers 503.
- **Migrations** are numbered, each applied once in its own transaction under a
  transaction-scoped advisory lock, so replicas starting together apply them exactly once.
  Migration 2 adds the delivery facts the DORA keys are derived from (:mod:`.dora_facts`).

Times are the replicas' own clocks (seconds since the epoch, as in SQLite): keep the nodes'
clocks in sync (NTP), as Kubernetes nodes are. The connection string is a
:class:`~proxy.secrets.Secret`: it is never logged, and errors carry only a class name.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import asyncpg

from proxy.ci.outbox import Added, Due, Fact, Pending, due_times
from proxy.errors import OutboxUnavailable
from proxy.secrets import Secret

T = TypeVar("T")
_Conn: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
log = logging.getLogger("tracegate.outbox")

#: Any number the same for every replica: the key of the migration advisory lock.
MIGRATION_LOCK = 0x7472_6163_6567_6174  # "tracegat"
#: (version, what it does, SQL). Append only: a released migration never changes.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "events and body digests",
        """
        CREATE TABLE tracegate_outbox_events (
            id BIGSERIAL PRIMARY KEY,
            key TEXT NOT NULL UNIQUE,
            body_digest TEXT NOT NULL,
            source TEXT NOT NULL,
            service_account TEXT NOT NULL,
            payload BYTEA NOT NULL,
            received_at DOUBLE PRECISION NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at DOUBLE PRECISION NOT NULL,
            last_result TEXT
        );
        CREATE INDEX tracegate_outbox_due ON tracegate_outbox_events (next_attempt_at, id)
            WHERE state = 'pending';
        CREATE INDEX tracegate_outbox_received ON tracegate_outbox_events (received_at);
        CREATE TABLE tracegate_outbox_digests (
            body_digest TEXT PRIMARY KEY,
            received_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX tracegate_outbox_digests_received ON tracegate_outbox_digests (received_at);
        """,
    ),
    (
        2,
        "delivery facts for the DORA keys",
        """
        CREATE TABLE tracegate_delivery_facts (
            key TEXT PRIMARY KEY,
            scope TEXT NOT NULL,
            kind TEXT NOT NULL,
            at_ns BIGINT NOT NULL,
            body TEXT NOT NULL,
            received_at DOUBLE PRECISION NOT NULL,
            settle_at DOUBLE PRECISION,
            window_at DOUBLE PRECISION
        );
        CREATE INDEX tracegate_delivery_facts_scope ON tracegate_delivery_facts (scope, at_ns);
        CREATE INDEX tracegate_delivery_facts_settle ON tracegate_delivery_facts (settle_at)
            WHERE settle_at IS NOT NULL;
        CREATE INDEX tracegate_delivery_facts_window ON tracegate_delivery_facts (window_at)
            WHERE window_at IS NOT NULL;
        """,
    ),
)

#: Failures of the link to the database (as opposed to a bad statement): worth one retry on
#: a fresh connection, since a restarted server leaves every pooled connection dead.
_LINK_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)
_DB_ERRORS = (asyncpg.PostgresError, *_LINK_ERRORS)

_ADD_EVENT = """
INSERT INTO tracegate_outbox_events
    (key, body_digest, source, service_account, payload, received_at, next_attempt_at)
VALUES ($1, $2, $3, $4, $5, $6, $6)
ON CONFLICT (key) DO NOTHING
RETURNING id
"""
_CLAIM_DIGEST = """
INSERT INTO tracegate_outbox_digests AS d (body_digest, received_at) VALUES ($1, $2)
ON CONFLICT (body_digest) DO UPDATE SET received_at = EXCLUDED.received_at
    WHERE d.received_at <= EXCLUDED.received_at - $3
RETURNING 1
"""
_CLAIM_DUE = """
UPDATE tracegate_outbox_events SET next_attempt_at = $2
WHERE id IN (
    SELECT id FROM tracegate_outbox_events
    WHERE state = 'pending' AND next_attempt_at <= $1
    ORDER BY next_attempt_at, id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
RETURNING id, key, source, service_account, payload, attempts, received_at
"""
_OUTCOME = """
UPDATE tracegate_outbox_events
SET state = $2, attempts = attempts + 1, last_result = $3, next_attempt_at = COALESCE($4, next_attempt_at)
WHERE id = $1
"""
_FACT_COLUMNS = "key, scope, kind, at_ns, body, received_at, settle_at, window_at"
_ADD_FACT = f"""
INSERT INTO tracegate_delivery_facts ({_FACT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (key) DO NOTHING
RETURNING 1
"""  # noqa: S608
_DUE_FACTS = f"""
SELECT {_FACT_COLUMNS} FROM tracegate_delivery_facts
WHERE settle_at <= $1 OR window_at <= $1
ORDER BY at_ns, key LIMIT $2
"""  # noqa: S608
_SCOPE_FACTS = f"""
SELECT {_FACT_COLUMNS} FROM tracegate_delivery_facts WHERE scope = $1 AND at_ns >= $2 ORDER BY at_ns, key
"""  # noqa: S608
_STATS = """
SELECT count(*) FILTER (WHERE state = 'pending'),
       min(received_at) FILTER (WHERE state = 'pending'),
       min(next_attempt_at) FILTER (WHERE state = 'pending')
FROM tracegate_outbox_events
"""


class PostgresOutbox:
    """The outbox in PostgreSQL. ``connect_timeout`` and ``command_timeout`` (seconds) bound
    how long a webhook waits on an unreachable database before its 503 (at most twice each:
    one retry), below the 5 s Gitea allows a delivery by default."""

    def __init__(
        self,
        dsn: Secret,
        *,
        clock: Callable[[], float],
        dedupe_window: float = 86400.0,
        pool_size: int = 8,
        connect_timeout: float = 2.0,
        command_timeout: float = 5.0,
        start_attempts: int = 30,
    ) -> None:
        self._dsn = dsn
        self._clock = clock
        self._window = dedupe_window
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._start_attempts = start_attempts
        self._pool: asyncpg.Pool | None = None
        self.wake = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and migrate. Retries with backoff while the database is unreachable
        (a replica may start before its database), then raises OutboxUnavailable."""
        for attempt in range(self._start_attempts):
            try:
                pool = await asyncpg.create_pool(
                    self._dsn.reveal(),
                    min_size=1,
                    max_size=self._pool_size,
                    timeout=self._connect_timeout,
                    command_timeout=self._command_timeout,
                )
                try:
                    await self._migrate(pool)
                except BaseException:
                    await pool.close()
                    raise
            except _DB_ERRORS as exc:
                if attempt + 1 == self._start_attempts:
                    raise OutboxUnavailable(f"outbox-database-{type(exc).__name__}") from None
                log.warning("outbox database not reachable yet; retrying", extra={"error": type(exc).__name__})
                await asyncio.sleep(min(0.2 * 2**attempt, 5.0) * random.uniform(0.5, 1.0))  # noqa: S311
            else:
                self._pool = pool
                return

    @staticmethod
    async def _migrate(pool: asyncpg.Pool) -> None:
        async with pool.acquire() as db, db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await db.execute(
                "CREATE TABLE IF NOT EXISTS tracegate_schema_migrations ("
                " version INTEGER PRIMARY KEY, description TEXT NOT NULL,"
                " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            applied = {r[0] for r in await db.fetch("SELECT version FROM tracegate_schema_migrations")}
            for version, description, sql in MIGRATIONS:
                if version in applied:
                    continue
                await db.execute(sql)
                await db.execute(
                    "INSERT INTO tracegate_schema_migrations (version, description) VALUES ($1, $2)",
                    version,
                    description,
                )
                log.info("outbox schema migrated", extra={"version": version})

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5.0)
            except (TimeoutError, *_DB_ERRORS):
                pool.terminate()

    async def _run(self, fn: Callable[[_Conn], Awaitable[T]]) -> T:
        """``fn`` on a pooled connection; a broken link is retried once on a new connection
        (every statement here is idempotent or conflict-checked, so a retry after a commit
        whose answer was lost finds the row and reports a duplicate). Any other database
        failure, or a second one, becomes OutboxUnavailable."""
        pool = self._pool
        if pool is None:
            raise OutboxUnavailable("outbox-closed")
        for attempt in (1, 2):
            try:
                async with pool.acquire(timeout=self._connect_timeout) as db:
                    return await fn(db)
            except _LINK_ERRORS as exc:
                await pool.expire_connections()  # the others are likely dead too: reconnect on next use
                if attempt == 2:
                    raise OutboxUnavailable(f"outbox-database-{type(exc).__name__}") from None
            except asyncpg.PostgresError as exc:
                raise OutboxUnavailable(f"outbox-database-{type(exc).__name__}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    # -- the interface --------------------------------------------------------------------------

    async def add(self, *, key: str, body_digest: str, source: str, service_account: str, payload: bytes) -> Added:
        now = self._clock()

        async def insert(db: _Conn) -> Added:
            async with db.transaction():
                if await db.fetchval(_ADD_EVENT, key, body_digest, source, service_account, payload, now) is None:
                    return "duplicate-delivery"
                if await db.fetchval(_CLAIM_DIGEST, body_digest, now, self._window) is None:
                    raise _DuplicateBody  # rolls the event back
                return "stored"

        try:
            result = await self._run(insert)
        except _DuplicateBody:
            return "duplicate-body"
        self.wake.set()
        return result

    async def due(self, limit: int = 50, lease: float = 60.0) -> list[Pending]:
        now = self._clock()

        async def claim(db: _Conn) -> list[Pending]:
            rows = await db.fetch(_CLAIM_DUE, now, now + lease, limit)
            return sorted((Pending(*row) for row in rows), key=lambda p: p.id)

        return await self._run(claim)

    async def _outcome(self, event_id: int, state: str, result: str, next_at: float | None) -> None:
        await self._run(lambda db: db.execute(_OUTCOME, event_id, state, result, next_at))

    async def delivered(self, event_id: int, result: str) -> None:
        await self._outcome(event_id, "delivered", result, None)

    async def failed(self, event_id: int, result: str) -> None:
        await self._outcome(event_id, "failed", result, None)

    async def retry_later(self, event_id: int, result: str, delay: float) -> None:
        await self._outcome(event_id, "pending", result, self._clock() + delay)

    async def stats(self) -> dict[str, Any]:
        now = self._clock()

        async def query(db: _Conn) -> dict[str, Any]:
            row = await db.fetchrow(_STATS)
            depth, oldest, next_due = row if row is not None else (0, None, None)
            rows = await db.fetch("SELECT state, count(*) FROM tracegate_outbox_events GROUP BY state")
            states = {str(r[0]): int(r[1]) for r in rows}
            return {
                "depth": depth,
                "oldest_age": (now - oldest) if oldest is not None else 0.0,
                "next_due": next_due,
                "states": states,
            }

        return await self._run(query)

    async def add_fact(
        self, *, key: str, scope: str, kind: str, at_ns: int, body: str, settle: float | None, window_ends: float | None
    ) -> bool:
        now = self._clock()
        settle_at, window_at = due_times(now, settle, window_ends)
        added = await self._run(
            lambda db: db.fetchval(_ADD_FACT, key, scope, kind, at_ns, body, now, settle_at, window_at)
        )
        return added is not None

    async def due_facts(self, grace: float, limit: int = 100) -> list[Fact]:
        until = self._clock() - grace
        rows = await self._run(lambda db: db.fetch(_DUE_FACTS, until, limit))
        return [Fact(*row) for row in rows]

    async def scope_facts(self, scope: str, since_ns: int) -> list[Fact]:
        rows = await self._run(lambda db: db.fetch(_SCOPE_FACTS, scope, since_ns))
        return [Fact(*row) for row in rows]

    async def settle_fact(self, key: str, which: Due) -> None:
        column = "settle_at" if which == "settle" else "window_at"
        sql = f"UPDATE tracegate_delivery_facts SET {column} = NULL WHERE key = $1"  # noqa: S608
        await self._run(lambda db: db.execute(sql, key))

    async def prune_facts(self, before_ns: int) -> int:
        status = await self._run(
            lambda db: db.execute(
                "DELETE FROM tracegate_delivery_facts WHERE at_ns < $1 AND settle_at IS NULL AND window_at IS NULL",
                before_ns,
            )
        )
        return int(status.rsplit(" ", 1)[-1])

    async def prune(self) -> int:
        """Forget delivered events and body digests older than the dedupe window."""
        cutoff = self._clock() - self._window

        async def delete(db: _Conn) -> int:
            await db.execute("DELETE FROM tracegate_outbox_digests WHERE received_at < $1", cutoff)
            status = await db.execute(
                "DELETE FROM tracegate_outbox_events WHERE state = 'delivered' AND received_at < $1", cutoff
            )
            return int(status.rsplit(" ", 1)[-1])

        return await self._run(delete)


class _DuplicateBody(Exception):
    """Raised inside :meth:`PostgresOutbox.add`'s transaction to roll the event back."""
