"""tracegate's own per-request work on the admitted path, and its memory with many identities.

Not part of the test suite. Two sections, each in a process of its own:

``speed``
    ``admit()`` + ``Admitted.record()`` in a loop with a real RS256 token (verified once
    against a stand-in issuer on loopback, then served from the cache) under the bench's
    policy, plus the other per-request pieces of the OTLP/HTTP door that are ours: the
    upstream header set (``HeaderPolicy.upstream``) and the forwarder's three metric
    updates. µs per call: the median of ``--rounds`` rounds of ``--calls`` calls.
``identities``
    ``--identities`` distinct ES256 tokens (minted in batches and dropped, so that only
    tracegate's own memory grows) each admitted and recorded once, then: RSS growth, the
    growth of ``gc.get_objects()`` (containers the cycle collector walks), and the time
    of a full ``gc.collect()`` (median of 5, each after one more identity was admitted;
    ``gc.freeze()`` not used), and the same before the identities were admitted.

``--tree DIR`` runs the sections against another checkout of tracegate (for before/after
figures from the same machine, interleaved: ``--tree`` and this checkout alternate).
Figures only mean something as ratios of runs on the same machine in the same session.

    .venv/bin/python bench/trim.py [--sections speed,identities] [--tree /tmp/before]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

POLICY = """\
issuers:
  gitlab:
    issuer: {issuer}
    audiences: [tracegate]
    algorithms: [RS256, ES256]
service_accounts:
  bench-ci:
    access_token: {{env: LS_TOKEN_BENCH}}
  bench-stamped:
    access_token: {{env: LS_TOKEN_BENCH}}
    stamp: default
rules:
  - name: no-forks
    issuer: gitlab
    effect: deny
    when: {{project_path: "*/forks/*"}}
  - name: payments-protected
    issuer: gitlab
    when: {{project_path: "payments/*", ref_protected: "true"}}
    service_account: bench-ci
  - name: stamped
    issuer: gitlab
    when: {{project_id: 5151}}
    service_account: bench-stamped
