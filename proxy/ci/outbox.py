"""The outbox: deployment markers stored durably before they are acknowledged.

SQLite in WAL mode with ``synchronous=FULL``: once :meth:`Outbox.add` returns, the event is
on disk and survives a crash, a SIGKILL or a power cut, and only then does the caller
answer 202. The sender (:mod:`.sender`) delivers from here until the upstream takes it.

Idempotency: an event's ``key`` (the delivery id) is unique, so a redelivery is recognised
and stored once; an identical signed body within ``dedupe_window`` seconds is also one
event (a manual redelivery in Gitea has a new id and the same body).

Delivery facts (``facts``): the pushes and deployments the DORA keys are derived from
(:mod:`.dora_facts`), one row per fact key, stored once however often it is delivered; a
deployment's ``settle_at``/``window_at`` say when its points are due (:mod:`.dora_settle`).

No secret is stored: only the service account's name; its key is looked up at send time.
SQLite is blocking, so every call runs on one dedicated thread, which also serialises
access to the single connection. A failing disk or file becomes
:class:`~proxy.errors.OutboxUnavailable` (answered 503), as in the PostgreSQL store.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from proxy.errors import OutboxUnavailable

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    body_digest TEXT NOT NULL,
    source TEXT NOT NULL,
    service_account TEXT NOT NULL,
    payload BLOB NOT NULL,
    received_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_result TEXT
);
CREATE INDEX IF NOT EXISTS events_due ON events (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS events_digest ON events (body_digest, received_at);
CREATE TABLE IF NOT EXISTS facts (
    key TEXT PRIMARY KEY,
    scope TEXT NOT NULL,
    kind TEXT NOT NULL,
    at_ns INTEGER NOT NULL,
    body TEXT NOT NULL,
    received_at REAL NOT NULL,
    settle_at REAL,
    window_at REAL
);
CREATE INDEX IF NOT EXISTS facts_scope ON facts (scope, at_ns);
CREATE INDEX IF NOT EXISTS facts_settle ON facts (settle_at);
CREATE INDEX IF NOT EXISTS facts_window ON facts (window_at);
"""

Added = Literal["stored", "duplicate-delivery", "duplicate-body"]
#: Which of a fact's due times :meth:`Outbox.settle_fact` clears.
Due = Literal["settle", "window"]
_FACT_COLUMNS = "key, scope, kind, at_ns, body, received_at, settle_at, window_at"


@dataclass(frozen=True)
class Pending:
    id: int
    key: str
    source: str
    service_account: str
    payload: bytes
    attempts: int
    received_at: float


@dataclass(frozen=True)
class Fact:
    """A stored delivery fact: ``at_ns`` the event's own time (the forge's), ``received_at``
    when tracegate first stored it (its clock, seconds), and when its points are due."""

    key: str
    scope: str
    kind: str
    at_ns: int
    body: str
    received_at: float
    settle_at: float | None
    window_at: float | None


def due_times(now: float, settle: float | None, window_ends: float | None) -> tuple[float | None, float | None]:
    """(``settle_at``, ``window_at``) of a fact received at ``now``: ``settle`` seconds after it
    arrived, and ``settle`` seconds after the later of its arrival and ``window_ends``."""
    if settle is None:
        return None, None
    return now + settle, (max(now, window_ends) + settle if window_ends is not None else None)


