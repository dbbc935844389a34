"""Start-up failures a new user meets first: each is one clear line naming the setting and
what to do, exit code 2, and nothing left open (no traceback, no unclosed session)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.dev.standins import StandInIssuer, free_port
from tests.conftest import Tracegate, environ, policy_yaml


async def run_serve(tmp_path: Path, issuer: StandInIssuer, *args: str, **env: str) -> tuple[int, str]:
    """``tracegate serve`` until it exits; every listener on loopback, port 0, unless ``args``
    say otherwise (the last flag wins)."""
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
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "off",
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
    code, stderr = await run_serve(tmp_path, issuer, TRACEGATE_DATA_DIR=str(blocker / "data"))
    assert code == 2
    assert_one_clear_line(stderr, "TRACEGATE_OUTBOX=", "TRACEGATE_DATA_DIR")


@pytest.mark.parametrize(
    "env,needles",
    [
        ({"TRACEGATE_TLS_CERT": "/nonexistent/cert.pem", "TRACEGATE_TLS_KEY": "/nonexistent/key.pem"}, ["TLS_CERT"]),
        ({"TRACEGATE_WORKERS": "zero"}, ["TRACEGATE_WORKERS"]),
        ({"TRACEGATE_WORKERS": "abc"}, ["TRACEGATE_WORKERS='abc'", "positive integer", "or auto"]),
    ],
)
async def test_bad_settings_are_one_line(
    tmp_path: Path, issuer: StandInIssuer, env: dict[str, str], needles: list[str]
) -> None:
    code, stderr = await run_serve(tmp_path, issuer, **env)
    assert code == 2
    assert_one_clear_line(stderr, *needles)


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_policy_that_does_not_load_is_one_line(tmp_path: Path, issuer: StandInIssuer, workers: str) -> None:
    """As the other start-up failures: one ``tracegate:`` line naming the setting, the files
    and lines, and the command that lists every problem — once, however many workers."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "broken.yaml").write_text(
        "rules:\n  - {name: r, issuer: nope, when: {ref: main}, service_account: s}\n"
    )
    code, stderr = await run_serve(tmp_path, issuer, "--workers", workers)
    assert code == 2
    assert_one_clear_line(
        stderr,
        f"TRACEGATE_POLICIES={policies}: the policy did not load, 2 problem(s): ",
        "[1] ",
        f"{policies}/broken.yaml:2: rule 'r' names unknown issuer 'nope'",
        f"`tracegate check {policies}` lists each",
    )
    assert '"level"' not in stderr  # not a JSON log record per problem


async def test_a_key_fetch_failure_names_the_url_and_the_cause(
    start_tracegate: Any, issuer: StandInIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    """The issuer's keys are fetched after start (tracegate serves meanwhile); the warning an
    operator reads says which URL failed and why, not only a metric label."""
    closed = f"http://127.0.0.1:{free_port()}"
    await start_tracegate(policy_yaml(closed))
    await _logged(caplog, f"jwks fetch failed: {closed}/.well-known/openid-configuration (connection refused)")
    issuer.available = False
    issuer_url = issuer.url
    caplog.clear()
    await start_tracegate(policy_yaml(issuer_url))
    await _logged(caplog, f"jwks fetch failed: {issuer_url}/.well-known/openid-configuration (HTTP 503)")
    issuer.available = True
    issuer.jwks_body = b"<html>"
    caplog.clear()
    await start_tracegate(policy_yaml(issuer_url))
    await _logged(caplog, f"jwks fetch failed: {issuer_url}/oauth/discovery/keys (not JSON)")
    record = next(r for r in caplog.records if r.getMessage().startswith("jwks fetch failed"))
    assert (record.issuer, record.result, record.url) == (
        "gitlab",
        "bad-document",
        f"{issuer_url}/oauth/discovery/keys",
    )


async def _logged(caplog: pytest.LogCaptureFixture, message: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while message not in [r.getMessage() for r in caplog.records]:
        assert asyncio.get_running_loop().time() < deadline, [r.getMessage() for r in caplog.records]
        await asyncio.sleep(0.02)


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
