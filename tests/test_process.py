"""tracegate as a real process: SIGHUP reloads (a broken policy leaves the old one
serving), SIGTERM drains in-flight requests and exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from proxy.standins import Sink, StandInIssuer
from tests.conftest import PAYMENTS_KEY, assert_no_secrets, policy_yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


@pytest.fixture
async def proc(tmp_path: Path, issuer: StandInIssuer, sink: Sink) -> AsyncIterator[Proc]:
    policies = tmp_path / "policies"
    policies.mkdir()
    secret_file = tmp_path / "docs-key"
    secret_file.write_text("docs-key-from-file\n")
    policy = policies / "main.yaml"
    policy.write_text(policy_yaml(issuer.url).replace("{env: LS_TOKEN_DOCS}", f"{{file: {secret_file}}}"))
    port, admin = free_port(), free_port()
    env = {
        **os.environ,
        "LS_TOKEN_PAYMENTS": PAYMENTS_KEY,
        "TRACEGATE_UPSTREAM_PATH_TRACES": "/v1/traces",
        "TRACEGATE_DRAIN_SECONDS": "10",
        "TRACEGATE_DATA_DIR": str(tmp_path / "data"),
    }
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
        sink.url,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    p = Proc(process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", policy, secret_file)
    async with aiohttp.ClientSession() as client:
        for _ in range(200):
            try:
                async with client.get(p.admin + "/readyz") as resp:
                    if resp.status == 200 and not (await resp.json())["issuers_without_keys"]:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        else:
            process.kill()
            raise RuntimeError("tracegate did not become ready")
    yield p
    if process.returncode is None:
        process.kill()
        await process.wait()


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
    out, err = await asyncio.wait_for(proc.process.communicate(), 20)
    assert proc.process.returncode == 0
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
