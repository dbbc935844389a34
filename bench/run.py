"""tracegate benchmarks: every contender under the same load, same upstream, same run.

Contenders, interleaved round by round (A B C … A B C …), medians quoted:
  a  straight to the sink (nginx answering 200)
  b  nginx proxy_pass adding a static lightstep-access-token   (transport ceiling)
  c  bare aiohttp pass-through forwarder, bench/forwarder.py  (same-stack ceiling)
  d  tracegate: one valid GitLab-shaped token, policy match, key injection, audit + metrics on
  e  tracegate with 10,000 distinct valid tokens in rotation (fewer if --max-tokens is lower)
  f  tracegate, every token well-formed with a bad signature   (401)
  g  tracegate, every request denied by policy                 (403)
  h  nginx + auth_request → tracegate's authz listener, no decision cache (deploy/nginx)
  i  the same with the shipped decision cache

Section ``stamp`` (``--only stamp``): d's process with one token of an account without
``stamp:`` (the byte-for-byte stream) against one of an account with ``stamp: default``
(read, splice verified attributes in, send), 1 KB / 20 KB / 1 MB protobuf, interleaved.
  h–k  OTLP/gRPC (``--only grpc``; its own letters, apart from the gateway's h and i): sink,
       bare grpc.aio forwarder, nginx grpc_pass, tracegate (bench/grpc_bench.py)

Section ``baseline`` (``--baseline DIR``, e.g. a ``git worktree add /tmp/baseline <commit>``):
  d0   tracegate started from DIR (PYTHONPATH and working directory), d's flags, sink, tokens and
       policy; c, d0 and d at 1 KB / 20 KB / 1 MB, interleaved in alternating order, with the
       per-round ratios d/d0 (bench/compare.py).
Section ``profiles``: d's process with d's token (Lightstep) against one of an account with
``backend: grafana-cloud`` whose ``upstream:`` is the same sink ("d grafana"), 20 KB, interleaved.

Run through bench/run (which installs wrk, nginx and the Python extras). Everything listens
on 127.0.0.1 and is stopped at the end. Writes bench/results/<date>.md and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.payloads import otlp_payload  # noqa: E402
from proxy.dev.standins import StandInIssuer, free_port, gitlab_claims  # noqa: E402
from tests.nginx_gateway import NginxGateway  # noqa: E402

PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
KB = 1024


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def status_kib(pids: list[int], key: str) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    with_children: bool = False
    #: Servers whose CPU counts with this one's (a gateway's decision point).
    also: list[Server] = field(default_factory=list)

    def pids(self) -> list[int]:
        own = [self.process.pid, *(children(self.process.pid) if self.with_children else [])]
        return own + [pid for other in self.also for pid in other.pids()]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@dataclass
class Run:
    rps: float
    p50: float
    p99: float
    p999: float
    cpu_per_1k: float
    rss_mib: float
    requests: int
    non_2xx: int
    errors: int


def _mint(args: tuple[bytes, str, str, int, int]) -> list[str]:
    import jwt
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    pem, kid, issuer, start, count = args
    key = load_pem_private_key(pem, None)
    exp = int(time.time()) + 4 * 3600
    return [
        jwt.encode(
            gitlab_claims(issuer, job_id=str(n), jti=f"bench-{n}", exp=exp),
            key,
            algorithm="RS256",  # type: ignore[arg-type]
            headers={"kid": kid},
        )
        for n in range(start, start + count)
    ]


class Bench:
    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work = work
        self.args = args
        self.servers: list[Server] = []
        self.issuer = StandInIssuer()

    # --- servers --------------------------------------------------------------------

    def _spawn(
        self,
        name: str,
        argv: list[str],
        url: str,
        *,
        env: dict[str, str] | None = None,
        with_children: bool = False,
        cwd: Path | None = None,
    ) -> Server:
        log = (self.work / f"{name}.log").open("wb")
        process = subprocess.Popen(  # noqa: S603 - our own fixed argv
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd
        )
        server = Server(name, url, process, with_children)
        self.servers.append(server)
        return server

    def nginx(self, name: str, server_block: str, port: int | None = None) -> Server:
        port = port or free_port()
        prefix = self.work / name
        prefix.mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text(
            textwrap.dedent(f"""\
            daemon off;
            worker_processes 1;
            pid {prefix}/nginx.pid;
            error_log {prefix}/error.log warn;
            events {{ worker_connections 4096; }}
            http {{
              access_log off;
              client_body_temp_path {prefix}/body;
              proxy_temp_path {prefix}/proxy;
              keepalive_requests 1000000;
              client_max_body_size 64m;
              {server_block.replace("PORT", str(port))}
            }}
            """)
        )
        return self._spawn(
            name, ["nginx", "-p", str(prefix), "-c", str(conf)], f"http://127.0.0.1:{port}", with_children=True
        )

    def gateway(self, name: str, sink: Server, *, cache: bool) -> Server:
        """nginx from deploy/nginx (auth_request) in front of the sink, asking its own tracegate."""
        authz = free_port()
        decider = self.tracegate(
            f"{name}-tracegate", sink.url, "--authz-listen", f"127.0.0.1:{authz}", "--authz-dialect", "nginx"
        )
        address = sink.url.removeprefix("http://")
        gw = NginxGateway("nginx", self.work / name, f"127.0.0.1:{authz}", address, address, cache=cache)
        gw.http_port, gw.grpc_port = free_port(), free_port()
        gw.prefix.mkdir()
        conf = gw.prefix / "nginx.conf"
        conf.write_text(gw.config())
        server = self._spawn(name, ["nginx", "-p", str(gw.prefix), "-c", str(conf)], gw.url, with_children=True)
        server.also.append(decider)
        return server

    def tracegate(
        self,
        name: str,
        upstream: str,
        *extra: str,
        env_extra: dict[str, str] | None = None,
        policies: Path | None = None,
        source: Path | None = None,
    ) -> Server:
        """``source``: another tracegate source tree to run (PYTHONPATH and working directory
        set to it, so neither this checkout nor its editable install is imported)."""
        from bench.compare import GRAFANA_ENV, source_env

        port, admin = free_port(), free_port()
        env = {
            "LS_TOKEN_BENCH": "bench-lightstep-key-0123456789",
            **GRAFANA_ENV,
            "TRACEGATE_UPSTREAM_PATH_TRACES": "/v1/traces",
            "TRACEGATE_DATA_DIR": str(self.work / name),
            "TRACEGATE_TOKEN_CACHE_SIZE": "200000",
            **(source_env(source) if source else {}),
            **(env_extra or {}),
        }
        argv = [
            PY,
            "-m",
            "proxy",
            "serve",
            "--policies",
            str(policies or self.work / "policies"),
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin}",
            "--upstream",
            upstream,
            "--grpc-listen",
            "off",
            *extra,
        ]
        server = self._spawn(name, argv, f"http://127.0.0.1:{port}", env=env, cwd=source)
        server.admin = f"http://127.0.0.1:{admin}"  # type: ignore[attr-defined]
        return server

    async def wait_ready(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as client:
            for server in self.servers:
                probe = getattr(server, "admin", None)
                for _ in range(400):
                    try:
                        if probe:
                            async with client.get(probe + "/readyz") as resp:
                                if resp.status == 200 and not (await resp.json())["issuers_without_keys"]:
                                    break
                        elif server.url.startswith("http"):
                            async with client.get(server.url + "/") as resp:
                                break
                        else:  # a gRPC server (HOST:PORT): checked by a real call before its runs
                            break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.05)
                else:
                    log = (self.work / f"{server.name}.log").read_text()[-2000:]
                    raise RuntimeError(f"{server.name} did not start:\n{log}")

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()

    # --- load -----------------------------------------------------------------------

    async def wrk(
        self,
        server: Server,
        body: Path,
        tokens: Path | None,
        *,
        encoding: str = "",
        connections: int | None = None,
        duration: float | None = None,
        expect_2xx: bool = True,
    ) -> Run:
        connections = connections or self.args.connections
        duration = duration or self.args.duration
        env = {**os.environ, "BENCH_BODY": str(body), "BENCH_TOKENS": str(tokens or ""), "BENCH_ENCODING": encoding}
        pids = server.pids()
        cpu0 = cpu_seconds(pids)
        proc = await asyncio.create_subprocess_exec(
            "wrk",
            "-t",
            str(min(2, connections)),
            "-c",
            str(connections),
            "-d",
            f"{max(1, round(duration))}s",
            "--timeout",
            "10s",
            "-s",
            str(ROOT / "bench" / "post.lua"),
            server.url + "/v1/traces",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        cpu = cpu_seconds(pids) - cpu0
        line = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
        if not line:
            raise RuntimeError(f"wrk failed against {server.name}: {out.decode()[-500:]} {err.decode()[-500:]}")
        r = json.loads(line[-1])
        n = max(r["requests"], 1)
        if expect_2xx and r["status"]:
            raise RuntimeError(f"{server.name}: {r['status']} non-2xx answers where all should be 2xx; see its log")
        return Run(
            rps=r["requests"] / (r["duration_us"] / 1e6),
            p50=r["p50_us"] / 1000,
            p99=r["p99_us"] / 1000,
            p999=r["p999_us"] / 1000,
            cpu_per_1k=cpu / n * 1000,
            rss_mib=status_kib(pids, "VmHWM") / 1024,
            requests=r["requests"],
            non_2xx=r["status"],
            errors=r["connect"] + r["read"] + r["write"] + r["timeout"],
        )

    async def interleaved(
        self,
        cases: dict[str, Callable[[], Any]],
        rounds: int,
        *,
        alternate: bool = False,
        raw: dict[str, list[Run]] | None = None,
    ) -> dict[str, Run]:
        """Run each case once per round, in turn; return each case's median run. ``alternate``:
        every other round in reverse order, so that no case always runs after the same one;
        ``raw`` receives every round's runs (for per-round paired ratios)."""
        runs: dict[str, list[Run]] = {name: [] for name in cases}
        for r in range(rounds):
            order = list(cases.items())
            for name, case in reversed(order) if alternate and r % 2 else order:
                runs[name].append(await case())
                last = runs[name][-1]
                print(
                    f"  round {r + 1}/{rounds} {name:28s} {last.rps:9.0f} req/s {last.cpu_per_1k:7.3f} CPU s/1k",
                    flush=True,
                )
        if raw is not None:
            raw.update(runs)
        return {name: median_run(rs) for name, rs in runs.items()}


