"""The PostgreSQL outbox against a real PostgreSQL server: migrations under concurrent start,
dedupe enforced by the database under concurrent inserts, leases shared with SKIP LOCKED and
taken over when they expire, 503-class failures when the server goes away, and recovery."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from proxy.ci.outbox import Outbox
from proxy.ci.outbox_pg import MIGRATIONS, PostgresOutbox
from proxy.ci.store import describe, open_outbox, sqlite_path
from proxy.errors import ConfigError, OutboxUnavailable
from proxy.secrets import Secret
from proxy.settings.config import Settings
from tests.pg_server import PgServer, postgres  # noqa: F401 - the session fixture


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def dsn(postgres: PgServer) -> str:  # noqa: F811
    return await postgres.database()


@pytest.fixture
async def make(dsn: str) -> AsyncIterator[Callable[..., PostgresOutbox]]:
    opened: list[PostgresOutbox] = []

    def _make(clock: Callable[[], float], **kwargs: float) -> PostgresOutbox:
        outbox = PostgresOutbox(Secret(dsn), clock=clock, **kwargs)  # type: ignore[arg-type]
        opened.append(outbox)
        return outbox

    yield _make
    for outbox in opened:
        await outbox.close()


def event(n: int, digest: str | None = None) -> dict[str, object]:
    return {
        "key": f"gitea:delivery-{n}",
        "body_digest": digest or f"digest-{n}",
        "source": "gitea",
        "service_account": "payments-ci",
        "payload": b'{"n": %d}' % n,
    }


async def test_replicas_starting_together_migrate_once(make: Callable[..., PostgresOutbox], dsn: str) -> None:
    clock = Clock()
    replicas = [make(clock, start_attempts=1) for _ in range(6)]  # no retry to hide a failure
    db = await asyncpg.connect(dsn)
    try:
        # Line the replicas up: each blocks reading the (empty) version table until we let go,
        # so without the advisory lock all six would find nothing applied and create the tables
        # at once (and five would fail on "already exists").
        await db.execute(
            "CREATE TABLE tracegate_schema_migrations (version INTEGER PRIMARY KEY, description TEXT NOT NULL,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        async with db.transaction():
            await db.execute("LOCK TABLE tracegate_schema_migrations IN ACCESS EXCLUSIVE MODE")
            opening = asyncio.gather(*(r.open() for r in replicas))
            await asyncio.sleep(1.0)
        await opening
        versions = [r[0] for r in await db.fetch("SELECT version FROM tracegate_schema_migrations ORDER BY version")]
    finally:
        await db.close()
    assert versions == [v for v, _, _ in MIGRATIONS]
    again = make(clock)
    await again.open()  # idempotent: nothing left to apply
    assert await again.add(**event(1)) == "stored"  # type: ignore[arg-type]


async def test_concurrent_duplicates_are_one_event(make: Callable[..., PostgresOutbox]) -> None:
    clock = Clock()
    a, b = make(clock), make(clock)
    await asyncio.gather(a.open(), b.open())
    # The same delivery to both replicas at once, 40 times over; and a redelivered body (new id).
    results = await asyncio.gather(*(r.add(**event(n)) for n in range(40) for r in (a, b)))  # type: ignore[arg-type]
    assert results.count("stored") == 40
    assert results.count("duplicate-delivery") == 40
    bodies = await asyncio.gather(
        *(r.add(**event(100 + n, digest="same-body")) for n, r in enumerate((a, b, a, b)))  # type: ignore[arg-type]
    )
    assert sorted(bodies) == ["duplicate-body"] * 3 + ["stored"]
    assert (await a.stats())["depth"] == 41
    clock.now += 86400.0 + 1  # past the window, the same body is a new event again
    assert await b.add(**event(200, digest="same-body")) == "stored"  # type: ignore[arg-type]


async def test_leases_are_shared_and_expired_ones_taken_over(make: Callable[..., PostgresOutbox]) -> None:
    clock = Clock()
    a, b = make(clock), make(clock)
    await asyncio.gather(a.open(), b.open())
    for n in range(30):
        await a.add(**event(n))  # type: ignore[arg-type]
    first, second = await asyncio.gather(a.due(limit=20, lease=10), b.due(limit=20, lease=10))
    ids_a, ids_b = {e.id for e in first}, {e.id for e in second}
    assert not ids_a & ids_b and len(ids_a | ids_b) == 30  # each event leased by one replica
    assert await a.due(lease=10) == []  # all leased
    for e in second:
        await b.delivered(e.id, "200")
    # a "crashes" holding its leases: once they expire, b takes them over
    clock.now += 11
    taken = await b.due(limit=50, lease=10)
    assert {e.id for e in taken} == ids_a
    await b.retry_later(taken[0].id, "503", 30)
    await b.failed(taken[1].id, "400")
    stats = await b.stats()
    assert stats["states"] == {"pending": len(ids_a) - 1, "delivered": len(ids_b), "failed": 1}
    clock.now += 86400 * 2
    assert await a.prune() == len(ids_b)


async def test_database_down_is_unavailable_then_recovers(
    make: Callable[..., PostgresOutbox],
    postgres: PgServer,  # noqa: F811
) -> None:
    clock = Clock()
    outbox = make(clock)
    await outbox.open()
    assert await outbox.add(**event(1)) == "stored"  # type: ignore[arg-type]
    postgres.stop("immediate")
    try:
        with pytest.raises(OutboxUnavailable) as caught:
            await outbox.add(**event(2))  # type: ignore[arg-type]
        assert "postgres@" not in str(caught.value) and "127.0.0.1" not in str(caught.value)
        with pytest.raises(OutboxUnavailable):
            await outbox.due()
    finally:
        postgres.start()
    # every pooled connection died with the server; the store reconnects without a restart
    assert await outbox.add(**event(2)) == "stored"  # type: ignore[arg-type]
    assert await outbox.add(**event(1)) == "duplicate-delivery"  # the committed one survived the crash
    assert (await outbox.stats())["depth"] == 2


async def test_open_gives_up_when_no_database_answers(tmp_path: Path) -> None:
    from proxy.dev.standins import free_port

    outbox = PostgresOutbox(
        Secret(f"postgresql://tracegate:hunter2@127.0.0.1:{free_port()}/none"),
        clock=Clock(),
        start_attempts=2,
        connect_timeout=1,
    )
    with pytest.raises(OutboxUnavailable) as caught:
        await outbox.open()
    assert "hunter2" not in str(caught.value)


def test_outbox_setting_picks_the_store(tmp_path: Path) -> None:
    url = "postgresql://tracegate:hunter2@db.example:5432/tracegate"
    assert isinstance(open_outbox(url, tmp_path, clock=Clock(), dedupe_window=1), PostgresOutbox)
    assert describe(url, tmp_path) == "postgresql://db.example:5432/tracegate"
    assert isinstance(open_outbox("", tmp_path, clock=Clock(), dedupe_window=1), Outbox)
    assert sqlite_path("", tmp_path) == tmp_path / "outbox.sqlite3"
    assert sqlite_path("sqlite:///var/lib/tg/o.db", tmp_path) == Path("/var/lib/tg/o.db")
    assert sqlite_path("rel/o.db", tmp_path) == Path("rel/o.db")
    settings = Settings.load({}, {"TRACEGATE_OUTBOX": url})
    assert settings.outbox_path == url and "hunter2" not in repr(settings)
    with pytest.raises(ConfigError) as caught:
        Settings.load({}, {"TRACEGATE_OUTBOX": "mysql://root:hunter2@db/x"})
    assert "'mysql'" in str(caught.value) and "hunter2" not in str(caught.value)


async def test_an_outbox_that_cannot_open_stops_start_up_with_one_line(tmp_path: Path) -> None:
    import os
    import sys

    from tests.conftest import policy_yaml

    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "main.yaml").write_text(policy_yaml("https://issuer.invalid"))
    (tmp_path / "a-file").write_text("not a directory")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--policies",
        str(tmp_path / "policies"),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        env={
            **os.environ,
            "LS_TOKEN_PAYMENTS": "ls-key-p",
            "LS_TOKEN_DOCS": "ls-key-d",
            "TRACEGATE_OUTBOX": f"sqlite:///{tmp_path}/a-file/outbox.sqlite3",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert len(lines) == 1, err  # one clear line (cli.py prints the ConfigError), nothing else
    assert lines[0].startswith("tracegate: TRACEGATE_OUTBOX=") and "outbox-sqlite-" in lines[0]
    assert b"Traceback" not in err
