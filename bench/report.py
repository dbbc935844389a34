"""The benchmark report: one Markdown file of tables and ratios, and one PNG chart."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path
from typing import Any

TARGETS = {
    "d/c throughput at 20KB": (">=", 0.90),
    "d p99 − c p99 (ms)": ("<=", 1.0),
    "e/d throughput": (">=", 0.85),
    "f/d throughput": (">=", 1.5),
    "g/d throughput": (">=", 1.5),
    "100×4MB peak RSS growth (MiB)": ("<=", 64.0),
    "i/b throughput at 20KB (gateway, cached)": (">=", 0.75),
    "h/b throughput at 20KB (gateway, uncached)": (">=", 0.45),
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _row(name: str, r: Any) -> str:
    return (
        f"| {name} | {r.rps:,.0f} | {r.p50:.2f} | {r.p99:.2f} | {r.p999:.2f} | {r.cpu_per_1k:.3f} | "
        f"{r.rss_mib:.0f} | {r.non_2xx:,} | {r.errors:,} |"
    )


def write_report(results: dict[str, Any], args: argparse.Namespace, started: float, out_dir: Path) -> Path:
    import aiohttp

    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio"
    main = results["main"]
    d, c, b = main["d tracegate"], main["c aiohttp forwarder"], main["b nginx proxy_pass"]
    e_label = next(name for name in main if name.startswith("e "))  # names its token count
    e, f, g = main[e_label], main["f tracegate bad signature"], main["g tracegate denied"]
    mem = results["memory"]
    figures = {
        "d/c throughput at 20KB": d.rps / c.rps,
        "d p99 − c p99 (ms)": d.p99 - c.p99,
        "e/d throughput": e.rps / d.rps,
        "f/d throughput": f.rps / d.rps,
        "g/d throughput": g.rps / d.rps,
        "100×4MB peak RSS growth (MiB)": mem["growth_mib"],
    }
    gateway = results.get("gateway")
    if gateway:
        gb = gateway["b nginx proxy_pass"]
        figures["i/b throughput at 20KB (gateway, cached)"] = gateway["i nginx auth_request cached"].rps / gb.rps
        figures["h/b throughput at 20KB (gateway, uncached)"] = gateway["h nginx auth_request"].rps / gb.rps
    today = datetime.date.today().isoformat()
    lines = [
        f"# tracegate benchmark, {today}",
        "",
        f"Machine: {os.cpu_count()} cores ({_cpu_model()}), Linux {platform.release()}, Python "
        f"{platform.python_version()}, aiohttp {aiohttp.__version__}, event loop {loop}, tracegate with 1 worker.",
        f"Load: wrk, {args.connections} connections (2 threads), {args.duration:g} s per run, "
        f"{args.rounds} interleaved "
        "rounds (A B C … A B C …); every figure is the median of the rounds. Load generator, contenders and sink "
        "share the machine; everything on 127.0.0.1. Sink: nginx answering 200 with an empty body, keep-alive on.",
        f"Run took {(datetime.datetime.now().timestamp() - started) / 60:.1f} min.",
        "",
        "## Contenders at 20KB protobuf",
        "",
        f"Payload: a real OTLP trace export from the OpenTelemetry SDK encoder, {results['payload_bytes']['20KB']:,} "
        "bytes. CPU is the contender's own processes (for a, the sink's).",
        "",
        "| contender | req/s | p50 ms | p99 ms | p99.9 ms | CPU s / 1k req | peak RSS MiB | non-2xx | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[_row(name, r) for name, r in main.items()],
        "",
        "f and g answer 401 and 403 by design (their non-2xx count is every request); "
        "nothing of theirs reaches the sink.",
        "",
        "## Ratios and targets",
        "",
        "| figure | value | target | holds |",
        "|---|---:|---|---|",
    ]
    for name, value in figures.items():
        op, target = TARGETS[name]
        holds = value >= target if op == ">=" else value <= target
        lines.append(f"| {name} | {value:.2f} | {op} {target:g} | {'yes' if holds else '**no**'} |")
    lines += [f"| d/b throughput (long-run figure to raise) | {d.rps / b.rps:.2f} | — | — |", ""]
    if gateway:
        lines += [
            "## Gateway mode at 20KB (b, h, i interleaved)",
            "",
            "h and i: nginx with deploy/nginx's auth_request config in front of the sink, asking tracegate's authz "
            "listener (i with the shipped decision cache). CPU counts nginx and tracegate together.",
            "",
            "| contender | req/s | p50 ms | p99 ms | p99.9 ms | CPU s / 1k req | peak RSS MiB | non-2xx | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *[_row(name, r) for name, r in gateway.items()],
            "",
        ]

    lines += [
        "## Payload matrix (req/s, 32 connections)",
        "",
        "| payload | bytes | b nginx | c forwarder | d tracegate | d/c |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    matrix = results["matrix"]
    for body in ("1KB", "1KB+gzip", "20KB", "20KB+gzip", "1MB", "1MB+gzip"):
        rb, rc, rd = matrix[f"b {body}"], matrix[f"c {body}"], matrix[f"d {body}"]
        lines.append(
            f"| {body} | {results['payload_bytes'][body]:,} | {rb.rps:,.0f} | {rc.rps:,.0f} | "
            f"{rd.rps:,.0f} | {rd.rps / rc.rps:.2f} |"
        )
    if "stamp" in results:
        lines += [
            "",
            "## Stamping verified attributes (req/s, 32 connections, same process)",
            "",
            "| payload | unstamped | stamped | stamped/unstamped | stamped p99 ms |",
            "|---|---:|---:|---:|---:|",
        ]
        st = results["stamp"]
        for body in ("1KB", "20KB", "1MB", "20KB+gzip"):
            ru, rs = st[f"d {body}"], st[f"stamped {body}"]
            lines.append(f"| {body} | {ru.rps:,.0f} | {rs.rps:,.0f} | {rs.rps / ru.rps:.2f} | {rs.p99:.2f} |")
    if "baseline" in results or "profiles" in results:
        from bench.compare import baseline_lines, profiles_lines

        if "baseline" in results:
            lines += ["", *baseline_lines(results, str(args.baseline))]
        if "profiles" in results:
            lines += ["", *profiles_lines(results)]
    lines += [
        "",
        "## Growth: payload size (8 connections)",
        "",
        "| payload | c req/s | d req/s | d/c | d p99 ms | d CPU s / 1k req | d peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    gs = results["growth_size"]
    sizes = [k.split(" ", 1)[1] for k in gs if k.startswith("d ")]
    for size in sizes:
        rc, rd = gs[f"c {size}"], gs[f"d {size}"]
        lines.append(
            f"| {size} | {rc.rps:,.0f} | {rd.rps:,.0f} | {rd.rps / rc.rps:.2f} | {rd.p99:.2f} | "
            f"{rd.cpu_per_1k:.3f} | {rd.rss_mib:.0f} |"
        )
    lines += [
        "",
        "## Growth: concurrent connections (20KB)",
        "",
        "| connections | c req/s | d req/s | d/c | c p99 ms | d p99 ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    gc = results["growth_conn"]
    conns = [k.split(" ", 1)[1] for k in gc if k.startswith("d ")]
    for n in conns:
        rc, rd = gc[f"c {n}"], gc[f"d {n}"]
        lines.append(f"| {n} | {rc.rps:,.0f} | {rd.rps:,.0f} | {rd.rps / rc.rps:.2f} | {rc.p99:.2f} | {rd.p99:.2f} |")
    lines += [
        "",
        "## Growth: distinct valid tokens in rotation (tracegate, 20KB)",
        "",
        "Each count runs against the same process; a token's first use costs one RS256 verification, later "
        "uses hit the verified-token cache until its exp.",
        "",
        "| distinct tokens | req/s | vs 1 token | p99 ms | CPU s / 1k req | peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    gt = results["growth_tokens"]
    base = gt["d 1"].rps
    for key, r in gt.items():
        lines.append(
            f"| {key.split()[1] if key.startswith('d ') else key} | {r.rps:,.0f} | {r.rps / base:.2f} | {r.p99:.2f} | "
            f"{r.cpu_per_1k:.3f} | {r.rss_mib:.0f} |"
        )
    if "workers" in results:
        lines += ["", "## Workers: 1 vs every usable CPU (20KB)", "", "| contender | req/s | p99 ms | CPU s/1k req |"]
        lines += ["|---|---:|---:|---:|"]
        lines += [f"| {n} | {r.rps:,.0f} | {r.p99:.2f} | {r.cpu_per_1k:.3f} |" for n, r in results["workers"].items()]
    if "grpc" in results:
        from bench.grpc_bench import grpc_lines

        lines += ["", *grpc_lines(results["grpc"])]
    lines += [
        "",
        "## Memory: 100 concurrent 4MB uploads through tracegate",
        "",
        f"{mem['ok']}/{mem['uploads']} answered 200; {mem['body_mib']:.1f} MiB each "
        f"({mem['body_mib'] * mem['uploads']:.0f} MiB in flight in all). RSS before: {mem['before_mib']:.1f} MiB; "
        f"peak: {mem['peak_mib']:.1f} MiB; growth: **{mem['growth_mib']:.1f} MiB** (target <= 64 MiB). "
        "Bodies are streamed, never held whole.",
        "",
        f"![chart]({today}.png)",
        "",
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{today}.md"
    path.write_text("\n".join(lines))
    _chart(results, path.with_suffix(".png"))
    return path


def _chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    main = results["main"]
    ax = axes[0][0]
    names = list(main)
    ax.barh([n for n in names][::-1], [main[n].rps for n in names][::-1], color="#4C72B0")
    ax.set_xlabel("requests/s (median)")
    ax.set_title("Contenders, 20KB OTLP protobuf")
    for y, n in enumerate(names[::-1]):
        ax.text(main[n].rps, y, f" {main[n].rps:,.0f}", va="center", fontsize=8)

    def curve(ax: Any, data: dict[str, Any], title: str, xlabel: str, logx: bool = True) -> None:
        for prefix, label in (("c", "c aiohttp forwarder"), ("d", "d tracegate")):
            keys = [k for k in data if k.startswith(prefix + " ")]
            if not keys:
                continue
            xs = [k.split(" ", 1)[1] for k in keys]
            ax.plot(range(len(xs)), [data[k].rps for k in keys], marker="o", label=label)
            ax.set_xticks(range(len(xs)), xs)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("requests/s")
        ax.set_ylim(bottom=0)
        ax.legend()
        ax.grid(alpha=0.3)

    curve(axes[0][1], results["growth_size"], "Payload size (8 connections)", "payload")
    curve(axes[1][0], results["growth_conn"], "Concurrent connections (20KB)", "connections")
    curve(axes[1][1], results["growth_tokens"], "Distinct valid tokens in rotation (20KB)", "distinct tokens")
    fig.suptitle("tracegate benchmark (medians of interleaved rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