def median_run(runs: list[Run]) -> Run:
    def med(attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in runs)

    return Run(
        med("rps"),
        med("p50"),
        med("p99"),
        med("p999"),
        med("cpu_per_1k"),
        max(r.rss_mib for r in runs),
        sum(r.requests for r in runs),
        sum(r.non_2xx for r in runs),
        sum(r.errors for r in runs),
    )


POLICY = """\
issuers:
  gitlab:
    issuer: {issuer}
    audiences: [tracegate]
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


async def main(args: argparse.Namespace) -> int:
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="tracegate-bench-") as tmp:
        work = Path(tmp)
        bench = Bench(work, args)
        await bench.issuer.start()
        try:
            return await run_all(bench, work, args, started)
        finally:
            bench.stop_all()
            await bench.issuer.stop()


def rotation_count(max_tokens: int) -> int:
    """How many distinct tokens contender e rotates through: 10,000, or all there are."""
    return min(10_000, max_tokens)


def rotation_label(max_tokens: int) -> str:
    """Contender e's row label, naming the count it really ran with."""
    count = rotation_count(max_tokens)
    return f"e tracegate {count:,} token{'' if count == 1 else 's'}"


def token_counts(max_tokens: int) -> list[int]:
    """The rows of the distinct-token growth table: only counts that were minted, each
    once (a count above ``max_tokens`` would rotate fewer tokens than its label says)."""
    return sorted({c for c in (1, 100, 1000, 10_000) if c <= max_tokens} | {max_tokens})


