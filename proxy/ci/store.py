"""The outbox interface and the choice of store: SQLite for one instance, PostgreSQL for a fleet.

``TRACEGATE_OUTBOX`` picks the store: unset (``DATA_DIR/outbox.sqlite3``), a file path or
``sqlite:///PATH`` is the embedded SQLite outbox (:mod:`.outbox`); ``postgresql://…`` (or
``postgres://…``) is the shared PostgreSQL outbox (:mod:`.outbox_pg`). The routes and the
sender hold an :class:`OutboxStore` and never learn which one it is.

Contract of every store: :meth:`OutboxStore.add` returns only once the event is committed
(then the caller may answer 202), or raises :class:`~proxy.errors.OutboxUnavailable` (the
caller answers 503 and stores nothing); a delivery id, or an identical body within the
dedupe window, is stored once however many replicas receive it at the same moment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from proxy.ci.outbox import Added, Due, Fact, Outbox, Pending
from proxy.secrets import Secret

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
SQLITE_SCHEME = "sqlite:///"


class OutboxStore(Protocol):
    #: Set by :meth:`add` when it stored an event, so this process's sender wakes at once.
    wake: asyncio.Event

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def add(self, *, key: str, body_digest: str, source: str, service_account: str, payload: bytes) -> Added:
        """Store durably unless a duplicate; what happened. Raises OutboxUnavailable."""
        ...

    async def due(self, limit: int = 50, lease: float = 60.0) -> list[Pending]:
        """Lease up to ``limit`` due events for ``lease`` seconds."""
        ...

    async def delivered(self, event_id: int, result: str) -> None: ...

    async def failed(self, event_id: int, result: str) -> None: ...

    async def retry_later(self, event_id: int, result: str, delay: float) -> None: ...

    async def stats(self) -> dict[str, Any]: ...

    async def prune(self) -> int: ...

    async def add_fact(
        self, *, key: str, scope: str, kind: str, at_ns: int, body: str, settle: float | None, window_ends: float | None
    ) -> bool:
        """Store a delivery fact once (True: new); its points due ``settle`` seconds after it
        arrived, and after ``window_ends`` (seconds since the epoch). Raises OutboxUnavailable."""
        ...

    async def due_facts(self, grace: float, limit: int = 100) -> list[Fact]:
        """Facts whose points were due at least ``grace`` seconds ago."""
        ...

    async def scope_facts(self, scope: str, since_ns: int) -> list[Fact]:
        """The facts of ``scope`` whose events are at or after ``since_ns``, in event-time order."""
        ...

    async def settle_fact(self, key: str, which: Due) -> None: ...

    async def prune_facts(self, before_ns: int) -> int: ...


def is_postgres(spec: str) -> bool:
    return spec.startswith(POSTGRES_SCHEMES)


def sqlite_path(spec: str, data_dir: Path) -> Path:
    """The SQLite file a ``TRACEGATE_OUTBOX`` value names (``""``: the default in DATA_DIR)."""
    if not spec:
        return data_dir / "outbox.sqlite3"
    if spec.startswith(SQLITE_SCHEME):
        return Path("/" + spec[len(SQLITE_SCHEME) :].lstrip("/"))
    return Path(spec)


def describe(spec: str, data_dir: Path) -> str:
    """Where the outbox is, safe to log: a PostgreSQL URL loses its user and password."""
    if is_postgres(spec):
        scheme, _, rest = spec.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"
    return f"sqlite:{sqlite_path(spec, data_dir)}"


def open_outbox(
    spec: str, data_dir: Path, *, clock: Callable[[], float], dedupe_window: float, pool_size: int = 8
) -> OutboxStore:
    """The store ``spec`` names, not yet opened."""
    if is_postgres(spec):
        from proxy.ci.outbox_pg import PostgresOutbox

        return PostgresOutbox(Secret(spec), clock=clock, dedupe_window=dedupe_window, pool_size=pool_size)
    return Outbox(sqlite_path(spec, data_dir), clock=clock, dedupe_window=dedupe_window)
