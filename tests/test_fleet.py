"""Two or three tracegate processes on one real PostgreSQL: every marker reaches the sink exactly once
when deliveries are sprayed across both and duplicated to both at once, when a replica is
SIGKILLed holding leased events, and when the database crashes and restarts mid-run; no
webhook is answered 202 unless its event was committed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from proxy.dev.standins import Sink, StandInIssuer
from tests import gitea_payloads as g
from tests.conftest import policy_yaml
from tests.pg_server import PgServer, postgres  # noqa: F401 - the session fixture
from tests.test_process import spawn
from tests.test_webhooks import OLD_SECRET, WEBHOOKS, hook_env


@dataclass
class Replica:
    process: asyncio.subprocess.Process
    url: str
    admin: str


Spawn = Callable[..., Awaitable[Replica]]


@pytest.fixture
async def dsn(postgres: PgServer) -> str:  # noqa: F811
    return await postgres.database()


@pytest.fixture
async def replicas(tmp_path: Path, issuer: StandInIssuer, dsn: str) -> AsyncIterator[Spawn]:
    started: list[Replica] = []
    count = 0

    async def _spawn(upstream: str) -> Replica:
        nonlocal count
        count += 1
        home = tmp_path / f"replica-{count}"
        (home / "policies").mkdir(parents=True)
        (home / "policies" / "main.yaml").write_text(policy_yaml(issuer.url, WEBHOOKS))
        env = {
            **hook_env(),
            "TRACEGATE_OUTBOX": dsn,
            "TRACEGATE_UPSTREAM_PATH_TRACES": "/v1/traces",
            "TRACEGATE_UPSTREAM_TIMEOUT": "3",  # a lease is 2 × 3 + 5 = 11 s
            "TRACEGATE_OUTBOX_RETRY_BASE_SECONDS": "0.05",
            "TRACEGATE_OUTBOX_RETRY_MAX_SECONDS": "0.5",
            "TRACEGATE_DATA_DIR": str(home / "data"),
        }
        process, url, admin = await spawn(home / "policies", env, upstream)
        replica = Replica(process, url, admin)
        started.append(replica)
        return replica

    yield _spawn
    for replica in started:
        if replica.process.returncode is None:
            replica.process.kill()
            await replica.process.wait()
    for k in range(1, count + 1):  # through kills and database crashes: no unhandled error, no 500
        log = (tmp_path / f"replica-{k}" / "stderr.log").read_text()
        assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]


async def post_push(client: aiohttp.ClientSession, replica: Replica, n: int, delivery: str) -> int:
    body = g.encode(g.push(after=f"{n + 1:040x}"))  # all zeros would be a branch deletion
    headers = {**g.gitea_headers("push", body, OLD_SECRET, delivery=delivery), "Content-Type": "application/json"}
    try:
        async with client.post(replica.url + "/webhooks/gitea", data=body, headers=headers) as resp:
            answer = await resp.json()
            assert resp.status in (202, 503), (resp.status, answer)
            if resp.status == 503:
                assert resp.headers["Retry-After"] and answer["reason"] == "outbox-unavailable"
            return resp.status
    except aiohttp.ClientError:
        return 0  # the replica died mid-request: nothing was promised


def delivery_ids(sinks: list[Sink]) -> Counter[str]:
    """How many marker requests each delivery id drew, over all the sinks."""
    seen: Counter[str] = Counter()
    for sink in sinks:
        for received in sink.received:
            ids = {
                a["value"]["stringValue"]
                for rs in json.loads(received.body)["resourceSpans"]
                for ss in rs["scopeSpans"]
                for span in ss["spans"]
                for a in span["attributes"]
                if a["key"] == "tracegate.delivery_id"
            }
            seen.update(ids)
    return seen


async def settle(sinks: list[Sink], expected: int, timeout: float = 30.0) -> Counter[str]:
    deadline = time.monotonic() + timeout
    while sum(delivery_ids(sinks).values()) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # and nothing more arrives after
    return delivery_ids(sinks)


async def test_sprayed_and_duplicated_deliveries_draw_one_marker_each(
    replicas: Spawn, sink: Sink, issuer: StandInIssuer
) -> None:
    a, b = await asyncio.gather(replicas(sink.url), replicas(sink.url))
    async with aiohttp.ClientSession() as client:
        # Every delivery goes to both replicas at the same moment (Gitea retrying on a
        # timeout through a load balancer); every third one is also redelivered by hand
        # (a new delivery id, the same body) to the replica that did not get it first.
        pairs = await asyncio.gather(
            *(asyncio.gather(post_push(client, a, n, f"d-{n}"), post_push(client, b, n, f"d-{n}")) for n in range(40))
        )
        assert all(p == [202, 202] for p in pairs)
        manual = await asyncio.gather(*(post_push(client, (a, b)[n % 2], n, f"manual-{n}") for n in range(0, 40, 3)))
        assert set(manual) == {202}
        # The GitLab deployments endpoint: the same job's token to both replicas at once.
        token = issuer.mint(job_id="4242", sha="f" * 40)
        statuses = []
        for replica in (a, b, a, b):
            async with client.post(
                replica.url + "/v1/deployments", data=b"", headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                statuses.append((resp.status, (await resp.json())["reason"]))
        assert statuses[0] == (202, "stored") and set(statuses[1:]) == {(202, "duplicate-delivery")}
    seen = await settle([sink], 42)
    # The job's rule lists two services: one marker event each, each delivered once.
    assert seen == Counter({**{f"d-{n}": 1 for n in range(40)}, "gitlab-job-4242": 2})
    assert not any(k.startswith("manual-") for k in seen)


@contextlib.asynccontextmanager
async def blackhole() -> AsyncIterator[str]:
    """An upstream that takes the connection and the request and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