def write(work: Path, name: str, data: bytes) -> Path:
    path = work / name
    path.write_bytes(data)
    return path


async def run_all(bench: Bench, work: Path, args: argparse.Namespace, started: float) -> int:
    from bench import compare

    issuer = bench.issuer
    (work / "policies").mkdir()
    (work / "policies" / "bench.yaml").write_text(POLICY.format(issuer=issuer.url))
    sink_port = free_port()  # the Grafana account's upstream: names the sink
    policies_baseline = compare.write_policies(work, POLICY.format(issuer=issuer.url), f"http://127.0.0.1:{sink_port}")
    if args.baseline:
        print(f"baseline: d0 runs proxy from {compare.check_source_tree(PY, args.baseline)}", flush=True)

    print("payloads: generating OTLP trace exports with the OpenTelemetry SDK encoder", flush=True)
    sizes = {"1KB": 1 * KB, "20KB": 20 * KB, "256KB": 256 * KB, "1MB": 1024 * KB, "4MB": 4096 * KB}
    bodies: dict[str, Path] = {}
    for label, size in sizes.items():
        raw = otlp_payload(size)
        bodies[label] = write(work, f"{label}.pb", raw)
        bodies[label + "+gzip"] = write(work, f"{label}.pb.gz", gzip.compress(raw))
    actual = {label: bodies[label].stat().st_size for label in bodies}

    print(f"tokens: minting {args.max_tokens:,} RS256 GitLab-shaped ID tokens", flush=True)
    from cryptography.hazmat.primitives import serialization

    pem = issuer.rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chunk = 2000
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        batches = pool.map(
            _mint,
            [
                (pem, issuer.rsa_kid, issuer.url, s, min(chunk, args.max_tokens - s))
                for s in range(0, args.max_tokens, chunk)
            ],
        )
        tokens = [t for batch in batches for t in batch]

    def token_file(name: str, items: list[str]) -> Path:
        return write(work, name, ("\n".join(items) + "\n").encode())

    one = token_file("one.tokens", tokens[:1])
    rotating = rotation_count(args.max_tokens)
    ten_k = token_file(f"{rotating}.tokens", tokens[:rotating])
    head, payload, sig = issuer.mint().split(".")
    bad = token_file("bad.tokens", [f"{head}.{payload}.{sig[:-6]}AAAAAA"])
    denied = token_file("denied.tokens", [issuer.mint(project_path="marketing/site", exp=int(time.time()) + 4 * 3600)])
    stamped = token_file(
        "stamped.tokens", [issuer.mint(project_path="stamped/api", project_id="5151", exp=int(time.time()) + 4 * 3600)]
    )
    grafana_token = issuer.mint(
        project_path="grafana/api", project_id=compare.GRAFANA_PROJECT_ID, exp=int(time.time()) + 4 * 3600
    )
    grafana = token_file("grafana.tokens", [grafana_token])

    sink = bench.nginx(
        "sink",
        f"""
      server {{ listen 127.0.0.1:PORT; keepalive_timeout 300s;{compare.sink_locations()}
        location / {{ default_type application/x-protobuf; return 200 ""; }} }}""",
        sink_port,
    )
    nginx_proxy = bench.nginx(
        "nginx-proxy",
        f"""
      upstream sink {{ server {sink.url.removeprefix("http://")}; keepalive 256; }}
      server {{ listen 127.0.0.1:PORT; keepalive_timeout 300s;
        location / {{ proxy_pass http://sink; proxy_http_version 1.1; proxy_set_header Connection "";
                      proxy_request_buffering off;
                      proxy_set_header lightstep-access-token "static-bench-key"; }} }}""",
    )
    fport = free_port()
    forwarder = bench._spawn(
        "forwarder", [PY, str(ROOT / "bench" / "forwarder.py"), str(fport), sink.url], f"http://127.0.0.1:{fport}"
    )
    extra = ["--workers", "1"]
    tg = {name: bench.tracegate(f"tracegate-{name}", sink.url, *extra) for name in "defg"}
    gateway_nocache = bench.gateway("gateway-nocache", sink, cache=False)
    gateway_cached = bench.gateway("gateway-cached", sink, cache=True)
    d0: Server | None = None
    d_same: Server | None = None
    if args.baseline:  # d0 and a d of this tree both reading the one policy d0 can load
        d0 = bench.tracegate("tracegate-d0", sink.url, *extra, policies=policies_baseline, source=args.baseline)
        d_same = bench.tracegate("tracegate-d-baseline-policy", sink.url, *extra, policies=policies_baseline)
    await bench.wait_ready()

    contenders: dict[str, tuple[Server, Path | None]] = {
        "a sink direct": (sink, None),
        "b nginx proxy_pass": (nginx_proxy, None),
        "c aiohttp forwarder": (forwarder, None),
        "d tracegate": (tg["d"], one),
        rotation_label(args.max_tokens): (tg["e"], ten_k),
        "f tracegate bad signature": (tg["f"], bad),
        "g tracegate denied": (tg["g"], denied),
        "h nginx auth_request": (gateway_nocache, one),
        "i nginx auth_request cached": (gateway_cached, one),
    }
    # Warm-up: every contender once, and e's rotating tokens through its cache once.
    refusing = {tg["f"].name, tg["g"].name}
    for server, toks in contenders.values():
        await bench.wrk(server, bodies["1KB"], toks, duration=1, expect_2xx=server.name not in refusing)
    for same_load in (d0, d_same):
        if same_load is not None:
            await bench.wrk(same_load, bodies["1KB"], one, duration=1)

    def case(server: Server, toks: Path | None, body: str, **kw: Any) -> Callable[[], Any]:
        encoding = "gzip" if body.endswith("+gzip") else ""
        expect = server.name not in refusing
        return lambda: bench.wrk(server, bodies[body], toks, encoding=encoding, expect_2xx=expect, **kw)

    results: dict[str, Any] = {"payload_bytes": actual, "rounds": {}}
    only = set(args.only.split(",")) if args.only else None

    def wanted(section: str) -> bool:
        return only is None or section in only

    if wanted("main"):
        print("main: 20KB protobuf, all contenders", flush=True)
        results["main"] = await bench.interleaved(
            {n: case(s, t, "20KB") for n, (s, t) in contenders.items() if n[0] not in "hi"}, args.rounds
        )

    if wanted("gateway"):
        print("gateway: 20KB protobuf, b vs nginx + auth_request → tracegate (h uncached, i cached)", flush=True)
        results["gateway"] = await bench.interleaved(
            {
                n: case(*contenders[n], "20KB")
                for n in ("b nginx proxy_pass", "h nginx auth_request", "i nginx auth_request cached")
            },
            args.rounds,
        )

    if wanted("matrix"):
        print("payload matrix: b, c, d × 1KB/20KB/1MB × plain/gzip", flush=True)
        matrix = {}
        for body in ("1KB", "1KB+gzip", "20KB", "20KB+gzip", "1MB", "1MB+gzip"):
            for key in ("b nginx proxy_pass", "c aiohttp forwarder", "d tracegate"):
                server, toks = contenders[key]
                matrix[f"{key[0]} {body}"] = case(server, toks, body)
        results["matrix"] = await bench.interleaved(matrix, args.rounds)

    if wanted("stamp"):
        print("stamp: unstamped vs stamped account, same process, 1KB/20KB/1MB protobuf", flush=True)
        stamp_cases = {}
        for body in ("1KB", "20KB", "1MB"):
            stamp_cases[f"d {body}"] = case(tg["d"], one, body)
            stamp_cases[f"stamped {body}"] = case(tg["d"], stamped, body)
        stamp_cases["d 20KB+gzip"] = case(tg["d"], one, "20KB+gzip")
        stamp_cases["stamped 20KB+gzip"] = case(tg["d"], stamped, "20KB+gzip")
        results["stamp"] = await bench.interleaved(stamp_cases, args.rounds)

    if d0 is not None and d_same is not None and wanted("baseline"):
        print(f"baseline: c, d0 ({args.baseline}) and d × 1KB/20KB/1MB protobuf", flush=True)
        results["baseline"] = await bench.interleaved(
            compare.baseline_cases(case, contenders["c aiohttp forwarder"], (d0, one), (d_same, one)),
            args.rounds,
            alternate=True,
            raw=results["rounds"].setdefault("baseline", {}),
        )

    if wanted("profiles"):
        print("profiles: d's process, Lightstep token vs grafana-cloud token, 20KB protobuf", flush=True)
        await compare.preflight(tg["d"].url, bodies["20KB"].read_bytes(), tokens[0], grafana_token)
        results["profiles"] = await bench.interleaved(
            compare.profile_cases(case, contenders["d tracegate"], grafana),
            args.rounds,
            alternate=True,
            raw=results["rounds"].setdefault("profiles", {}),
        )

    if wanted("size"):
        print("growth: payload size 1KB → 4MB (c, d)", flush=True)
        growth_size = {}
        for body in sizes:
            for key in ("c aiohttp forwarder", "d tracegate"):
                server, toks = contenders[key]
                growth_size[f"{key[0]} {body}"] = case(server, toks, body, connections=8)
        results["growth_size"] = await bench.interleaved(growth_size, args.rounds)

    if wanted("connections"):
        print("growth: connections 1 → 256 (c, d)", flush=True)
        growth_conn = {}
        for conns in (1, 4, 16, 64, 256):
            for key in ("c aiohttp forwarder", "d tracegate"):
                server, toks = contenders[key]
                growth_conn[f"{key[0]} {conns}"] = case(server, toks, "20KB", connections=conns)
        results["growth_conn"] = await bench.interleaved(growth_conn, args.rounds)

    if wanted("tokens"):
        print(f"growth: distinct tokens 1 → {args.max_tokens:,} (d)", flush=True)
        growth_tokens = {}
        for count in token_counts(args.max_tokens):
            path = token_file(f"{count}.tokens", tokens[:count])
            growth_tokens[f"d {count}"] = case(tg["d"], path, "20KB")
        # Every token verified once first (a verification is an RSA check; the rows measure
        # the cache), then one gc.freeze() period, so the cached identities are frozen.
        # The same process without the freeze (TRACEGATE_GC_FREEZE_INTERVAL=0) runs alongside.
        thawed = bench.tracegate(
            "tracegate-nofreeze", sink.url, *extra, env_extra={"TRACEGATE_GC_FREEZE_INTERVAL": "0"}
        )
        await bench.wait_ready()
        everyone = token_file("all.tokens", tokens)
        for server in (tg["d"], thawed):
            await bench.wrk(server, bodies["1KB"], everyone, duration=max(3, args.max_tokens / 2000))
        await asyncio.sleep(11)
        growth_tokens[f"no-freeze {args.max_tokens}"] = case(thawed, everyone, "20KB")
        growth_tokens["no-freeze 1"] = case(thawed, one, "20KB")
        results["growth_tokens"] = await bench.interleaved(growth_tokens, args.rounds)

    if wanted("grpc"):
        print("grpc: h2load, 1KB/20KB, sink / grpc.aio forwarder / nginx grpc_pass / tracegate", flush=True)
        from bench.grpc_bench import run_grpc

        results["grpc"] = await run_grpc(bench, work, args, tokens[0])

    if wanted("workers"):
        from proxy.settings.cpus import usable_cpus

        cores = usable_cpus()
        print(f"workers: d with --workers 1 vs --workers {cores} (auto), 20KB, c alongside", flush=True)
        many = bench.tracegate("tracegate-workers", sink.url, "--workers", str(cores))
        many.with_children = True  # the workers are its children
        await bench.wait_ready()
        results["workers"] = await bench.interleaved(
            {
                "c aiohttp forwarder": case(forwarder, None, "20KB"),
                "d --workers 1": case(tg["d"], one, "20KB"),
                f"d --workers {cores}": case(many, one, "20KB"),
            },
            args.rounds,
        )

    if only is not None and "profile" in only:  # only when asked: py-spy needs ptrace rights
        from bench.profile import profile

        print("profile: py-spy on c and d under wrk, 1KB/20KB/1MB", flush=True)
        profiles: dict[str, str] = {}
        for body in ("1KB", "20KB", "1MB"):
            for key in ("c aiohttp forwarder", "d tracegate"):
                server, toks = contenders[key]
                text, run = await profile(server.process.pid, args.duration, case(server, toks, body))
                profiles[f"{key[0]} {body}"] = f"{run.rps:.0f} req/s, {run.cpu_per_1k:.3f} CPU s/1k req\n{text}"
                print(f"--- {key} {body}: {profiles[f'{key[0]} {body}']}\n", flush=True)
        results["profile"] = profiles

    if wanted("memory"):
        print("memory: 100 concurrent 4MB uploads through tracegate", flush=True)
        results["memory"] = await memory_test(bench, sink, tokens[0], bodies["4MB"].read_bytes())
    bench.stop_all()
    if only is not None:
        print(
            json.dumps(
                {
                    k: v if k in ("memory", "profile") else {n: vars(r) for n, r in v.items()}
                    for k, v in results.items()
                    if k not in ("payload_bytes", "rounds")
                },
                indent=1,
            )
        )
        if "baseline" in results:
            print("\n".join(["", *compare.baseline_lines(results, str(args.baseline))]))
        if "profiles" in results:
            print("\n".join(["", *compare.profiles_lines(results)]))
        return 0

    from bench.report import write_report

    out = write_report(results, args, started, ROOT / "bench" / "results")
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


