"""OTLP/gRPC contenders, driven by h2load (nghttp2-client) with a prebuilt gRPC frame:

  h  straight to the gRPC sink (bench/grpc_sink.py)
  i  bare grpc.aio pass-through forwarder, bench/grpc_forwarder.py  (same-stack ceiling)
  j  nginx grpc_pass adding a static lightstep-access-token          (transport ceiling)
  k  tracegate's gRPC door: one valid token, policy match, key injection, audit + metrics on

h2load counts HTTP/2 answers, not gRPC statuses (a gRPC error is a 200 with a non-zero
grpc-status trailer), so each contender is first called once with grpc.aio and must say OK,
and after the runs tracegate's own counters must show every gRPC call forwarded (or cancelled
by h2load itself when its time was up).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
from pathlib import Path
from typing import Any

from bench.payloads import otlp_payload
from bench.run import PY, ROOT, Bench, Run, Server, cpu_seconds, status_kib
from proxy.dev.standins import free_port

METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
KB = 1024


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message."""
    return b"\0" + struct.pack(">I", len(message)) + message


async def preflight(name: str, target: str, token: str) -> None:
    import grpc
    from grpc import aio

    for _ in range(200):
        async with aio.insecure_channel(target) as channel:
            try:
                await channel.unary_unary(METHOD)(b"", metadata=(("authorization", f"Bearer {token}"),), timeout=2)
                return
            except aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                    raise RuntimeError(f"{name}: {exc.code().name} {exc.details()}") from None
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{name} never answered OK")


