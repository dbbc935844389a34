"""Outbox benchmark: PostgreSQL vs SQLite, one and two replicas.

For each configuration, real tracegate processes (``python -m proxy serve``) take signed
Gitea push webhooks from ``--concurrency`` clients, spread round-robin over the replicas, and
deliver the markers to a sink on 127.0.0.1. Figures per configuration:

- webhooks/s accepted: ``--webhooks`` deliveries / the time until the last 202;
- p99 to 202: the 99th percentile of one webhook's time to its 202 (ms), which includes the
  commit (SQLite ``synchronous=FULL`` on the local disk; PostgreSQL's COMMIT on a local
  server with its default ``synchronous_commit=on``);
- markers/s delivered: deliveries / the time from the first webhook to the last marker at
  the sink.

SQLite with two replicas is two processes on one file (what ``--workers 2`` does), not a
fleet. Configurations are interleaved round by round; medians over rounds are reported.
Run it through ``bench/outbox``. PostgreSQL is Debian's, started in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.dev.standins import StandInIssuer, free_port  # noqa: E402
from tests import gitea_payloads as g  # noqa: E402
from tests.conftest import policy_yaml  # noqa: E402
from tests.pg_server import PgServer  # noqa: E402
from tests.test_process import spawn  # noqa: E402
from tests.test_webhooks import OLD_SECRET, WEBHOOKS, hook_env  # noqa: E402


class CountingSink:
    """Answers 200 at once and notes when each marker arrived."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _take(self, request: web.Request) -> web.Response:
        await request.read()
        self.arrivals.append(time.perf_counter())
        return web.Response(status=200, body=b"", content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._take)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def one_config(
    store: str, replicas: int, args: argparse.Namespace, issuer: StandInIssuer, outbox: str, work: Path, tag: str
) -> dict[str, float]:
    sink = CountingSink()
    await sink.start()
    processes = []
    try:
        urls = []
        for k in range(replicas):
            home = work / f"{tag}-{k}"
            (home / "policies").mkdir(parents=True)
            (home / "policies" / "main.yaml").write_text(policy_yaml(issuer.url, WEBHOOKS))
            env = {
                **hook_env(),
                "TRACEGATE_OUTBOX": outbox,
                "TRACEGATE_UPSTREAM_PATH_TRACES": "/v1/traces",
                "TRACEGATE_LOG_LEVEL": "WARNING",
                "TRACEGATE_DATA_DIR": str(home / "data"),
            }
            process, url, _ = await spawn(home / "policies", env, sink.url)
            processes.append(process)
            urls.append(url)
        bodies = []
        for n in range(args.webhooks):
            body = g.encode(g.push(after=f"{n + 1:040x}"))
            headers = {
                **g.gitea_headers("push", body, OLD_SECRET, delivery=f"{tag}-{n}"),
                "Content-Type": "application/json",
            }
            bodies.append((urls[n % replicas], body, headers))
        latencies: list[float] = []
        queue: asyncio.Queue[tuple[str, bytes, dict[str, str]]] = asyncio.Queue()
        for item in bodies:
            queue.put_nowait(item)

        async def client(session: aiohttp.ClientSession) -> None:
            while not queue.empty():
                url, body, headers = queue.get_nowait()
                t0 = time.perf_counter()
                async with session.post(url + "/webhooks/gitea", data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 202:
                        raise RuntimeError(f"webhook answered {resp.status}")
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await asyncio.gather(*(client(session) for _ in range(args.concurrency)))
        accepted_at = time.perf_counter()
        deadline = time.monotonic() + 120
        while len(sink.arrivals) < args.webhooks and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if len(sink.arrivals) < args.webhooks:
            raise RuntimeError(f"only {len(sink.arrivals)} of {args.webhooks} markers arrived")
        latencies.sort()
        return {
            "accepted_per_s": args.webhooks / (accepted_at - start),
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "markers_per_s": args.webhooks / (max(sink.arrivals) - start),
        }
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            await process.wait()
        await sink.stop()


async def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="tracegate-bench-outbox-"))
    pg_root = Path(tempfile.mkdtemp(prefix="tracegate-pg-"))
    pg = PgServer(Path(args.pg_bindir), pg_root)
    pg.init()
    pg.start()
    issuer = StandInIssuer()
    await issuer.start()
    driver_line = ""
    configs = [("sqlite", 1), ("sqlite", 2), ("postgresql", 1), ("postgresql", 2)]
    results: dict[tuple[str, int], list[dict[str, float]]] = {c: [] for c in configs}
    try:
        for r in range(args.rounds):
            order = configs[r % len(configs) :] + configs[: r % len(configs)]
            for store, replicas in order:
                tag = f"r{r}-{store}-{replicas}"
                outbox = await pg.database() if store == "postgresql" else f"sqlite:///{work / tag}.sqlite3"
                figures = await one_config(store, replicas, args, issuer, outbox, work, tag)
                results[(store, replicas)].append(figures)
                print(tag, {k: round(v, 1) for k, v in figures.items()}, flush=True)
        if args.drivers:
            from bench.pg_drivers import compare

            driver_line = await compare(await pg.database(), 2000, args.concurrency, 3)
            print(driver_line, flush=True)
    finally:
        await issuer.stop()
        pg.stop("fast")
        shutil.rmtree(pg_root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"# Outbox benchmark, {datetime.date.today().isoformat()}",
        "",
        f"{args.webhooks} signed Gitea pushes per configuration from {args.concurrency} clients, "
        f"medians of {args.rounds} interleaved round(s); all on 127.0.0.1 "
        f"(PostgreSQL {Path(args.pg_bindir).parent.name}, default settings). "
        "The machine was shared with other work: compare ratios, not absolutes.",
        "",
        "| outbox | replicas | webhooks/s accepted | p50 to 202 (ms) | p99 to 202 (ms) | markers/s delivered |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for store, replicas in configs:
        runs = results[(store, replicas)]

        def med(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(run[key] for run in runs)

        lines.append(
            f"| {store} | {replicas} | {med('accepted_per_s'):.0f} | {med('p50_ms'):.1f} | {med('p99_ms'):.1f} "
            f"| {med('markers_per_s'):.0f} |"
        )
    if args.drivers:
        lines += ["", "Drivers, the outbox's add transaction alone (bench/pg_drivers.py): " + driver_line]
    report = "\n".join(lines) + "\n"
    print(report)
    out = ROOT / "bench" / "results" / f"outbox-{datetime.date.today().isoformat()}.md"
    out.write_text(report)
    print(f"written to {out.relative_to(ROOT)}")
    return 0


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--webhooks", type=int, default=1000, help="deliveries per configuration (default 1000)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent senders (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--no-drivers", dest="drivers", action="store_false", help="skip asyncpg vs psycopg")
    parser.add_argument("--pg-bindir", required=True, help="PostgreSQL's bin directory (initdb, pg_ctl)")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
