"""Per-identity quotas (issue 23, item 3): ``limits:`` on service accounts and rules, through
a real tracegate over real sockets. Time is the runtime's injected clocks (a test's own
:class:`Clock`), so nothing here sleeps to refill a bucket."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import status_pb2

from proxy.answers import RESOURCE_EXHAUSTED
from proxy.cli import main
from proxy.dev.standins import GrpcSink, Sink, StandInIssuer
from tests.conftest import Tracegate
from tests.grpc_clients import call
from tests.test_authz import envoy_check
from tests.test_grpc import retry_delay

DAY = 86_400


class Clock:
    """The runtime's two clocks, moved by hand: ``monotonic`` for the buckets (started past
    the real one, so never behind a bucket made before it was installed) and ``time`` (UTC
    wall clock) for the daily budget."""

    def __init__(self, wall: float | None = None) -> None:
        self.mono = time.monotonic() + 1.0
        self.wall = time.time() if wall is None else wall

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def quota_policy(
    issuer_url: str, *, payments: str = "", docs: str = "", payments_rule: str = "", docs_rule: str = ""
) -> str:
    """conftest's policy, with ``limits:`` where asked (each a flow mapping)."""

    def limits(value: str) -> str:
        return f"limits: {value}" if value else ""

    return textwrap.dedent(f"""\
        issuers:
          gitlab:
            issuer: {issuer_url}
            audiences: [tracegate]
        service_accounts:
          payments-ci:
            access_token: {{env: LS_TOKEN_PAYMENTS}}
            {limits(payments)}
          docs-ci:
            access_token: {{env: LS_TOKEN_DOCS}}
            signals: [traces]
            {limits(docs)}
        rules:
          - name: payments-protected
            issuer: gitlab
            when: {{project_path: "payments/*", ref_protected: "true"}}
            service_account: payments-ci
            {limits(payments_rule)}
          - name: docs
            issuer: gitlab
            when: {{project_path: ["docs/site", "docs/handbook"]}}
            service_account: docs-ci
            {limits(docs_rule)}
        """)


async def started(start_tracegate: Callable[..., Any], policy: str, clock: Clock, **flags: str) -> Tracegate:
    tg: Tracegate = await start_tracegate(policy, **flags)
    tg.runtime.monotonic, tg.runtime.clock = clock.monotonic, clock.time
    await tg.keys_ready()
    return tg


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