"""


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _runtime(work: Path, identities: int) -> tuple[Any, Any]:
    from proxy.dev.standins import StandInIssuer
    from proxy.gate.runtime import Runtime
    from proxy.observe.audit import AuditLog
    from proxy.observe.metrics import Metrics
    from proxy.settings.config import Settings

    issuer = StandInIssuer()
    await issuer.start()
    (work / "policies").mkdir()
    (work / "policies" / "bench.yaml").write_text(POLICY.format(issuer=issuer.url))
    flags = {
        "policies": str(work / "policies"),
        "upstream": "http://127.0.0.1:9",
        "data_dir": str(work / "data"),
        "grpc_listen": "off",
        "token_cache_size": str(max(identities * 2, 1000)),
    }
    settings = Settings.load(flags, {})
    runtime = Runtime(
        settings, {"LS_TOKEN_BENCH": "bench-key-0123456789"}, Metrics(), audit=AuditLog(lambda _text: None)
    )
    await runtime.start(runtime.load())
    for _ in range(400):
        if not runtime.issuers_without_keys():
            break
        await asyncio.sleep(0.01)
    return runtime, issuer


def _request_headers(token: str) -> Any:
    from multidict import CIMultiDict, CIMultiDictProxy

    return CIMultiDictProxy(
        CIMultiDict(
            [
                ("Host", "127.0.0.1:4318"),
                ("User-Agent", "OTel-OTLP-Exporter-Python/1.25.0"),
                ("Accept-Encoding", "gzip, deflate"),
                ("Accept", "*/*"),
                ("Connection", "keep-alive"),
                ("Content-Type", "application/x-protobuf"),
                ("Content-Length", "20480"),
                ("Authorization", f"Bearer {token}"),
            ]
        )
    )


async def speed(args: argparse.Namespace) -> dict[str, Any]:
    from multidict import MultiDict, MultiDictProxy

    from proxy.dev.standins import gitlab_claims
    from proxy.gate.admission import Admitted, admit

    with tempfile.TemporaryDirectory() as tmp:
        runtime, issuer = await _runtime(Path(tmp), 1)
        try:
            token = issuer.mint(gitlab_claims(issuer.url, exp=int(time.time()) + 3600))
            headers = _request_headers(token)
            query = MultiDictProxy(MultiDict())
            metrics = runtime.metrics
            header_policy = runtime.header_policy
            first = await admit(runtime, headers, query, signal="traces", transport="http")
            assert isinstance(first, Admitted), first
            assert runtime.forwarder is not None
            key = runtime.forwarder.route(first.account, "traces")  # the account's route: URL, headers

            async def admit_record(n: int) -> None:
                for _ in range(n):
                    admitted = await admit(runtime, headers, query, signal="traces", transport="http")
                    admitted.record("allowed", "forwarded", bytes_in=20480, upstream_status=200)  # type: ignore[union-attr]

            async def door(n: int) -> None:
                # admit + record + what forward() does per request that is ours (headers, metrics)
                for _ in range(n):
                    admitted = await admit(runtime, headers, query, signal="traces", transport="http")
                    header_policy.upstream(headers, key)
                    metrics.child(metrics.request_bytes, "traces").inc(20480)
                    metrics.child(metrics.upstream_responses, "traces", "200").inc()
                    metrics.child(metrics.upstream_latency, "traces").observe(0.0012)
                    admitted.record("allowed", "forwarded", bytes_in=20480, upstream_status=200)  # type: ignore[union-attr]

            async def headers_only(n: int) -> None:
                for _ in range(n):
                    header_policy.upstream(headers, key)

            cases = {"admit+record": admit_record, "door (+headers, metrics)": door, "headers": headers_only}
            samples: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(args.rounds):
                for name, case in cases.items():
                    started = time.perf_counter()
                    await case(args.calls)
                    samples[name].append((time.perf_counter() - started) / args.calls * 1e6)
            return {name: statistics.median(values) for name, values in samples.items()}
        finally:
            await runtime.close()
            await issuer.stop()


async def identities(args: argparse.Namespace) -> dict[str, Any]:
    import jwt
    from multidict import MultiDict, MultiDictProxy

    from proxy.dev.standins import gitlab_claims
    from proxy.gate.admission import Admitted, admit

    with tempfile.TemporaryDirectory() as tmp:
        runtime, issuer = await _runtime(Path(tmp), args.identities)
        try:
            query = MultiDictProxy(MultiDict())
            exp = int(time.time()) + 3600

            def mint(n: int) -> str:
                claims = gitlab_claims(issuer.url, job_id=str(n), jti=f"bench-{n}", exp=exp)
                return jwt.encode(claims, issuer.ec_key, algorithm="ES256", headers={"kid": issuer.ec_kid})

            async def admit_one(token: str) -> None:
                admitted = await admit(runtime, _request_headers(token), query, signal="traces", transport="http")
                assert isinstance(admitted, Admitted), admitted
                admitted.record("allowed", "forwarded", bytes_in=20480, upstream_status=200)

            await admit_one(mint(-1))  # keys fetched, first-use allocations made
            gc.collect()
            rss0, objects0 = _rss_kib(), len(gc.get_objects())
            empty = []
            for _ in range(5):
                t0 = time.perf_counter()
                gc.collect()
                empty.append((time.perf_counter() - t0) * 1e3)
            kinds0 = collections.Counter(type(o).__name__ for o in gc.get_objects())
            started = time.perf_counter()
            for start in range(0, args.identities, 1000):
                for token in [mint(n) for n in range(start, min(start + 1000, args.identities))]:
                    await admit_one(token)
            elapsed = time.perf_counter() - started
            runtime.audit.flush()
            gc.collect()
            rss1, objects1 = _rss_kib(), len(gc.get_objects())
            pauses = []
            for n in range(5):  # each after one more identity: as in a live process, whose cache grows
                await admit_one(mint(args.identities + n))
                t0 = time.perf_counter()
                gc.collect()
                pauses.append((time.perf_counter() - t0) * 1e3)
            print("pauses", [round(p, 1) for p in pauses], file=sys.stderr)
            kinds = collections.Counter(type(o).__name__ for o in gc.get_objects())
            kinds.subtract(kinds0)
            print("tracked growth by type:", kinds.most_common(5), file=sys.stderr)
            return {
                "identities": args.identities,
                "gc_objects": objects1,
                "rss_growth_mib": (rss1 - rss0) / 1024,
                "bytes_per_identity": (rss1 - rss0) * 1024 / args.identities,
                "gc_objects_growth": objects1 - objects0,
                "gc_objects_per_identity": (objects1 - objects0) / args.identities,
                "full_collect_ms_before_identities": statistics.median(empty),
                "full_collect_ms": statistics.median(pauses),
                "mint_and_admit_s": elapsed,
            }
        finally:
            await runtime.close()
            await issuer.stop()


def child(args: argparse.Namespace) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    section = {"speed": speed, "identities": identities}[args.child]
    print(json.dumps(asyncio.run(section(args))))


def run_child(tree: Path, section: str, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", section]
    argv += ["--rounds", str(args.rounds), "--calls", str(args.calls), "--identities", str(args.identities)]
    env = {**os.environ, "PYTHONPATH": str(tree), "TRACEGATE_TRIM_TREE": str(tree)}
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)  # noqa: S603 - our own argv
    if out.returncode != 0:
        raise SystemExit(f"{section} in {tree} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="speed,identities")
    parser.add_argument("--tree", type=Path, help="another checkout to compare with (run alternately)")
    parser.add_argument("--repeat", type=int, default=1, help="processes per section and tree (alternating)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--identities", type=int, default=100_000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    trees = {"this": ROOT} if args.tree is None else {"before": args.tree.resolve(), "after": ROOT}
    for section in args.sections.split(","):
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        for _ in range(args.repeat):
            for name, tree in trees.items():
                results[name].append(run_child(tree, section, args))
        for name, runs in results.items():
            merged = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            print(f"{section} [{name}]: " + json.dumps(merged, indent=None))


if __name__ == "__main__":
    tree = os.environ.get("TRACEGATE_TRIM_TREE")
    sys.path.insert(0, tree or str(ROOT))
    main()