class Outbox:
    def __init__(self, path: Path, *, clock: Callable[[], float], dedupe_window: float = 86400.0) -> None:
        self.path = path
        self._clock = clock
        self._window = dedupe_window
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracegate-outbox")
        self._db: sqlite3.Connection | None = None
        self.wake = asyncio.Event()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:  # closed (its thread pool too): nothing can be stored
            raise OutboxUnavailable("outbox-closed")

        def call() -> T:
            if self._db is None:
                raise OutboxUnavailable("outbox-closed")
            try:
                return fn(self._db)
            except (sqlite3.Error, OSError) as exc:
                raise OutboxUnavailable(f"outbox-sqlite-{type(exc).__name__}") from None

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Workers (--workers N) open one file at once: switching it to WAL takes a lock
            # that SQLite's busy handler does not wait for, so a locked start is retried.
            attempts = 0
            while True:
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
                try:
                    db.execute("PRAGMA busy_timeout=5000")
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=FULL")
                    db.executescript(_SCHEMA)
                    return db
                except sqlite3.OperationalError as exc:
                    db.close()
                    attempts += 1
                    if "locked" not in str(exc) or attempts == 50:
                        raise
                    time.sleep(0.1)

        try:
            self._db = await asyncio.get_running_loop().run_in_executor(self._executor, connect)
        except (sqlite3.Error, OSError) as exc:
            raise OutboxUnavailable(f"outbox-sqlite-{type(exc).__name__}") from None

    async def close(self) -> None:
        if self._db is not None:
            await self._run(lambda db: db.close())
            self._db = None
        self._executor.shutdown(wait=True)

    async def add(self, *, key: str, body_digest: str, source: str, service_account: str, payload: bytes) -> Added:
        """Store an event durably, unless it is a duplicate. Returns what happened."""
        now = self._clock()

        def check_and_insert(db: sqlite3.Connection) -> Added:
            if db.execute("SELECT 1 FROM events WHERE key = ?", (key,)).fetchone():
                return "duplicate-delivery"
            if db.execute(
                "SELECT 1 FROM events WHERE body_digest = ? AND received_at > ?", (body_digest, now - self._window)
            ).fetchone():
                return "duplicate-body"
            db.execute(
                "INSERT INTO events (key, body_digest, source, service_account, payload, received_at,"
                " next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, body_digest, source, service_account, payload, now, now),
            )
            return "stored"

        def insert(db: sqlite3.Connection) -> Added:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = check_and_insert(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")  # synchronous=FULL: on disk when this returns
            return result

        result = await self._run(insert)
        if result == "stored":
            self.wake.set()
        return result

    async def due(self, limit: int = 50, lease: float = 60.0) -> list[Pending]:
        """Claim up to ``limit`` due events for ``lease`` seconds: another sender (a second
        worker on the same file) skips them until the lease runs out or this one records
        the outcome. A sender that dies mid-send leaves its events to be retried then."""
        now = self._clock()

        def claim(db: sqlite3.Connection) -> list[Pending]:
            db.execute("BEGIN IMMEDIATE")
            try:
                rows = db.execute(
                    "SELECT id, key, source, service_account, payload, attempts, received_at FROM events"
                    " WHERE state = 'pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?",
                    (now, limit),
                ).fetchall()
                db.executemany(
                    "UPDATE events SET next_attempt_at = ? WHERE id = ?", [(now + lease, row[0]) for row in rows]
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return [Pending(*row) for row in rows]

        return await self._run(claim)

    async def delivered(self, event_id: int, result: str) -> None:
        await self._run(
            lambda db: db.execute(
                "UPDATE events SET state = 'delivered', attempts = attempts + 1, last_result = ? WHERE id = ?",
                (result, event_id),
            )
        )

    async def failed(self, event_id: int, result: str) -> None:
        """A permanent failure: kept for inspection and counted, never retried."""
        await self._run(
            lambda db: db.execute(
                "UPDATE events SET state = 'failed', attempts = attempts + 1, last_result = ? WHERE id = ?",
                (result, event_id),
            )
        )

    async def retry_later(self, event_id: int, result: str, delay: float) -> None:
        at = self._clock() + delay
        await self._run(
            lambda db: db.execute(
                "UPDATE events SET attempts = attempts + 1, next_attempt_at = ?, last_result = ? WHERE id = ?",
                (at, result, event_id),
            )
        )

    async def stats(self) -> dict[str, Any]:
        """Pending depth, the oldest pending event's age (s), the next due time, and counts by state."""
        now = self._clock()

        def query(db: sqlite3.Connection) -> dict[str, Any]:
            depth, oldest, next_due = db.execute(
                "SELECT COUNT(*), MIN(received_at), MIN(next_attempt_at) FROM events WHERE state = 'pending'"
            ).fetchone()
            states = dict(db.execute("SELECT state, COUNT(*) FROM events GROUP BY state").fetchall())
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
        """Store a delivery fact once (True: it is new). ``settle``: seconds after now its
        first points are due (None: it has none); ``window_ends``: when its failure window
        closes (seconds since the epoch)."""
        now = self._clock()
        settle_at, window_at = due_times(now, settle, window_ends)

        def insert(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                f"INSERT OR IGNORE INTO facts ({_FACT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (key, scope, kind, at_ns, body, now, settle_at, window_at),
            )
            return cursor.rowcount == 1

        return await self._run(insert)

    async def due_facts(self, grace: float, limit: int = 100) -> list[Fact]:
        """Facts with points due at least ``grace`` seconds ago, in event-time order."""
        until = self._clock() - grace
        return await self._run(
            lambda db: [
                Fact(*row)
                for row in db.execute(
                    f"SELECT {_FACT_COLUMNS} FROM facts WHERE settle_at <= ? OR window_at <= ?"  # noqa: S608
                    " ORDER BY at_ns, key LIMIT ?",
                    (until, until, limit),
                ).fetchall()
            ]
        )

    async def scope_facts(self, scope: str, since_ns: int) -> list[Fact]:
        """Every fact of ``scope`` from ``since_ns`` (event time) on."""
        return await self._run(
            lambda db: [
                Fact(*row)
                for row in db.execute(
                    f"SELECT {_FACT_COLUMNS} FROM facts WHERE scope = ? AND at_ns >= ? ORDER BY at_ns, key",  # noqa: S608
                    (scope, since_ns),
                ).fetchall()
            ]
        )

    async def settle_fact(self, key: str, which: Due) -> None:
        column = "settle_at" if which == "settle" else "window_at"
        await self._run(lambda db: db.execute(f"UPDATE facts SET {column} = NULL WHERE key = ?", (key,)))  # noqa: S608

    async def prune_facts(self, before_ns: int) -> int:
        """Forget settled facts whose events are older than ``before_ns``."""
        return await self._run(
            lambda db: (
                db.execute(
                    "DELETE FROM facts WHERE at_ns < ? AND settle_at IS NULL AND window_at IS NULL", (before_ns,)
                ).rowcount
            )
        )

    async def prune(self) -> int:
        """Forget delivered events older than the dedupe window (failed ones are kept)."""
        cutoff = self._clock() - self._window
        return await self._run(
            lambda db: (
                db.execute("DELETE FROM events WHERE state = 'delivered' AND received_at < ?", (cutoff,)).rowcount
            )
        )
