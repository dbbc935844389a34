"""Start-up failures a new user meets first: each is one clear line naming the setting and
what to do, exit code 2, and nothing left open (no traceback, no unclosed session)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from proxy.dev.standins import StandInIssuer, free_port
from tests.conftest import Tracegate, environ, policy_yaml


async def run_serve(tmp_path: Path, issuer: StandInIssuer, *args: str, **env: str) -> tuple[int, str]:
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "p.yaml").write_text(policy_yaml(issuer.url))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--policies",
        str(policies),
        "--admin-listen",
        "127.0.0.1:0",
        *args,
        env={**os.environ, **environ(), "TRACEGATE_DATA_DIR": str(tmp_path / "data"), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, err.decode()


def assert_one_clear_line(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("tracegate: ")
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in stderr and "Unclosed" not in stderr


async def test_port_in_use_is_one_line_naming_the_setting(tmp_path: Path, issuer: StandInIssuer) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, stderr = await run_serve(tmp_path, issuer, "--listen", f"127.0.0.1:{port}")
    assert code == 2
    assert_one_clear_line(stderr, f"TRACEGATE_LISTEN=127.0.0.1:{port}", "in use")


async def test_unusable_data_directory_is_one_line_naming_the_setting(tmp_path: Path, issuer: StandInIssuer) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, stderr = await run_serve(
        tmp_path, issuer, "--listen", "127.0.0.1:0", TRACEGATE_DATA_DIR=str(blocker / "data")
    )
    assert code == 2
    assert_one_clear_line(stderr, "TRACEGATE_OUTBOX=", "TRACEGATE_DATA_DIR")


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"TRACEGATE_TLS_CERT": "/nonexistent/cert.pem", "TRACEGATE_TLS_KEY": "/nonexistent/key.pem"}, "TLS_CERT"),
        ({"TRACEGATE_WORKERS": "zero"}, "TRACEGATE_WORKERS"),
    ],
)
async def test_bad_settings_are_one_line(
    tmp_path: Path, issuer: StandInIssuer, env: dict[str, str], needle: str
) -> None:
    code, stderr = await run_serve(tmp_path, issuer, "--listen", "127.0.0.1:0", **env)
    assert code == 2
    assert_one_clear_line(stderr, needle)


async def _healthcheck(admin_listen: str) -> int:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.run.healthcheck", env={**os.environ, "TRACEGATE_ADMIN_LISTEN": admin_listen}
    )
    return await asyncio.wait_for(process.wait(), 30)


async def test_container_healthcheck_follows_the_admin_listen_setting(tracegate: Tracegate) -> None:
    port = tracegate.admin_url.rsplit(":", 1)[1]
    assert await _healthcheck(f"0.0.0.0:{port}") == 0  # the image's setting: probed on loopback
    assert await _healthcheck(f"127.0.0.1:{port}") == 0
    assert await _healthcheck(f"127.0.0.1:{free_port()}") == 1