async def h2load(server: Server, target: str, body: Path, token: str, args: Any, log: Path) -> Run:
    pids = server.pids()
    cpu0 = cpu_seconds(pids)
    clients = max(1, args.connections // 4)
    proc = await asyncio.create_subprocess_exec(
        "h2load",
        "-D",
        str(max(1, round(args.duration))),
        "-c",
        str(clients),
        "-m",
        "4",
        "-t",
        "1",
        "-d",
        str(body),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-H",
        f"authorization: Bearer {token}",
        "--log-file",
        str(log),
        f"http://{target}{METHOD}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    cpu = cpu_seconds(pids) - cpu0
    text = out.decode()
    counts = next((ln for ln in text.splitlines() if ln.startswith("requests:")), None)
    finished = next((ln for ln in text.splitlines() if ln.startswith("finished in")), None)
    if counts is None or finished is None:
        raise RuntimeError(f"h2load failed against {server.name}: {text[-500:]} {err.decode()[-500:]}")
    fields = {part.split()[1]: int(part.split()[0]) for part in counts.removeprefix("requests:").split(",")}
    durations = sorted(int(line.split("\t")[2]) / 1000 for line in log.read_text().splitlines() if line.strip())
    log.unlink()
    if not durations:
        raise RuntimeError(f"{server.name}: no request completed")

    def pct(q: float) -> float:
        return durations[min(len(durations) - 1, int(q * len(durations)))]

    rps = float(finished.split(",")[1].split()[0])
    n = max(fields["succeeded"], 1)
    return Run(
        rps=rps,
        p50=statistics.median(durations),
        p99=pct(0.99),
        p999=pct(0.999),
        cpu_per_1k=cpu / n * 1000,
        rss_mib=status_kib(pids, "VmHWM") / 1024,
        requests=fields["succeeded"],
        non_2xx=fields["failed"],
        errors=fields["errored"] + fields["timeout"],
    )


async def run_grpc(bench: Bench, work: Path, args: Any, token: str) -> dict[str, Run]:
    sport, fport = free_port(), free_port()
    sink = bench._spawn("grpc-sink", [PY, str(ROOT / "bench" / "grpc_sink.py"), str(sport)], f"127.0.0.1:{sport}")
    forwarder = bench._spawn(
        "grpc-forwarder",
        [PY, str(ROOT / "bench" / "grpc_forwarder.py"), str(fport), sink.url],
        f"127.0.0.1:{fport}",
    )
    nginx = bench.nginx(
        "nginx-grpc",
        f"""
      upstream grpcsink {{ server {sink.url}; keepalive 64; }}
      server {{ listen 127.0.0.1:PORT http2; keepalive_timeout 300s;
        location / {{ grpc_pass grpc://grpcsink; grpc_set_header lightstep-access-token "static-bench-key"; }} }}""",
    )
    nginx.url = nginx.url.removeprefix("http://")
    gport = free_port()
    tracegate = bench.tracegate(
        "tracegate-grpc",
        "http://127.0.0.1:1",
        "--grpc-listen",
        f"127.0.0.1:{gport}",
        env_extra={"TRACEGATE_GRPC_UPSTREAM": f"http://{sink.url}"},
    )
    await bench.wait_ready()
    targets = {
        "h grpc sink direct": (sink, sink.url),
        "i grpc.aio forwarder": (forwarder, forwarder.url),
        "j nginx grpc_pass": (nginx, nginx.url),
        "k tracegate grpc": (tracegate, f"127.0.0.1:{gport}"),
    }
    for name, (_, target) in targets.items():
        await preflight(name, target, token)
    bodies = {}
    for label, size in (("1KB", KB), ("20KB", 20 * KB)):
        bodies[label] = work / f"grpc-{label}.bin"
        bodies[label].write_bytes(grpc_frame(otlp_payload(size)))
    log = work / "h2load.log"

    def case(server: Server, target: str, body: Path) -> Any:
        return lambda: h2load(server, target, body, token, args, log)

    for server, target in targets.values():  # warm-up
        await h2load(server, target, bodies["1KB"], token, argparse.Namespace(connections=8, duration=1), log)
    cases = {
        f"{name[0]} {label}": case(server, target, body)
        for label, body in bodies.items()
        for name, (server, target) in targets.items()
    }
    results = await bench.interleaved(cases, args.rounds)
    await _check_all_forwarded(tracegate)
    return results


async def _check_all_forwarded(tracegate: Server) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as client, client.get(tracegate.admin + "/metrics") as resp:  # type: ignore[attr-defined]
        text = await resp.text()
    for line in text.splitlines():
        grpc_line = line.startswith("tracegate_requests_total{") and 'transport="grpc"' in line
        # h2load resets the streams still open when its time is up: those are client-cancelled.
        expected = 'reason="forwarded"' in line or 'reason="client-cancelled"' in line
        if grpc_line and not expected and float(line.rsplit(" ", 1)[1]) > 0:
            raise RuntimeError(f"tracegate refused or failed gRPC calls during the benchmark: {line}")


def grpc_lines(grpc: dict[str, Any]) -> list[str]:
    """The report's OTLP/gRPC section: the table and the ratios against the targets."""
    lines = [
        "## OTLP/gRPC (h2load, 8 connections × 4 streams)",
        "",
        "h sink direct · i bare grpc.aio forwarder · j nginx grpc_pass · k tracegate's gRPC door. "
        "The sink is a grpc.aio process answering OK; CPU is the contender's own process.",
        "",
        "| contender | req/s | p50 ms | p99 ms | p99.9 ms | CPU s / 1k req | peak RSS MiB | failed | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in grpc.items():
        lines.append(
            f"| {name} | {r.rps:,.0f} | {r.p50:.2f} | {r.p99:.2f} | {r.p999:.2f} | {r.cpu_per_1k:.3f} | "
            f"{r.rss_mib:.0f} | {r.non_2xx:,} | {r.errors:,} |"
        )
    lines += ["", "| figure | 1KB | 20KB | target |", "|---|---:|---:|---|"]
    k = {size: grpc[f"k {size}"] for size in ("1KB", "20KB")}
    i = {size: grpc[f"i {size}"] for size in ("1KB", "20KB")}
    j = {size: grpc[f"j {size}"] for size in ("1KB", "20KB")}
    lines += [
        f"| k/i throughput | {k['1KB'].rps / i['1KB'].rps:.2f} | {k['20KB'].rps / i['20KB'].rps:.2f} | >= 0.90 |",
        f"| k p99 − i p99 (ms) | {k['1KB'].p99 - i['1KB'].p99:.2f} | {k['20KB'].p99 - i['20KB'].p99:.2f} | <= 1 |",
        f"| k/i CPU per request | {k['1KB'].cpu_per_1k / i['1KB'].cpu_per_1k:.2f} | "
        f"{k['20KB'].cpu_per_1k / i['20KB'].cpu_per_1k:.2f} | — |",
        f"| k/j throughput (nginx grpc_pass) | {k['1KB'].rps / j['1KB'].rps:.2f} | "
        f"{k['20KB'].rps / j['20KB'].rps:.2f} | as it is |",
        "",
    ]
    return lines
