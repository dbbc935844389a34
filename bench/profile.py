"""Where a server's CPU goes per request: py-spy samples it under wrk load and the samples
are summed by what was running (the innermost frame's file), in µs of CPU per request.

Used by bench/run.py's ``profile`` section (``--only profile``). py-spy (``pip install
py-spy``) needs ptrace rights on the server's process (root, or CAP_SYS_PTRACE).
Idle samples (a thread waiting in epoll) are left out by py-spy, so the totals are CPU time.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

RATE = 250  # samples per second

#: (bucket, substring of the innermost frame's "function (file:line)"), first match wins.
BUCKETS = (
    ("upstream pool (ours)", "proxy/upstream/pool.py"),
    ("upstream pool (ours)", "proxy/upstream/conn.py"),
    ("our code", "/proxy/"),
    ("our code", "(proxy/"),  # py-spy writes paths under the working directory relative
    ("aiohttp client", "aiohttp/client"),
    ("aiohttp client", "aiohttp/connector"),
    ("aiohttp server", "aiohttp/"),
    ("multidict/yarl", "multidict"),
    ("multidict/yarl", "yarl"),
    ("prometheus_client", "prometheus_client"),
    ("event loop", "asyncio/"),
    ("event loop", "uvloop"),
    ("logging/json", "logging/"),
    ("logging/json", "json/"),
)


def bucket(frame: str) -> str:
    for name, needle in BUCKETS:
        if needle in frame:
            return name
    return "other (stdlib, C, GC)"


def summarise(raw: str, requests: int, rate: int = RATE) -> str:
    """A text table from py-spy's ``--format raw`` output (``frame;frame;… count`` lines,
    outermost first): µs of CPU per request by bucket, then the 30 hottest functions."""
    by_bucket: collections.Counter[str] = collections.Counter()
    by_leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        leaf = stack.rsplit(";", 1)[-1]
        by_bucket[bucket(leaf)] += count
        by_leaf[leaf] += count
        total += count
    per = 1e6 / rate / max(requests, 1)
    lines = [f"{total} samples at {rate}/s over {requests:,} requests: {total * per:.0f} µs CPU per request", ""]
    lines.append(f"{'where (innermost frame)':34s} {'µs/req':>7s} {'share':>6s}")
    for name, count in by_bucket.most_common():
        lines.append(f"{name:34s} {count * per:7.1f} {count / max(total, 1):6.1%}")
    modules: collections.Counter[str] = collections.Counter()
    for leaf, count in by_leaf.items():
        file = leaf.rpartition("(")[2].partition(":")[0]
        if bucket(leaf) in ("our code", "upstream pool (ours)"):
            modules["proxy/" + file.rpartition("proxy/")[2]] += count
    lines += ["", "our modules (self time):"]
    for module, count in modules.most_common(12):
        lines.append(f"  {count * per:6.1f} µs  {module}")
    lines += ["", "hottest functions (self time):"]
    for leaf, count in by_leaf.most_common(30):
        lines.append(f"  {count * per:6.1f} µs  {leaf[:110]}")
    return "\n".join(lines)


async def profile(pid: int, seconds: int, load: Callable[[], Awaitable[Any]]) -> tuple[str, Any]:
    """Sample ``pid`` with py-spy while ``load()`` runs (it returns bench's Run, whose
    ``requests`` divide the samples). Returns the summary and the Run."""
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if spy is None:
        return "py-spy not installed (pip install py-spy)", await load()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "raw.txt"
        proc = await asyncio.create_subprocess_exec(
            spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(RATE),
            "--duration",
            str(seconds + 1),  # past the end of the load: every request is sampled
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(out),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await asyncio.sleep(0.5)  # py-spy attached before the load starts
        run = await load()
        _, err = await proc.communicate()
        if not out.exists():
            return f"py-spy failed: {err.decode()[-300:]}", run
        return summarise(out.read_text(), run.requests), run
