"""asyncpg vs psycopg 3 on the outbox's own statements: the transaction ``add`` runs (BEGIN,
insert the event, claim the body digest, COMMIT) from concurrent tasks over a pool, and the
lease query (``FOR UPDATE SKIP LOCKED``) that the sender runs. Interleaved rounds; medians.
bench/outbox runs it at its end; it needs a PostgreSQL URL (bench/outbox starts one).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import asyncpg
import psycopg
import psycopg_pool

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.ci.outbox_pg import _ADD_EVENT, _CLAIM_DIGEST, PostgresOutbox  # noqa: E402
from proxy.secrets import Secret  # noqa: E402


def _psycopg_sql(sql: str) -> str:
    """$n → %s, in order of appearance (a repeated $n takes its value again)."""
    for n in range(6, 0, -1):
        sql = sql.replace(f"${n}", "%s")
    return sql


async def asyncpg_adds(dsn: str, n: int, concurrency: int, prefix: str) -> float:
    pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency)
    try:

        async def one(i: int) -> None:
            async with pool.acquire() as db, db.transaction():
                now = time.time()
                await db.fetchval(_ADD_EVENT, f"{prefix}-{i}", f"{prefix}-d{i}", "gitea", "acct", b"x" * 600, now)
                await db.fetchval(_CLAIM_DIGEST, f"{prefix}-d{i}", now, 86400.0)

        return await _timed(one, n, concurrency)
    finally:
        await pool.close()


async def psycopg_adds(dsn: str, n: int, concurrency: int, prefix: str) -> float:
    add, claim = _psycopg_sql(_ADD_EVENT), _psycopg_sql(_CLAIM_DIGEST)
    async with psycopg_pool.AsyncConnectionPool(dsn, min_size=concurrency, max_size=concurrency, open=False) as pool:
        await pool.open(wait=True)

        async def one(i: int) -> None:
            async with pool.connection() as db, db.transaction():
                now = time.time()
                await db.execute(add, (f"{prefix}-{i}", f"{prefix}-d{i}", "gitea", "acct", b"x" * 600, now, now))
                await db.execute(claim, (f"{prefix}-d{i}", now, 86400.0))

        return await _timed(one, n, concurrency)


async def _timed(one: object, n: int, concurrency: int) -> float:
    queue = iter(range(n))

    async def worker() -> None:
        for i in queue:
            await one(i)  # type: ignore[operator]

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - start)


async def compare(dsn: str, n: int, concurrency: int, rounds: int) -> str:
    schema = PostgresOutbox(Secret(dsn), clock=time.time)
    await schema.open()  # migrate
    await schema.close()
    rates: dict[str, list[float]] = {"asyncpg": [], "psycopg": []}
    for r in range(rounds):
        for name in ("asyncpg", "psycopg") if r % 2 == 0 else ("psycopg", "asyncpg"):
            bench = asyncpg_adds if name == "asyncpg" else psycopg_adds
            rates[name].append(await bench(dsn, n, concurrency, f"{name}-{r}"))
    a, p = statistics.median(rates["asyncpg"]), statistics.median(rates["psycopg"])
    return (
        f"add transactions/s with {concurrency} tasks, median of {rounds}: asyncpg {asyncpg.__version__} "
        f"{a:.0f}/s, psycopg {psycopg.__version__} {p:.0f}/s (ratio {a / p:.2f})"
    )


async def main(args: argparse.Namespace) -> int:
    print(await compare(args.dsn, args.n, args.concurrency, args.rounds))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    sys.exit(asyncio.run(main(parser.parse_args())))
