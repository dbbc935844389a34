"""The authorization listener in a real ``tracegate serve`` process: configured from the
environment, a key rotated in its secret file and SIGHUP is answered at once, SIGTERM
exits 0, and a bad authz setting stops start-up with the setting named."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp

from proxy.dev.standins import Sink, StandInIssuer, free_port
from tests.conftest import DOCS_KEY, PAYMENTS_KEY, assert_no_secrets, policy_yaml
from tests.test_process import spawn


async def test_serve_with_authz_listener_rotates_key_on_sighup_and_drains(
    tmp_path: Path, issuer: StandInIssuer, sink: Sink
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    key_file = tmp_path / "payments-key"
    key_file.write_text(PAYMENTS_KEY + "\n")
    gateway_secret = tmp_path / "authz-secret"
    gateway_secret.write_text("gw-secret-0c1d2e3f4a5b\n")
    (policies / "main.yaml").write_text(
        policy_yaml(issuer.url).replace("{env: LS_TOKEN_PAYMENTS}", f"{{file: {key_file}}}")
    )
    authz = free_port()
    env = {
        "LS_TOKEN_DOCS": DOCS_KEY,
        "TRACEGATE_DATA_DIR": str(tmp_path / "data"),
        "TRACEGATE_AUTHZ_LISTEN": f"127.0.0.1:{authz}",
        "TRACEGATE_AUTHZ_DIALECT": "nginx",
        "TRACEGATE_AUTHZ_SECRET": f"file:{gateway_secret}",
    }
    process, _url, _admin = await spawn(policies, env, sink.url)
    token = issuer.mint()
    check = {
        "Authorization": f"Bearer {token}",
        "X-Original-URI": "/v1/traces",
        "X-Original-Method": "POST",
        "X-Tracegate-Authz-Secret": "gw-secret-0c1d2e3f4a5b",
    }
    try:
        async with aiohttp.ClientSession() as client:

            async def key() -> str:
                async with client.post(f"http://127.0.0.1:{authz}/check", headers=check) as resp:
                    assert resp.status == 200
                    return resp.headers["lightstep-access-token"]

            assert await key() == PAYMENTS_KEY
            key_file.write_text("ls-key-payments-rotated-99887766\n")
            process.send_signal(signal.SIGHUP)
            for _ in range(100):
                if await key() == "ls-key-payments-rotated-99887766":
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the rotated key never reached the authz answers")
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 20)
        assert process.returncode == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    out = (tmp_path / "stdout.log").read_text()
    err = (tmp_path / "stderr.log").read_text()
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    decisions = [(e["decision"], e["transport"]) for e in events if e["event"] == "authz"]
    assert len(decisions) >= 2 and set(decisions) == {("allowed", "authz")}
    assert f"127.0.0.1:{authz}" in err  # the start-up line names the authz listener
    assert_no_secrets(out + err, token)
    assert "rotated-99887766" not in out + err and "gw-secret-0c1d2e3f4a5b" not in out + err
    assert sink.received == []  # the authz listener never forwards anything itself


async def test_authz_listen_without_a_dialect_stops_start_up(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--policies",
        str(tmp_path),
        "--authz-listen",
        "127.0.0.1:0",
        env={**os.environ},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"TRACEGATE_AUTHZ_DIALECT must be set" in err