async def test_a_killed_replicas_leased_events_are_taken_over(replicas: Spawn, sink: Sink, dsn: str) -> None:
    async with blackhole() as nowhere:
        doomed, survivor = await asyncio.gather(replicas(nowhere), replicas(sink.url))
        async with aiohttp.ClientSession() as client:
            statuses = await asyncio.gather(*(post_push(client, doomed, n, f"k-{n}") for n in range(10)))
            assert statuses == [202] * 10
            # The doomed replica's sender leases what is due and hangs sending (its upstream
            # timeout is 3 s): kill it as soon as it holds leases, mid-send.
            db = await asyncpg.connect(dsn)
            try:
                deadline = time.monotonic() + 10
                leased = 0
                while not leased and time.monotonic() < deadline:
                    leased = await db.fetchval(
                        "SELECT count(*) FROM tracegate_outbox_events WHERE state = 'pending' AND next_attempt_at > $1",
                        time.time() + 4,  # further out than any retry backoff (0.5 s): a lease
                    )
                    await asyncio.sleep(0.02)
                doomed.process.send_signal(signal.SIGKILL)
                await doomed.process.wait()
                assert leased >= 1
                # Meanwhile the survivor goes on with its own work.
                assert await post_push(client, survivor, 99, "k-99") == 202
                seen = await settle([sink], 11, timeout=40)
                assert seen == Counter({f"k-{n}": 1 for n in [*range(10), 99]})
                assert await db.fetchval("SELECT count(*) FROM tracegate_outbox_events WHERE state = 'delivered'") == 11
            finally:
                await db.close()


async def test_database_restart_mid_run_loses_nothing_and_sends_nothing_twice(
    replicas: Spawn,
    sink: Sink,
    postgres: PgServer,  # noqa: F811
) -> None:
    fleet = await asyncio.gather(replicas(sink.url), replicas(sink.url), replicas(sink.url))
    answered: dict[str, list[int]] = {}
    stop = asyncio.Event()

    async def gitea(client: aiohttp.ClientSession, n: int) -> None:
        """Like a forge behind a load balancer that also duplicates: each attempt reaches two
        of the three replicas at once; retry until one answers 202 (2xx ends it)."""
        delivery = f"r-{n}"
        a, b = fleet[n % 3], fleet[(n + 1) % 3]
        answered[delivery] = []
        while True:
            statuses = await asyncio.gather(post_push(client, a, n, delivery), post_push(client, b, n, delivery))
            answered[delivery] += statuses
            if 202 in statuses:
                return
            await asyncio.sleep(0.1)

    async def spray(client: aiohttp.ClientSession) -> int:
        n = 0
        while not stop.is_set():
            await gitea(client, n)
            n += 1
        return n

    async with aiohttp.ClientSession() as client:
        sprayer = asyncio.ensure_future(spray(client))
        await asyncio.sleep(1.0)
        postgres.stop("immediate")  # a crash: recovery from the WAL on start
        await asyncio.sleep(1.5)
        postgres.start()
        await asyncio.sleep(2.0)
        stop.set()
        total = await asyncio.wait_for(sprayer, 30)
    assert any(503 in s for s in answered.values()), "the outage was never seen: the test proved nothing"
    seen = await settle([sink], total, timeout=40)
    assert seen == Counter({f"r-{n}": 1 for n in range(total)})
