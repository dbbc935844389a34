"""tracegate as a real process: SIGHUP reloads (a broken policy leaves the old one
serving), SIGTERM drains in-flight requests and exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from proxy.dev.standins import Sink, StandInIssuer, free_port
from tests.conftest import PAYMENTS_KEY, UNHANDLED_MARKERS, assert_no_secrets, policy_yaml


@dataclass
class Proc:
    process: asyncio.subprocess.Process
    url: str
    admin: str
    policy: Path
    secret_file: Path

    async def metric(self, client: aiohttp.ClientSession, needle: str) -> bool:
        async with client.get(self.admin + "/metrics") as resp:
            return needle in await resp.text()


async def spawn(
    policies: Path, env: dict[str, str], upstream: str, *extra: str
) -> tuple[asyncio.subprocess.Process, str, str]:
    """Start ``python -m proxy serve`` and wait until it is ready with the issuer's keys.
    Its stdout and stderr go to ``stdout.log`` / ``stderr.log`` beside ``policies``."""
    port, admin = free_port(), free_port()
    out = (policies.parent / "stdout.log").open("ab")
    err = (policies.parent / "stderr.log").open("ab")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--policies",
        str(policies),
        "--listen",
        f"127.0.0.1:{port}",
        "--admin-listen",
        f"127.0.0.1:{admin}",
        "--upstream",
        upstream,
        "--grpc-listen",
        "off",
        *extra,
        env={**os.environ, **env},
        stdout=out,
        stderr=err,
    )
    out.close()
    err.close()
    admin_url = f"http://127.0.0.1:{admin}"
    async with aiohttp.ClientSession() as client:
        for _ in range(200):
            try:
                async with client.get(admin_url + "/readyz") as resp:
                    if resp.status == 200 and not (await resp.json())["issuers_without_keys"]:
                        return process, f"http://127.0.0.1:{port}", admin_url
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    process.kill()
    raise RuntimeError("tracegate did not become ready")


@pytest.fixture
async def proc(tmp_path: Path, issuer: StandInIssuer, sink: Sink) -> AsyncIterator[Proc]:
    policies = tmp_path / "policies"
    policies.mkdir()
    secret_file = tmp_path / "docs-key"
    secret_file.write_text("docs-key-from-file\n")
    policy = policies / "main.yaml"
    policy.write_text(policy_yaml(issuer.url).replace("{env: LS_TOKEN_DOCS}", f"{{file: {secret_file}}}"))
    env = {
        "LS_TOKEN_PAYMENTS": PAYMENTS_KEY,
        "TRACEGATE_UPSTREAM_PATH_TRACES": "/v1/traces",
        "TRACEGATE_DRAIN_SECONDS": "10",
        "TRACEGATE_DATA_DIR": str(tmp_path / "data"),
        "TRACEGATE_WATCH_INTERVAL_SECONDS": "0",  # SIGHUP alone reloads here; tests/test_watch.py watches
    }
    process, url, admin = await spawn(policies, env, sink.url)
    yield Proc(process, url, admin, policy, secret_file)
    if process.returncode is None:
        process.kill()
        await process.wait()
    stderr = (tmp_path / "stderr.log").read_text()
    assert not [m for m in UNHANDLED_MARKERS if m in stderr], stderr  # the whole suite's rule, for processes too


async def send(client: aiohttp.ClientSession, proc: Proc, token: str) -> int:
    async with client.post(proc.url + "/v1/traces", data=b"x", headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status


async def reload_and_wait(client: aiohttp.ClientSession, proc: Proc, needle: str) -> None:
    proc.process.send_signal(signal.SIGHUP)
    for _ in range(100):
        if await proc.metric(client, needle):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {needle!r} after SIGHUP")


async def test_sighup_broken_policies_keep_the_old_one_then_a_good_one_applies(
    proc: Proc, issuer: StandInIssuer, sink: Sink
) -> None:
    original = proc.policy.read_text()
    token = issuer.mint()
    async with aiohttp.ClientSession() as client:
        assert await send(client, proc, token) == 200
        breakages = [
            lambda: proc.policy.write_text(original + "\nrules: [\n"),  # broken YAML
            lambda: proc.secret_file.unlink(),  # secret file removed
            lambda: proc.policy.write_text(original.replace("service_account: payments-ci", "service_account: ghost")),
        ]
        for n, breakage in enumerate(breakages, start=1):
            breakage()
            await reload_and_wait(client, proc, f'tracegate_policy_loads_total{{result="failed"}} {float(n)}')
            assert await proc.metric(client, "tracegate_policy_loaded 0.0")
            assert await send(client, proc, token) == 200, f"old policy not serving after breakage {n}"
        proc.secret_file.write_text("docs-key-from-file\n")
        proc.policy.write_text(original.replace("payments/*", "nothing/*"))
        await reload_and_wait(client, proc, 'tracegate_policy_loads_total{result="ok"} 2.0')
        assert await send(client, proc, token) == 403
    proc.process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.process.wait(), 20)
    assert proc.process.returncode == 0
    out = (proc.policy.parent.parent / "stdout.log").read_bytes()
    err = (proc.policy.parent.parent / "stderr.log").read_bytes()
    assert b"policy reload failed" in err and b"main.yaml:" in err
    assert_no_secrets((out + err).decode(), token)
    assert "docs-key-from-file" not in (out + err).decode()
    assert sum(1 for r in sink.received if r.headers["lightstep-access-token"] == PAYMENTS_KEY) == 4


async def test_sigterm_drains_in_flight_requests_and_exits_zero(proc: Proc, issuer: StandInIssuer, sink: Sink) -> None:
    sink.delay = 1.0
    async with aiohttp.ClientSession() as client:
        in_flight = [asyncio.ensure_future(send(client, proc, issuer.mint())) for _ in range(5)]
        await asyncio.sleep(0.3)  # the requests are now waiting on the slow upstream
        assert not any(f.done() for f in in_flight)
        proc.process.send_signal(signal.SIGTERM)
        statuses = await asyncio.wait_for(asyncio.gather(*in_flight), 15)
        assert statuses == [200] * 5
        with pytest.raises(aiohttp.ClientError):
            await send(client, proc, issuer.mint())
    await asyncio.wait_for(proc.process.wait(), 15)
    assert proc.process.returncode == 0
    assert len(sink.received) == 5


async def test_sigkill_with_events_pending_then_restart_delivers_each_exactly_once(
    tmp_path: Path, issuer: StandInIssuer, sink: Sink
) -> None:
    from tests import gitea_payloads as g
    from tests.test_webhooks import OLD_SECRET, WEBHOOKS, hook_env

    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "main.yaml").write_text(policy_yaml(issuer.url, WEBHOOKS))
    env = {
        **hook_env(),
        "TRACEGATE_UPSTREAM_PATH_TRACES": "/v1/traces",
        "TRACEGATE_DATA_DIR": str(tmp_path / "data"),
        "TRACEGATE_OUTBOX_RETRY_BASE_SECONDS": "0.05",
        "TRACEGATE_OUTBOX_RETRY_MAX_SECONDS": "0.2",
        "TRACEGATE_UPSTREAM_TIMEOUT": "2",  # a send cut off by the kill is leased for 2 + 5 s
    }
    port = sink.port
    await sink.stop()  # Lightstep is down
    process, url, _ = await spawn(policies, env, f"http://127.0.0.1:{port}")
    async with aiohttp.ClientSession() as client:
        for i in range(1, 6):
            body = g.encode(g.push(after=f"{i:040x}"))
            headers = {
                **g.gitea_headers("push", body, OLD_SECRET, delivery=f"kill-{i}"),
                "Content-Type": "application/json",
            }
            async with client.post(url + "/webhooks/gitea", data=body, headers=headers) as resp:
                assert resp.status == 202
    await asyncio.sleep(0.3)
    process.kill()  # SIGKILL: no cleanup, no flush
    await process.wait()
    assert process.returncode == -signal.SIGKILL
    await sink.start(port)
    process, url, _ = await spawn(policies, env, f"http://127.0.0.1:{port}")
    try:
        for _ in range(300):
            if len(sink.received) >= 5:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        versions = sorted(
            json.loads(r.body)["resourceSpans"][0]["resource"]["attributes"][1]["value"]["stringValue"]
            for r in sink.received
        )
        assert versions == [f"{i:040x}" for i in range(1, 6)]
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 15)
    assert process.returncode == 0


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


async def test_workers_stop_when_their_parent_is_killed(tmp_path: Path, issuer: StandInIssuer, sink: Sink) -> None:
    """A supervisor SIGKILLed (an orchestrator's last resort, a test's cleanup) must not leave
    its workers serving on the shared ports."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "main.yaml").write_text(policy_yaml(issuer.url))
    env = {"LS_TOKEN_PAYMENTS": PAYMENTS_KEY, "LS_TOKEN_DOCS": "d", "TRACEGATE_DATA_DIR": str(tmp_path / "data")}
    process, _, _ = await spawn(policies, env, sink.url, "--workers", "2")
    workers = _children(process.pid)
    assert len(workers) == 2
    process.kill()
    await process.wait()
    for _ in range(200):  # each drains (SIGTERM from the kernel) and exits
        if not any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in workers):
            break
        await asyncio.sleep(0.05)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)]


def _state(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}") / "status").read_text().split("State:", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return "zombie"
