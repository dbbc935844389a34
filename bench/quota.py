"""The quota benchmark (issue 23): what ``limits:`` cost when they are configured but not
reached, against none.

``python bench/quota.py`` — micro: timeit of admission's quota step (proxy/gate/admission.py,
``admit``, the lines after the decision) on a policy loaded by the real loader, per case:
  account limits (requests, bytes, daily budget), not reached
  account and rule limits, not reached
  a rule without limits, in a policy that has some
  a policy without limits

``python bench/quota.py --e2e`` (needs wrk and nginx: bench/run installs them) — end to end,
as bench/run measures: two tracegate processes (``--workers 1``) with the same policy except
``limits:`` on the account (high enough never to be reached), the same token, 20 KB
protobuf through wrk to an nginx sink, interleaved rounds (alternating order); medians and
the per-round paired throughput ratio. The issue asks for ≥ 0.97.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from multidict import CIMultiDict, CIMultiDictProxy  # noqa: E402

from proxy.gate.quota import Exhausted, build_quotas  # noqa: E402
from proxy.policy import Policy, load_policy  # noqa: E402
from proxy.policy.evaluate import Decision  # noqa: E402

POLICY = """\
issuers:
  gitlab:
    issuer: {issuer}
    audiences: [tracegate]
service_accounts:
  bench-ci:
    access_token: {{env: LS_TOKEN_BENCH}}
    {account_limits}
  other-ci:
    access_token: {{env: LS_TOKEN_BENCH}}
rules:
  - name: payments-protected
    issuer: gitlab
    when: {{project_path: "payments/*", ref_protected: "true"}}
    service_account: bench-ci
    {rule_limits}
  - name: other
    issuer: gitlab
    when: {{project_id: 5151}}
    service_account: other-ci
"""
#: Never reached in a benchmark: what a busy account might be given, times a thousand.
HIGH = "limits: {requests_per_second: 1000000, bytes_per_second: 100GiB, bytes_burst: 1TiB, daily_bytes: 1000TiB}"
HIGH_RULE = "limits: {requests_per_second: 1000000, bytes_per_second: 100GiB}"
#: An OTLP/HTTP export's head as the Python SDK sends it (20 KB protobuf).
HEADERS = CIMultiDictProxy(
    CIMultiDict(
        {
            "Host": "127.0.0.1:4318",
            "User-Agent": "OTel-OTLP-Exporter-Python/1.36.0",
            "Accept-Encoding": "gzip, deflate",
            "Accept": "*/*",
            "Connection": "keep-alive",
            "Content-Type": "application/x-protobuf",
            "Authorization": "Bearer " + "x" * 900,
            "Content-Length": "20480",
        }
    )
)


def _policy(text: str) -> Policy:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "p.yaml").write_text(text)
        return load_policy(tmp, environ={"LS_TOKEN_BENCH": "k"})


def micro(number: int, repeat: int) -> None:
    url = "https://gitlab.example.com"
    cases = {
        "account limits (requests, bytes, daily), not reached": (HIGH, "", "payments-protected"),
        "account and rule limits, not reached": (HIGH, HIGH_RULE, "payments-protected"),
        "a rule without limits, in a policy with some": (HIGH, "", "other"),
        "a policy without limits": ("", "", "payments-protected"),
    }
    for label, (account_limits, rule_limits, rule) in cases.items():
        policy = _policy(POLICY.format(issuer=url, account_limits=account_limits, rule_limits=rule_limits))
        step = _admission_step(policy, rule)
        best = min(timeit.repeat(step, number=number, repeat=repeat)) / number
        print(f"{label:55s} {best * 1e6:6.3f} µs per admission")


def _admission_step(policy: Policy, rule_name: str) -> Callable[[], object]:
    """admit's lines after an allow decision, as they run there (gate.quotas, decision.rule)."""
    monotonic, clock = time.monotonic, time.time
    rule = next(r for r in policy.rules if r.name == rule_name)
    decision = Decision(True, "rule-allowed", rule, policy.service_accounts[rule.service_account or ""])
    quotas = build_quotas(policy, monotonic())

    def step() -> object:
        if quotas is not None and decision.rule is not None:
            over = quotas.admit(decision.rule.name, "http", "ingest", HEADERS, monotonic(), clock)
            if isinstance(over, Exhausted):
                raise AssertionError("a limit was reached")
            if over:
                return over
        return None

    return step


async def e2e(rounds: int, duration: int, connections: int) -> None:
    from bench.payloads import otlp_payload
    from bench.run import Bench, Run

    args = argparse.Namespace(connections=connections, duration=duration)
    with tempfile.TemporaryDirectory(prefix="tracegate-quota-bench-") as tmp:
        work = Path(tmp)
        bench = Bench(work, args)
        await bench.issuer.start()
        try:
            url = bench.issuer.url
            for name, limits in (("none", ""), ("limits", HIGH)):
                (work / name).mkdir()
                (work / name / "p.yaml").write_text(POLICY.format(issuer=url, account_limits=limits, rule_limits=""))
            body = work / "20KB.pb"
            body.write_bytes(otlp_payload(20 * 1024))
            tokens = work / "one.tokens"
            tokens.write_text(bench.issuer.mint(exp=int(time.time()) + 4 * 3600) + "\n")
            sink = bench.nginx(
                "sink",
                """server { listen 127.0.0.1:PORT; keepalive_timeout 300s;
                   location / { default_type application/x-protobuf; return 200 ""; } }""",
            )
            servers = {
                name: bench.tracegate(f"tracegate-{name}", sink.url, "--workers", "1", policies=work / name)
                for name in ("none", "limits")
            }
            await bench.wait_ready()
            for server in servers.values():  # warm-up
                await bench.wrk(server, body, tokens, duration=1)
            cases: dict[str, Callable[[], Any]] = {
                name: partial(bench.wrk, s, body, tokens) for name, s in servers.items()
            }
            raw: dict[str, list[Run]] = {}
            medians = await bench.interleaved(cases, rounds, alternate=True, raw=raw)
        finally:
            bench.stop_all()
            await bench.issuer.stop()
    for name, run in medians.items():
        rates = f"{run.rps:8.0f} req/s  p50 {run.p50:6.2f} ms  p99 {run.p99:6.2f} ms"
        print(f"{name:8s} {rates}  {run.cpu_per_1k:.3f} CPU s/1k")
    ratios = [b.rps / a.rps for a, b in zip(raw["none"], raw["limits"], strict=True)]
    print(
        f"limits / none throughput: median of per-round ratios {statistics.median(ratios):.3f} "
        f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)}); ratio of medians "
        f"{medians['limits'].rps / medians['none'].rps:.3f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--number", type=int, default=200_000, help="micro: calls per timing (default 200,000)")
    parser.add_argument("--repeat", type=int, default=7, help="micro: timings, the best quoted (default 7)")
    parser.add_argument("--e2e", action="store_true", help="also run the end-to-end wrk comparison")
    parser.add_argument("--rounds", type=int, default=7, help="e2e: interleaved rounds (default 7)")
    parser.add_argument("--duration", type=int, default=5, help="e2e: seconds per wrk run (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="e2e: wrk connections (default 32)")
    args = parser.parse_args()
    print(f"micro: timeit, best of {args.repeat} × {args.number:,} calls, Python {sys.version.split()[0]}")
    micro(args.number, args.repeat)
    if args.e2e:
        asyncio.run(e2e(args.rounds, args.duration, args.connections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
