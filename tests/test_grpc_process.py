"""The gRPC listener in a real ``tracegate serve`` process: SIGTERM drains in-flight gRPC
calls (new ones get UNAVAILABLE) and exits 0; ``--workers 2`` share the gRPC port; a TLS
upstream is verified."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from proxy.dev.standins import GrpcSink, StandInIssuer, free_port
from tests.conftest import PAYMENTS_KEY, policy_yaml
from tests.grpc_clients import ThrowawayCA, call
from tests.test_process import spawn


@pytest.fixture
async def grpc_sink() -> AsyncIterator[GrpcSink]:
    server = GrpcSink()
    await server.start()
    yield server
    await server.stop()


def _env(tmp_path: Path, grpc_sink: GrpcSink) -> dict[str, str]:
    return {
        "LS_TOKEN_PAYMENTS": PAYMENTS_KEY,
        "LS_TOKEN_DOCS": "docs-key",
        "TRACEGATE_GRPC_UPSTREAM": grpc_sink.target,
        "TRACEGATE_DRAIN_SECONDS": "10",
        "TRACEGATE_DATA_DIR": str(tmp_path / "data"),
    }


def _policies(tmp_path: Path, issuer: StandInIssuer) -> Path:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "main.yaml").write_text(policy_yaml(issuer.url))
    return policies


async def test_sigterm_drains_in_flight_grpc_calls_and_exits_zero(
    tmp_path: Path, issuer: StandInIssuer, grpc_sink: GrpcSink
) -> None:
    port = free_port()
    process, _, admin = await spawn(
        _policies(tmp_path, issuer),
        _env(tmp_path, grpc_sink),
        "http://127.0.0.1:1",
        "--grpc-listen",
        f"127.0.0.1:{port}",
    )
    try:
        async with aiohttp.ClientSession() as client, client.get(admin + "/readyz") as resp:
            assert (await resp.json())["listeners"] == {"http": True, "grpc": True}
        token = issuer.mint()
        grpc_sink.delay = 1.0
        in_flight = [
            asyncio.ensure_future(call(port, [("authorization", f"Bearer {token}")], f"{i}".encode())) for i in range(5)
        ]
        while len(grpc_sink.received) < 5:
            await asyncio.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        late = await call(port, [("authorization", f"Bearer {token}")], b"late", timeout=3)
        assert late.code is grpc.StatusCode.UNAVAILABLE
        outcomes = await asyncio.wait_for(asyncio.gather(*in_flight), 15)
        assert [o.code for o in outcomes] == [grpc.StatusCode.OK] * 5
        await asyncio.wait_for(process.wait(), 15)
        assert process.returncode == 0
        assert sorted(r.body for r in grpc_sink.received) == [f"{i}".encode() for i in range(5)]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def _listening_sockets(port: int) -> int:
    """Sockets in LISTEN state on ``port`` (IPv4 or IPv6 tables), from the kernel's own view."""
    rows = [row.split() for table in ("tcp", "tcp6") for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]]
    return sum(1 for row in rows if row[1].endswith(f":{port:04X}") and row[3] == "0A")


async def test_two_workers_share_the_grpc_port(tmp_path: Path, issuer: StandInIssuer, grpc_sink: GrpcSink) -> None:
    port = free_port()
    process, _, admin = await spawn(
        _policies(tmp_path, issuer),
        _env(tmp_path, grpc_sink),
        "http://127.0.0.1:1",
        "--grpc-listen",
        f"127.0.0.1:{port}",
        "--workers",
        "2",
    )
    try:
        # The shared admin port answers for whichever worker takes the connection, and each
        # worker has its own JWKS cache: wait for 20 ready answers in a row, each on a new
        # connection (the kernel spreads them), so that both workers have their keys.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
            streak = 0
            for _ in range(600):
                try:
                    async with client.get(admin + "/readyz") as resp:
                        body = await resp.json()
                        ok = resp.status == 200 and not body["issuers_without_keys"]
                except aiohttp.ClientError:
                    ok = False
                streak = streak + 1 if ok else 0
                if streak == 20:
                    break
                await asyncio.sleep(0.02)
            token = issuer.mint()
            outcomes = [await call(port, [("authorization", f"Bearer {token}")], f"{i}".encode()) for i in range(24)]
            assert [o.code for o in outcomes] == [grpc.StatusCode.OK] * 24
            async with client.get(admin + "/metrics") as resp:
                text = await resp.text()
        served = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("tracegate_requests_total{") and 'transport="grpc"' in line
        )
        assert served == 24  # one scrape answers for both workers (multiprocess metrics)
        assert _listening_sockets(port) == 2  # both workers bound the gRPC port (SO_REUSEPORT)
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 15)
        assert process.returncode == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_tls_upstream_is_verified(tmp_path: Path, issuer: StandInIssuer) -> None:
    """The gRPC upstream over TLS: a certificate the process trusts is served, one it does not
    is refused (UNAVAILABLE, nothing sent). The trust store is grpc's own, pointed at the test
    CA with GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, which grpc reads when the process starts."""
    ca = ThrowawayCA.create(tmp_path)
    other = ThrowawayCA.create(tmp_path / "..")
    sink = GrpcSink()
    await sink.start(credentials=grpc.ssl_server_credentials([(ca.key.read_bytes(), ca.cert.read_bytes())]))
    policies = _policies(tmp_path, issuer)
    try:
        for trusted, roots in ((True, ca.ca_file), (False, other.ca_file)):
            port = free_port()
            env = {**_env(tmp_path, sink), "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(roots)}
            assert sink.target.startswith("https://")
            process, _, _ = await spawn(policies, env, "http://127.0.0.1:1", "--grpc-listen", f"127.0.0.1:{port}")
            try:
                before = len(sink.received)
                outcome = await call(port, [("authorization", f"Bearer {issuer.mint()}")], b"over tls")
                if trusted:
                    assert outcome.code is grpc.StatusCode.OK
                    assert [r.body for r in sink.received[before:]] == [b"over tls"]
                    assert sink.received[-1].values("lightstep-access-token") == [PAYMENTS_KEY]
                else:
                    assert outcome.code is grpc.StatusCode.UNAVAILABLE
                    assert len(sink.received) == before
            finally:
                process.send_signal(signal.SIGTERM)
                await asyncio.wait_for(process.wait(), 15)
    finally:
        await sink.stop()


async def test_grpc_port_in_use_is_a_clear_error(tmp_path: Path, issuer: StandInIssuer, grpc_sink: GrpcSink) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--policies",
            str(_policies(tmp_path, issuer)),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--grpc-listen",
            f"127.0.0.1:{port}",
            env={**os.environ, **_env(tmp_path, grpc_sink)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert len(lines) == 1, lines  # one clear line: nothing was started, nothing left open
    assert lines[0].startswith(f"tracegate: TRACEGATE_GRPC_LISTEN=127.0.0.1:{port}: cannot listen there")
    assert "in use" in lines[0]
