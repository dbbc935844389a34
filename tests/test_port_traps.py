"""No port traps (issue 21): the suite's ``tracegate serve`` processes choose their ports, so
they run while something else — a local OpenTelemetry Collector, usually — holds 4317, 4318
and 9464; and the gRPC listener's host follows ``--listen``'s unless told otherwise, so
narrowing the ingest to loopback narrows gRPC too. The start-up line names every address."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from proxy.dev.standins import GrpcSink, Sink, StandInIssuer, free_port
from proxy.errors import ConfigError
from proxy.settings.config import OPTIONS, Settings
from tests.conftest import PAYMENTS_KEY, UNNAMED_LISTENERS, policy_yaml
from tests.grpc_clients import call
from tests.test_process import spawn

#: tracegate's default ports: OTLP/gRPC, OTLP/HTTP, admin.
DEFAULT_PORTS = (4317, 4318, 9464)


def _bindable(host: str, port: int) -> bool:
    """Whether a listener could bind ``host:port`` now, as tracegate's do (SO_REUSEADDR)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


@pytest.fixture
def default_ports_held() -> Iterator[None]:
    """4317, 4318 and 9464 held on every IPv4 address for the test. A port another process
    already holds is left to it: it is held all the same, so the test is as valid."""
    held: list[socket.socket] = []
    try:
        for port in DEFAULT_PORTS:
            holder = socket.socket()
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no holder
            try:
                holder.bind(("0.0.0.0", port))  # every address: any bind of the port conflicts
                holder.listen()
            except OSError as exc:
                holder.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
            else:
                held.append(holder)
        assert not [p for p in DEFAULT_PORTS if _bindable("127.0.0.1", p)], "a default port is not held"
        yield
    finally:
        for holder in held:
            holder.close()


def test_the_grpc_listener_follows_the_listen_host_unless_told() -> None:
    def grpc_listen(flags: dict[str, str], environ: dict[str, str] | None = None) -> tuple[str, int] | None:
        return Settings.load(flags, environ or {}).grpc_listen

    assert {o.field: o.default for o in OPTIONS}["grpc_listen"] == ":4317"
    assert grpc_listen({}) == ("0.0.0.0", 4317)  # the ingest's default host: every address, as before
    assert grpc_listen({"listen": "127.0.0.1:14318"}) == ("127.0.0.1", 4317)
    assert grpc_listen({}, {"TRACEGATE_LISTEN": "[::1]:4318"}) == ("::1", 4317)
    assert grpc_listen({"listen": "127.0.0.1:4318", "grpc_listen": ":14317"}) == ("127.0.0.1", 14317)
    assert grpc_listen({"listen": "127.0.0.1:4318", "grpc_listen": "0.0.0.0:4317"}) == ("0.0.0.0", 4317)
    assert grpc_listen({"listen": "127.0.0.1:4318"}, {"TRACEGATE_GRPC_LISTEN": "off"}) is None
    with pytest.raises(ConfigError, match=r"--grpc-listen=':99999': expected HOST:PORT, :PORT .* or off"):
        grpc_listen({"grpc_listen": ":99999"})


async def test_serve_runs_while_the_default_ports_are_held_and_grpc_binds_the_listen_host(
    default_ports_held: None, tmp_path: Path, issuer: StandInIssuer, sink: Sink
) -> None:
    """The process tests' own flow (tests/test_process.py's ``spawn``) with the default ports
    held: OTLP/HTTP and OTLP/gRPC both serve, gRPC on ``--listen``'s loopback host only (given
    a port alone), and the start-up line names each address as bound."""
    grpc_sink = GrpcSink()
    await grpc_sink.start()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "main.yaml").write_text(policy_yaml(issuer.url))
    env = {
        "LS_TOKEN_PAYMENTS": PAYMENTS_KEY,
        "LS_TOKEN_DOCS": "ls-key-docs",
        "TRACEGATE_UPSTREAM_PATH_TRACES": "/v1/traces",
        "TRACEGATE_GRPC_UPSTREAM": grpc_sink.target,
        "TRACEGATE_DATA_DIR": str(tmp_path / "data"),
    }
    grpc_port = free_port()
    process, url, admin = await spawn(policies, env, sink.url, "--grpc-listen", f":{grpc_port}")
    try:
        token = issuer.mint()
        async with (
            aiohttp.ClientSession() as client,
            client.post(url + "/v1/traces", data=b"x", headers={"Authorization": f"Bearer {token}"}) as resp,
        ):
            assert resp.status == 200
        outcome = await call(grpc_port, [("authorization", f"Bearer {token}")], b"over grpc")
        assert outcome.code is grpc.StatusCode.OK
        assert [r.body for r in grpc_sink.received] == [b"over grpc"]
        # Bound to 127.0.0.1 alone: another loopback address can take the same port.
        assert _bindable("127.0.0.2", grpc_port)
        assert not _bindable("127.0.0.1", grpc_port)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 20)
        await grpc_sink.stop()
    assert process.returncode == 0
    assert len(sink.received) == 1
    stderr = (tmp_path / "stderr.log").read_text()
    [serving] = [json.loads(line) for line in stderr.splitlines() if '"tracegate serving' in line]
    ingest, admin_address = url.removeprefix("http://"), admin.removeprefix("http://")
    assert serving["msg"] == (
        f"tracegate serving: OTLP/HTTP {ingest}, OTLP/gRPC 127.0.0.1:{grpc_port}, admin {admin_address}"
    )
    assert (serving["listen"], serving["grpc_listen"], serving["admin"]) == (
        ingest,
        f"127.0.0.1:{grpc_port}",
        admin_address,
    )


async def test_the_in_process_fixture_serves_while_the_default_ports_are_held(
    default_ports_held: None, tracegate: Any, issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    headers = {"Authorization": f"Bearer {issuer.mint()}"}
    async with client.post(tracegate.url + "/v1/traces", data=b"x", headers=headers) as resp:
        assert resp.status == 200


async def test_the_default_grpc_listener_is_on_the_listen_host(default_ports_held: None, tmp_path: Path) -> None:
    """No gRPC setting at all, ``--listen`` on loopback: gRPC asks for 127.0.0.1:4317 (held
    here, so start-up stops with the one line naming it), never 0.0.0.0:4317."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "main.yaml").write_text(policy_yaml("https://gitlab.example.com"))
    env = {k: v for k, v in os.environ.items() if k not in UNNAMED_LISTENERS}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--policies",
        str(policies),
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--admin-listen",
        "127.0.0.1:0",
        env={**env, "LS_TOKEN_PAYMENTS": "p", "LS_TOKEN_DOCS": "d", "TRACEGATE_DATA_DIR": str(tmp_path / "data")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("tracegate: TRACEGATE_GRPC_LISTEN=127.0.0.1:4317: cannot listen there"), lines
