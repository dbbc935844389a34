"""Fleet-wide quotas (issue 23, item 3; proxy/gate/quota_pg.py): tracegates on one real
PostgreSQL share their limits through leased chunks. Two in-process replicas share one
hand-moved clock (tests/test_quotas.py's :class:`Clock`), so the buckets refill only when a
test says so; between steps a test waits for the leases under way, as real time would."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from proxy.dev.standins import Sink, StandInIssuer
from proxy.gate.quota import Exhausted, build_quotas
from proxy.gate.quota_pg import SharedQuotas
from proxy.policy import load_policy
from proxy.secrets import Secret
from tests.conftest import Tracegate
from tests.pg_server import PgServer, postgres  # noqa: F401 - the session fixture
from tests.test_quotas import DAY, Clock, Poster, quota_lines, quota_policy

Replicas = Callable[..., Awaitable[list[Tracegate]]]
KEY = "account:payments-ci:requests"


@pytest.fixture
async def dsn(postgres: PgServer) -> str:  # noqa: F811
    return await postgres.database()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture
def replicas(start_tracegate: Callable[..., Any], issuer: StandInIssuer, dsn: str) -> Replicas:
    """``count`` in-process tracegates on ``dsn`` (their outbox, so their quotas), on ``clock``."""

    async def _start(policy: str, clock: Clock, count: int = 2) -> list[Tracegate]:
        started = [await start_tracegate(policy, outbox_path=dsn) for _ in range(count)]
        for tg in started:
            tg.runtime.monotonic, tg.runtime.clock = clock.monotonic, clock.time
            await tg.keys_ready()
            assert shared(tg).up
        return started

    return _start


def shared(tg: Tracegate) -> SharedQuotas:
    assert tg.runtime.shared_quotas is not None
    return tg.runtime.shared_quotas


async def settled(*fleet: Tracegate) -> None:
    await asyncio.gather(*(shared(tg).settled() for tg in fleet))


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.02)


def dsn_of(tg: Tracegate) -> str:
    return tg.runtime.settings.outbox_path


async def row(dsn: str, sql: str, *args: object) -> Any:
    db = await asyncpg.connect(dsn)
    try:
        return await db.fetchval(sql, *args)
    finally:
        await db.close()


async def test_two_replicas_admit_the_limit_once_between_them_within_two_chunks_each(
    replicas: Replicas, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    rate, burst, chunk = 10, 10, 1  # a chunk: a tenth of a second's rate, at least 1
    clock = Clock()
    fleet = await replicas(
        quota_policy(issuer.url, payments=f"{{requests_per_second: {rate}, requests_burst: {burst}}}"), clock
    )
    posts, token = [Poster(client, tg) for tg in fleet], issuer.mint()
    admitted, ticks, step = [0, 0], 30, 0.1
    for _ in range(ticks):  # 80 requests a second offered to a limit of 10, 4 at a time to each
        answers = await asyncio.gather(*(posts[k](token) for k in (0, 1) for _ in range(4)))
        for n, (status, _, _) in enumerate(answers):
            assert status in (200, 429)
            admitted[n // 4] += status == 200
        await settled(*fleet)
        clock.advance(step)
    window = (ticks - 1) * step  # from the first requests to the last
    ceiling = burst + rate * window  # what one bucket admits over the window
    tolerance = 2 * chunk * len(fleet)  # one chunk held, one borrowed, per process
    assert ceiling - tolerance <= sum(admitted) <= ceiling + tolerance, admitted  # per process: 39 each
    assert min(admitted) > 0  # both served
    assert len(sink.received) == sum(admitted)
    assert await row(dsn_of(fleet[0]), "SELECT count(*) FROM tracegate_quota_buckets") == 1
    assert sum(len(quota_lines(tg)) for tg in fleet) == 8 * ticks - sum(admitted)  # the rest: refused
    leases = sum(tg.metric("tracegate_quota_leases_total", result=r) for tg in fleet for r in ("granted", "short"))
    assert 0 < leases <= sum(admitted) + 2 * ticks * len(fleet)  # at most a chunk each, or a short answer a tick


async def test_a_single_replica_behaves_as_before_with_its_bucket_in_postgres(
    replicas: Replicas, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    clock = Clock()
    policy = quota_policy(issuer.url, payments="{requests_per_second: 0.5, requests_burst: 3}")
    (tg,) = await replicas(policy, clock, count=1)
    post, token = Poster(client, tg), issuer.mint()

    async def status() -> tuple[int, str | None]:
        code, headers, _ = await post(token)
        await settled(tg)
        return code, headers.get("Retry-After")

    # tests/test_quotas.py's first scenario, answer for answer.
    assert [await status() for _ in range(4)] == [(200, None)] * 3 + [(429, "2")]
    assert await row(dsn_of(tg), "SELECT tokens FROM tracegate_quota_buckets WHERE key = $1", KEY) == 0
    clock.advance(1.9)
    assert (await status())[0] == 429
    clock.advance(0.1)  # a token is back in the row: one passes, the next waits again
    assert [await status() for _ in range(2)] == [(200, None), (429, "2")]
    assert len(sink.received) == 4
    assert quota_lines(tg) == [("refused", "quota-requests", "payments-ci", "payments-protected", "http")] * 3
    assert tg.metric("tracegate_quota_shared") == 1 and tg.metric("tracegate_quota_fallbacks_total") == 0


async def test_bytes_larger_than_a_chunk_pass_as_before_and_their_debt_is_the_rows(
    replicas: Replicas, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    clock = Clock()
    (tg,) = await replicas(quota_policy(issuer.url, payments="{bytes_per_second: 100, bytes_burst: 1000}"), clock, 1)
    post, token = Poster(client, tg), issuer.mint()

    async def status(body: bytes) -> tuple[int, str | None]:
        code, headers, _ = await post(token, body)
        await settled(tg)
        return code, headers.get("Retry-After")

    # tests/test_quotas.py's bytes scenario: the chunk is 10 bytes, the requests far larger.
    assert await status(b"a" * 1000) == (200, None)  # the whole burst
    assert await status(b"b" * 250) == (429, "3")
    clock.advance(10)  # the row is full again
    assert await status(b"c" * 2000) == (200, None)  # over the burst: passes on a full bucket…
    assert await status(b"d" * 10) == (429, "11")  # …and leaves 1000 in debt
    assert [r.body[:1] for r in sink.received] == [b"a", b"c"]
    bucket = "SELECT tokens FROM tracegate_quota_buckets WHERE key = 'account:payments-ci:bytes'"
    assert await row(dsn_of(tg), bucket) == 0  # the row lent all it had to pay the debt


async def test_two_replicas_share_the_daily_budget_and_its_midnight(
    replicas: Replicas, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    midnight = (int(time.time()) // DAY + 1) * DAY
    clock = Clock(wall=midnight - 1.5)
    fleet = await replicas(quota_policy(issuer.url, payments="{daily_bytes: 2000}"), clock)
    (a, b), token = [Poster(client, tg) for tg in fleet], issuer.mint()

    async def status(post: Poster, body: bytes) -> tuple[int, str | None]:
        code, headers, _ = await post(token, body)
        await settled(*fleet)
        return code, headers.get("Retry-After")

    assert await status(a, b"a" * 1500) == (200, None)
    assert await status(b, b"b" * 100) == (200, None)  # 1600 spent, between them
    assert await status(b, b"c" * 1000) == (429, "2")  # not today: until 00:00 UTC
    assert await status(a, b"d" * 400) == (200, None)  # what is left
    # Now a byte at a time: each may still spend the chunk it holds (1 byte: 1/10,000 of the
    # day's budget, at least 1), and no more.
    late = [await status(post, b"e") for _ in range(3) for post in (a, b)]
    assert late.count((200, None)) <= 2 and late[-2:] == [(429, "2")] * 2
    spent = 1500 + 100 + 400 + late.count((200, None))
    assert 2000 <= spent <= 2000 + 2  # the tolerance: one chunk per process
    clock.advance(1.5)  # 00:00:00 UTC: a new day, a new budget for the fleet
    assert await status(b, b"g" * 1500) == (200, None)
    assert await status(a, b"h" * 100) == (200, None)
    assert await status(a, b"i" * 600) == (429, str(DAY))  # 1600 of 2000 spent today
    assert [r.body[:1] for r in sink.received if r.body != b"e"] == [b"a", b"b", b"d", b"g", b"h"]
    today = "SELECT spent FROM tracegate_quota_days WHERE day = $1"
    assert await row(dsn_of(fleet[0]), today, midnight // DAY) == 1500 + 100 + 2  # and a chunk each, held


async def test_with_postgres_stopped_each_replica_serves_its_local_share_and_returns_to_the_fleet(
    replicas: Replicas,
    issuer: StandInIssuer,
    sink: Sink,
    client: aiohttp.ClientSession,
    postgres: PgServer,  # noqa: F811
) -> None:
    rate, burst = 10, 10
    clock = Clock()
    fleet = await replicas(
        quota_policy(issuer.url, payments=f"{{requests_per_second: {rate}, requests_burst: {burst}}}"), clock
    )
    assert [await shared(tg).heartbeat() for tg in fleet] == [2, 2]  # the local share: half each
    posts, token = [Poster(client, tg) for tg in fleet], issuer.mint()
    assert [(await post(token))[0] for post in posts] == [200, 200]
    await settled(*fleet)
    postgres.stop("fast")
    try:
        while any(shared(tg).up for tg in fleet):  # their next leases fail: each is on its own
            started = time.monotonic()
            assert {(await post(token))[0] for post in posts} <= {200, 429}
            assert time.monotonic() - started < 1.0  # nobody waits for the database
            await settled(*fleet)
        clock.advance(10)  # full again: each holds half the burst and refills at half the rate
        admitted = [0, 0]
        for _ in range(10):
            answers = await asyncio.gather(*(posts[k](token) for k in (0, 1) for _ in range(4)))
            for n, (status, _, _) in enumerate(answers):
                admitted[n // 4] += status == 200
            clock.advance(0.1)
        share = burst / 2 + rate / 2 * 0.9  # 9.5 each over 0.9 s: the fleet's limit, split in two
        assert admitted == [int(share)] * 2
        for tg in fleet:
            assert (tg.metric("tracegate_quota_fallbacks_total"), tg.metric("tracegate_quota_shared")) == (1, 0)
            assert tg.metric("tracegate_quota_leases_total", result="failed") >= 1
    finally:
        postgres.start()
    await until(lambda: all(shared(tg).up for tg in fleet))  # back within the retry's backoff
    clock.advance(10)
    again = []
    for _ in range(3):
        again.append((await posts[0](token))[0])
        await settled(*fleet)
    assert again == [200, 200, 200]  # leasing again
    assert all(tg.metric("tracegate_quota_shared") == 1 for tg in fleet)
    assert await row(dsn_of(fleet[0]), "SELECT count(*) FROM tracegate_quota_buckets") == 1


class Relay:
    """A TCP relay to PostgreSQL that can stall: the database, slow to answer."""

    def __init__(self, port: int) -> None:
        self.port, self.flowing = port, asyncio.Event()
        self.flowing.set()
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def __aexit__(self, *_: object) -> None:
        self._server.close()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            self._pumps.add(asyncio.ensure_future(self._pump(src, dst)))

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                await self.flowing.wait()
                dst.write(data)
                await dst.drain()


async def test_a_database_that_stops_answering_never_holds_a_request(
    postgres: PgServer,  # noqa: F811
    dsn: str,
) -> None:
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "p.yaml").write_text(quota_policy("https://gitlab.example.com", docs="{requests_per_second: 20}"))
        policy = load_policy(tmp, environ={"LS_TOKEN_PAYMENTS": "k", "LS_TOKEN_DOCS": "k"})
    registry, relay = CollectorRegistry(), Relay(postgres.port)
    async with relay as port:
        fleet = SharedQuotas(
            Secret(dsn.replace(f":{postgres.port}/", f":{port}/")),
            clock=clock.time,
            monotonic=clock.monotonic,
            registry=registry,
            timeout=0.3,
        )
        try:
            quotas = build_quotas(policy, clock.monotonic(), shared=fleet)
            assert quotas is not None
            await fleet.started()
            assert fleet.up
            no_body = CIMultiDictProxy(CIMultiDict[str]())

            def admit() -> bool:
                """One gateway check for docs (requests only), timed: it never waits."""
                started = time.perf_counter()
                over = quotas.admit("docs", "authz", "authz", no_body, clock.monotonic(), clock.time)
                assert time.perf_counter() - started < 0.05  # a lease may take 0.3 s before it gives up
                return not isinstance(over, Exhausted)

            async def admitted(tries: int, *, settle: bool = True) -> int:
                passed = 0
                for _ in range(tries):
                    passed += admit()
                    await (fleet.settled() if settle else asyncio.sleep(0.001))  # leases land, or hang
                return passed

            assert await admitted(21) == 20  # the burst, leased a chunk (2) at a time
            await fleet.settled()
            relay.flowing.clear()  # the database hangs
            clock.advance(0.5)  # 10 more in the row, out of reach
            before = await admitted(100, settle=False)  # 0.1 s of real time at least; a lease times out at 0.3 s
            assert before <= 2 + 2  # what it held and what it may borrow: no more
            await until(lambda: not fleet.up, timeout=2)
            sample = registry.get_sample_value
            assert (sample("tracegate_quota_fallbacks_total"), sample("tracegate_quota_shared")) == (1, 0)
            clock.advance(1)  # on its own (the only process counted): the whole limit, by the clock
            alone = await admitted(25)
            assert 20 - 4 <= alone <= 20 and before + alone <= 20 + 4  # less what it borrowed
            relay.flowing.set()  # answering again
            await until(lambda: fleet.up, timeout=10)
            clock.advance(1)
            # The row's burst, leased again, less what the lease that timed out took when the
            # database woke (its answer never came: a chunk and the debt, lost to the fleet).
            assert 20 - 2 - 4 <= await admitted(25) <= 20
            assert sample("tracegate_quota_shared") == 1
        finally:
            await fleet.close()