class Poster:
    def __init__(self, client: aiohttp.ClientSession, tg: Tracegate) -> None:
        self.client, self.tg = client, tg

    async def __call__(
        self, token: str, body: bytes = b"\x0a\x00", *, chunked: bool = False, json_body: bool = False
    ) -> tuple[int, dict[str, str], bytes]:
        async def pieces() -> AsyncIterator[bytes]:
            yield body[: len(body) // 2]
            yield body[len(body) // 2 :]

        content_type = "application/json" if json_body else "application/x-protobuf"
        headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
        async with self.client.post(
            self.tg.url + "/v1/traces", data=pieces() if chunked else body, headers=headers
        ) as resp:
            return resp.status, dict(resp.headers), await resp.read()


def quota_lines(tg: Tracegate) -> list[tuple[str, str, str | None, str | None, str]]:
    return [
        (r["decision"], r["reason"], r["service_account"], r["rule"], r["transport"])
        for r in tg.audit()
        if r["reason"].startswith("quota-")
    ]


def refused_count(tg: Tracegate, account: str, reason: str, transport: str = "http") -> float:
    return tg.metric(
        "tracegate_requests_total",
        signal="traces",
        service_account=account,
        decision="refused",
        reason=reason,
        transport=transport,
    )


async def test_requests_over_the_burst_get_429_with_retry_after_and_never_reach_the_sink(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    clock = Clock()
    policy = quota_policy(issuer.url, payments="{requests_per_second: 0.5, requests_burst: 3}")
    tg = await started(start_tracegate, policy, clock)
    post, payments, docs = Poster(client, tg), issuer.mint(), issuer.mint(project_path="docs/site")

    assert [(await post(payments))[0] for _ in range(3)] == [200, 200, 200]  # the burst
    status, headers, body = await post(payments)
    assert status == 429
    assert headers["Retry-After"] == "2"  # one request at 0.5/s
    assert body[:2] == b"\x08\x08"  # google.rpc.Status{code: RESOURCE_EXHAUSTED}
    status, headers, body = await post(payments, b"{}", json_body=True)
    assert (status, json.loads(body)["code"], headers["Retry-After"]) == (429, RESOURCE_EXHAUSTED, "2")
    assert len(sink.received) == 3  # nothing over the limit went upstream

    assert [(await post(docs))[0] for _ in range(5)] == [200] * 5  # another account: unaffected
    clock.advance(1.9)
    assert (await post(payments))[0] == 429
    clock.advance(0.1)  # a token is back: one passes, the next waits again
    assert [(await post(payments))[0] for _ in range(2)] == [200, 429]
    assert len(sink.received) == 3 + 5 + 1

    refused = ("refused", "quota-requests", "payments-ci", "payments-protected", "http")
    assert quota_lines(tg) == [refused] * 4
    assert refused_count(tg, "payments-ci", "quota-requests") == 4
    assert refused_count(tg, "docs-ci", "quota-requests") == 0


async def test_bytes_are_charged_from_content_length_and_retry_after_counts_the_shortfall(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    clock = Clock()
    tg = await started(
        start_tracegate, quota_policy(issuer.url, payments="{bytes_per_second: 100, bytes_burst: 1000}"), clock
    )
    post, token = Poster(client, tg), issuer.mint()
    assert (await post(token, b"a" * 1000))[0] == 200  # the whole burst
    status, headers, _ = await post(token, b"b" * 250)
    assert (status, headers["Retry-After"]) == (429, "3")  # 250 bytes at 100 B/s: 2.5 s, rounded up
    clock.advance(10)  # full again
    # Larger than the burst: passes on a full bucket (else never), and leaves it 1000 in debt.
    assert (await post(token, b"c" * 2000))[0] == 200
    status, headers, _ = await post(token, b"d" * 10)
    assert (status, headers["Retry-After"]) == (429, "11")  # (1000 + 10) bytes at 100 B/s
    assert [r.body[:1] for r in sink.received] == [b"a", b"c"]
    assert quota_lines(tg) == [("refused", "quota-bytes", "payments-ci", "payments-protected", "http")] * 2


async def test_a_chunked_upload_is_charged_after_it_streamed(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    clock = Clock()
    tg = await started(
        start_tracegate, quota_policy(issuer.url, payments="{bytes_per_second: 100, bytes_burst: 1000}"), clock
    )
    post, token = Poster(client, tg), issuer.mint()
    # No Content-Length: let in while the bucket is not in debt, charged once it has streamed.
    assert (await post(token, b"x" * 3000, chunked=True))[0] == 200
    assert sink.received[0].body == b"x" * 3000
    status, headers, _ = await post(token, b"y" * 10)
    assert (status, headers["Retry-After"]) == (429, "21")  # 2000 in debt + 10, at 100 B/s
    status, headers, _ = await post(token, b"z" * 10, chunked=True)  # in debt: a chunked one waits too
    assert (status, headers["Retry-After"]) == (429, "21")
    assert len(sink.received) == 1


async def test_the_daily_budget_resets_at_utc_midnight(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    midnight = (int(time.time()) // DAY + 1) * DAY
    clock = Clock(wall=midnight - 1.5)
    tg = await started(start_tracegate, quota_policy(issuer.url, payments="{daily_bytes: 2000}"), clock)
    post, token = Poster(client, tg), issuer.mint()
    assert (await post(token, b"a" * 1500))[0] == 200
    status, headers, _ = await post(token, b"b" * 1000)
    assert (status, headers["Retry-After"]) == (429, "2")  # until 00:00 UTC
    assert (await post(token, b"c" * 500))[0] == 200  # what is left of the day still fits
    assert (await post(token, b"d" * 1))[0] == 429
    clock.advance(1.5)  # 00:00:00 UTC: a new day, a new budget
    assert (await post(token, b"e" * 1000))[0] == 200
    assert [r.body[:1] for r in sink.received] == [b"a", b"c", b"e"]
    assert quota_lines(tg) == [("refused", "quota-daily-bytes", "payments-ci", "payments-protected", "http")] * 2


async def test_rule_limits_apply_to_what_the_rule_admits(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    clock = Clock()
    policy = quota_policy(
        issuer.url,
        docs="{requests_per_second: 100}",
        docs_rule="{requests_per_second: 1, requests_burst: 2}",
    )
    tg = await started(start_tracegate, policy, clock)
    post = Poster(client, tg)
    site, handbook = issuer.mint(project_path="docs/site"), issuer.mint(project_path="docs/handbook")
    # Both projects match the docs rule: they share its bucket (the account's is far from full).
    assert [(await post(site))[0], (await post(handbook))[0], (await post(site))[0]] == [200, 200, 429]
    assert [(await post(issuer.mint()))[0] for _ in range(4)] == [200] * 4  # payments: no limits
    assert quota_lines(tg) == [("refused", "quota-requests", "docs-ci", "docs", "http")]


async def test_a_refusal_charges_none_of_the_limits_it_was_checked_against(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    clock = Clock()
    unprotected = textwrap.indent(
        textwrap.dedent("""\
        - name: payments-unprotected
          issuer: gitlab
          when: {project_path: "payments/*", ref_protected: "false"}
          service_account: payments-ci
        """),
        "  ",
    )
    policy = quota_policy(
        issuer.url,
        payments="{requests_per_second: 0.1, requests_burst: 2}",
        payments_rule="{requests_per_second: 0.1, requests_burst: 1}",
    )
    tg = await started(start_tracegate, policy + unprotected, clock)
    post, protected, other = Poster(client, tg), issuer.mint(), issuer.mint(ref_protected="false")
    assert (await post(protected))[0] == 200  # the account: 1 left; the rule: none
    assert (await post(protected))[0] == 429  # the rule's refusal: the account keeps its 1
    assert [(await post(other))[0], (await post(other))[0]] == [200, 429]  # now the account's is spent
    assert [line[1:4] for line in quota_lines(tg)] == [
        ("quota-requests", "payments-ci", "payments-protected"),
        ("quota-requests", "payments-ci", "payments-unprotected"),
    ]
    assert len(sink.received) == 2


async def test_a_reload_keeps_the_buckets_of_unchanged_limits(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    clock = Clock()
    tg = await started(
        start_tracegate, quota_policy(issuer.url, payments="{requests_per_second: 0.1, requests_burst: 2}"), clock
    )
    post, token = Poster(client, tg), issuer.mint()
    assert [(await post(token))[0] for _ in range(3)] == [200, 200, 429]
    assert await tg.runtime.reload()
    assert (await post(token))[0] == 429  # a SIGHUP grants no fresh burst
    (tg.policy_dir / "10-main.yaml").write_text(
        quota_policy(issuer.url, payments="{requests_per_second: 0.1, requests_burst: 5}")
    )
    assert await tg.runtime.reload()
    assert [(await post(token))[0] for _ in range(6)] == [200] * 5 + [429]  # a changed limit starts full


@pytest.fixture
async def grpc_sink() -> AsyncIterator[GrpcSink]:
    server = GrpcSink()
    await server.start()
    yield server
    await server.stop()


def pushback(trailers: tuple[tuple[str, str | bytes], ...]) -> str | None:
    return next((str(v) for k, v in trailers if k == "grpc-retry-pushback-ms"), None)


async def test_grpc_over_a_limit_is_resource_exhausted_with_retry_info_and_pushback(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    clock = Clock()
    policy = quota_policy(
        issuer.url,
        payments="{requests_per_second: 0.25, requests_burst: 1}",
        docs="{bytes_per_second: 100, bytes_burst: 1000}",
    )
    tg = await started(start_tracegate, policy, clock, grpc_listen="127.0.0.1:0", grpc_upstream=grpc_sink.target)
    assert tg.runtime.grpc_address is not None
    port = tg.runtime.grpc_address[1]
    payments = [("authorization", f"Bearer {issuer.mint()}")]
    docs = [("authorization", f"Bearer {issuer.mint(project_path='docs/site')}")]

    assert (await call(port, payments)).code is grpc.StatusCode.OK
    over = await call(port, payments)  # refused at admission: before the message is read
    assert over.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (retry_delay(over.trailers), pushback(over.trailers)) == (4, "4000")  # retryable per OTLP
    details = dict(over.trailers)["grpc-status-details-bin"]
    assert isinstance(details, bytes) and status_pb2.Status.FromString(details).code == RESOURCE_EXHAUSTED

    assert (await call(port, docs, b"\x00" * 900)).code is grpc.StatusCode.OK
    over = await call(port, docs, b"\x00" * 500)  # its bytes, charged once read: 400 short at 100 B/s
    assert over.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (retry_delay(over.trailers), pushback(over.trailers)) == (4, "4000")
    assert [len(r.body) for r in grpc_sink.received] == [2, 900]  # nothing refused went upstream
    assert quota_lines(tg) == [
        ("refused", "quota-requests", "payments-ci", "payments-protected", "grpc"),
        ("refused", "quota-bytes", "docs-ci", "docs", "grpc"),
    ]
    assert refused_count(tg, "docs-ci", "quota-bytes", "grpc") == 1


async def test_the_gateway_check_counts_every_request_and_answers_429_uncached(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    clock = Clock()
    policy = quota_policy(issuer.url, payments="{requests_per_second: 1, requests_burst: 2, bytes_per_second: 1}")
    tg = await started(
        start_tracegate, policy, clock, authz_listen="127.0.0.1:0", authz_dialect="envoy", authz_path_prefix="/authz"
    )
    url = f"http://127.0.0.1:{tg.runners[2].addresses[0][1]}/authz/v1/traces"
    payments, docs = issuer.mint(), issuer.mint(project_path="docs/site")

    for _ in range(2):  # the check has no body: requests count, bytes cannot
        async with client.post(url, headers=envoy_check(payments)) as resp:
            assert resp.status == 200
            # Allowed, but not to be cached: a cached allow would not be counted.
            assert (resp.headers["X-Accel-Expires"], resp.headers["Cache-Control"]) == ("0", "private, max-age=0")
    async with client.post(url, headers=envoy_check(payments)) as resp:
        assert (resp.status, resp.headers["Retry-After"], resp.headers["Cache-Control"]) == (429, "1", "no-store")
        assert "lightstep-access-token" not in resp.headers
    async with client.post(url, headers=envoy_check(docs)) as resp:  # no limits: cached as before
        assert resp.status == 200 and resp.headers["Cache-Control"] != "private, max-age=0"
    assert quota_lines(tg) == [("refused", "quota-requests", "payments-ci", "payments-protected", "authz")]
    assert refused_count(tg, "payments-ci", "quota-requests", "authz") == 1


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv, environ={})
    return code, capsys.readouterr().out


def test_check_names_each_bad_limit_with_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = quota_policy("https://gitlab.example.com", docs="{daily_bytes: lots, bytes_per_second: -1}", docs_rule="5")
    policy = policy.replace(
        "    access_token: {env: LS_TOKEN_PAYMENTS}\n",
        textwrap.indent(
            textwrap.dedent("""\
            access_token: {env: LS_TOKEN_PAYMENTS}
            limits:
              requests_per_second: 0
              requests_burst: 2.5
              bytes_burst: 1MiB
              per_minute: 3
              daily_bytes: .inf
            """),
            "    ",
        ),
    )
    (tmp_path / "p.yaml").write_text(policy)
    code, out = run_cli(["check", str(tmp_path)], capsys)
    where, what, docs = f"{tmp_path}/p.yaml", "service account 'payments-ci'.limits", "service account 'docs-ci'.limits"
    size = "must be positive: a whole number of bytes or a size such as 512KiB, 4MiB, 50GB"
    assert code == 1
    assert out.splitlines() == [
        f"{where}:9: {what}.requests_per_second must be a positive number",
        f"{where}:10: {what}.requests_burst must be a whole number of requests, ≥ 1",
        f"{where}:11: {what}.bytes_burst needs bytes_per_second: a burst refills at that rate",
        f"{where}:12: unknown key 'per_minute' in {what}; allowed: requests_per_second, requests_burst, "
        "bytes_per_second, bytes_burst, daily_bytes",
        f"{where}:13: {what}.daily_bytes {size}",
        f"{where}:18: {docs}.bytes_per_second {size}",
        f"{where}:18: {docs}.daily_bytes {size}",
        f"{where}:29: rule 'docs'.limits must be a mapping of one or more of requests_per_second, "
        "requests_burst, bytes_per_second, bytes_burst, daily_bytes",
    ]


def test_check_refuses_limits_on_a_deny_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = quota_policy("https://gitlab.example.com") + textwrap.indent(
        textwrap.dedent("""\
        - name: no-forks
          issuer: gitlab
          effect: deny
          when: {project_path: "*/forks/*"}
          limits: {requests_per_second: 5}
        """),
        "  ",
    )
    (tmp_path / "p.yaml").write_text(policy)
    code, out = run_cli(["check", str(tmp_path)], capsys)
    assert (code, out) == (
        1,
        f"{tmp_path}/p.yaml:28: rule 'no-forks' denies; remove limits (they apply to what a rule allows)\n",
    )


def test_explain_shows_the_limits_a_request_is_charged_to(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = quota_policy(
        "https://gitlab.example.com",
        payments="{requests_per_second: 10, requests_burst: 20, bytes_per_second: 1MiB, daily_bytes: 50GiB}",
        payments_rule="{bytes_per_second: 1.5KB, bytes_burst: 4 MiB}",
    )
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(policy)
    claims = tmp_path / "claims.json"
    claims.write_text(
        json.dumps(
            {
                "iss": "https://gitlab.example.com",
                "aud": "tracegate",
                "project_path": "payments/api",
                "ref_protected": "true",
            }
        )
    )
    code, out = run_cli(["explain", str(tmp_path / "policies"), "--claims", str(claims), "--signal", "traces"], capsys)
    where = f"{tmp_path}/policies/p.yaml"
    assert code == 0
    assert out.splitlines()[-3:] == [
        f"  limits of service account 'payments-ci' at {where}:8: 10 requests/s (burst 20), 1 MiB/s (burst 1 MiB), "
        "50 GiB per UTC day",
        f"  limits of rule 'payments-protected' at {where}:18: 1500 B/s (burst 4 MiB)",
        "  (shared by the fleet on a PostgreSQL outbox; else each process admits up to these, "
        "N replicas × W workers N × W times; over: 429)",
    ]
    claims.write_text(
        json.dumps({"iss": "https://gitlab.example.com", "aud": "tracegate", "project_path": "docs/site"})
    )
    code, out = run_cli(["explain", str(tmp_path / "policies"), "--claims", str(claims)], capsys)
    assert code == 0 and "docs-ci" in out and "limits of" not in out  # an account without limits
