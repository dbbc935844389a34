"""Soak: a bounded mixed load against tracegate for a set time, then the figures.

Valid requests (each body unique), forged tokens and policy-denied tokens, mixed, from a
fixed number of concurrent clients against a real tracegate process and a recording sink,
all on 127.0.0.1. Reports requests, answers by kind, acknowledged-but-not-delivered (must
be 0), and tracegate's RSS and open file descriptors at each sample (must stay flat after
warm-up). Run it through bench/soak; it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.dev.standins import StandInIssuer, free_port  # noqa: E402

POLICY = """\
issuers:
  gitlab: {{issuer: {issuer}, audiences: [tracegate]}}
service_accounts:
  soak-ci: {{access_token: {{env: LS_TOKEN_SOAK}}}}
rules:
  - {{name: pay, issuer: gitlab, when: {{project_path: "payments/*"}}, service_account: soak-ci}}
"""


class IdSink:
    """An OTLP sink keeping only each body's 16-byte id: a long soak's bodies and headers
    would otherwise fill memory."""

    def __init__(self) -> None:
        self.ids: set[bytes] = set()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _keep_id(self, request: web.Request) -> web.Response:
        self.ids.add((await request.read())[:16])
        return web.Response(status=200, body=b"", content_type="application/x-protobuf")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._keep_id)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def sample(pid: int) -> tuple[float, int]:
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def soak(args: argparse.Namespace) -> int:
    issuer, sink = StandInIssuer(), IdSink()
    await issuer.start()
    await sink.start()
    work = Path(tempfile.mkdtemp(prefix="tracegate-soak-"))
    (work / "policies").mkdir()
    (work / "policies" / "soak.yaml").write_text(POLICY.format(issuer=issuer.url))
    port, admin = free_port(), free_port()
    env = {
        **os.environ,
        "LS_TOKEN_SOAK": "soak-key-0123456789",
        "TRACEGATE_UPSTREAM_PATH_TRACES": "/v1/traces",
        "TRACEGATE_DATA_DIR": str(work / "data"),
    }
    log = (work / "tracegate.log").open("wb")
    process = subprocess.Popen(  # noqa: S603 - our own fixed argv
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--policies",
            str(work / "policies"),
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin}",
            "--upstream",
            sink.url,
            "--grpc-listen",
            "off",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
        env=env,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}/v1/traces"
    valid = [issuer.mint(job_id=str(i), exp=int(time.time()) + args.duration + 600) for i in range(50)]
    denied = issuer.mint(project_path="marketing/site", exp=int(time.time()) + args.duration + 600)
    head, payload, sig = valid[0].split(".")
    forged = f"{head}.{payload}.{sig[:-8]}AAAAAAAA"
    answers: collections.Counter[str] = collections.Counter()
    acknowledged: set[bytes] = set()
    samples: list[tuple[float, float, int]] = []
    rng = random.Random(7)  # noqa: S311 - a reproducible mix, not crypto
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
            for _ in range(200):
                try:
                    async with client.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                        if resp.status == 200 and not (await resp.json())["issuers_without_keys"]:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            started = time.monotonic()
            deadline = started + args.duration

            async def worker() -> None:
                while time.monotonic() < deadline:
                    roll = rng.random()
                    kind, token = (
                        ("valid", rng.choice(valid))
                        if roll < 0.7
                        else ("forged", forged)
                        if roll < 0.85
                        else ("denied", denied)
                    )
                    body = uuid.uuid4().bytes + b"\x00" * rng.randint(0, 20000)
                    try:
                        async with client.post(
                            url,
                            data=body,
                            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-protobuf"},
                        ) as r:
                            await r.read()
                            answers[f"{kind} {r.status}"] += 1
                            if kind == "valid" and 200 <= r.status < 300:
                                acknowledged.add(body[:16])
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        answers[f"{kind} {type(exc).__name__}"] += 1

            async def sampler() -> None:
                while time.monotonic() < deadline:
                    rss, fds = sample(process.pid)
                    samples.append((time.monotonic() - started, rss, fds))
                    await asyncio.sleep(min(args.interval, max(deadline - time.monotonic(), 0.01)))
                rss, fds = sample(process.pid)
                samples.append((time.monotonic() - started, rss, fds))

            await asyncio.gather(sampler(), *(worker() for _ in range(args.concurrency)))
    finally:
        process.terminate()
        process.wait(30)
        await sink.stop()
        await issuer.stop()
    delivered = sink.ids
    lost = len(acknowledged - delivered)
    total = sum(answers.values())
    lines = [
        f"# tracegate soak, {datetime.date.today().isoformat()}",
        "",
        f"{args.duration} s, {args.concurrency} concurrent clients; mix: 70% valid (unique bodies up to 20 KB), "
        "15% forged signature, 15% denied by policy. tracegate exit code after SIGTERM: "
        f"{process.returncode}.",
        "",
        f"- requests: {total:,} ({total / args.duration:,.0f}/s)",
        f"- acknowledged 2xx (valid): {len(acknowledged):,}; delivered to the sink: {len(delivered):,}",
        f"- **acknowledged but not delivered: {lost}**",
        "",
        "| answer | count |",
        "|---|---:|",
        *[f"| {kind} | {count:,} |" for kind, count in sorted(answers.items())],
        "",
        "| t (s) | RSS MiB | open fds |",
        "|---:|---:|---:|",
        *[f"| {t:.0f} | {rss:.1f} | {fds} |" for t, rss, fds in samples],
        "",
    ]
    report = "\n".join(lines)
    print(report)
    out = ROOT / "bench" / "results" / f"soak-{datetime.date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"wrote {out}")
    unexpected = [k for k in answers if not k.endswith((" 200", " 401", " 403"))]
    return 1 if lost or unexpected or process.returncode != 0 else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=600, help="seconds of load (default 600)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between RSS/fd samples (default 60)")
    return asyncio.run(soak(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