async def memory_test(bench: Bench, sink: Server, token: str, body: bytes) -> dict[str, float]:
    import aiohttp

    server = bench.tracegate("tracegate-memory", sink.url)
    await bench.wait_ready()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-protobuf"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        for _ in range(10):  # warm-up: imports, pools, caches
            async with client.post(server.url + "/v1/traces", data=b"x" * 1000, headers=headers) as resp:
                await resp.read()
        before = status_kib(server.pids(), "VmRSS")

        async def upload() -> int:
            async with client.post(server.url + "/v1/traces", data=io.BytesIO(body), headers=headers) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(upload() for _ in range(100)))
    peak = status_kib(server.pids(), "VmHWM")
    return {
        "before_mib": before / 1024,
        "peak_mib": peak / 1024,
        "growth_mib": (peak - before) / 1024,
        "ok": sum(1 for s in statuses if s == 200),
        "uploads": len(statuses),
        "body_mib": len(body) / 2**20,
    }


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians quoted (default 3)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections for the main table (default 32)")
    parser.add_argument(
        "--max-tokens", type=_at_least_one, default=100_000, help="largest distinct-token count (default 100000)"
    )
    parser.add_argument(
        "--only",
        help="comma list of main,gateway,matrix,stamp,baseline,profiles,size,connections,tokens,grpc,memory,workers,"
        "profile: run those and print figures without writing a report (for profiling work; profile runs py-spy on "
        "c and d; baseline needs --baseline)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another tracegate source tree (git worktree add /tmp/baseline <commit>): contender d0, run from it "
        "with d's flags, sink and tokens, against c and d at 1KB/20KB/1MB (section baseline)",
    )
    args = parser.parse_args()
    if args.only and "baseline" in args.only.split(",") and not args.baseline:
        parser.error("--only baseline needs --baseline DIR (a tracegate source tree)")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
