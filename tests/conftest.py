"""Shared fixtures: a stand-in issuer, a recording sink and a running tracegate, all real
servers on loopback. Nothing of tracegate's own is mocked."""

from __future__ import annotations

import asyncio
import os
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.dev.standins import Sink, StandInIssuer
from proxy.gate.runtime import Runtime
from proxy.observe.audit import AuditLog
from proxy.observe.metrics import Metrics
from proxy.run.server import start
from proxy.settings.config import OPTIONS, Settings

PAYMENTS_KEY = "ls-key-payments-0123456789abcdef"
DOCS_KEY = "ls-key-docs-fedcba9876543210"
SECRETS = (PAYMENTS_KEY, DOCS_KEY)


def policy_yaml(issuer_url: str, extra: str = "") -> str:
    return (
        textwrap.dedent(f"""\
        issuers:
          gitlab:
            issuer: {issuer_url}
            audiences: [tracegate]
            algorithms: [RS256, ES256]
        service_accounts:
          payments-ci:
            access_token: {{env: LS_TOKEN_PAYMENTS}}
          docs-ci:
            access_token: {{env: LS_TOKEN_DOCS}}
            signals: [traces]
        rules:
          - name: no-forks
            issuer: gitlab
            effect: deny
            when: {{project_path: "*/forks/*"}}
          - name: payments-protected
            issuer: gitlab
            when: {{project_path: "payments/*", ref_protected: "true"}}
            service_account: payments-ci
            services: [payments-api, payments-worker]
          - name: docs
            issuer: gitlab
            when: {{project_path: ["docs/site", "docs/handbook"]}}
            service_account: docs-ci
        """)
        + extra
    )


@dataclass
class Tracegate:
    runtime: Runtime
    runners: list[Any]
    url: str
    admin_url: str
    policy_dir: Path
    audit_lines: list[str]

    def audit(self) -> list[dict[str, Any]]:
        """Every audit record so far, parsed (one JSON object per line)."""
        import json

        return [json.loads(line) for chunk in self.audit_lines for line in chunk.splitlines()]

    async def stop(self) -> None:
        for runner in self.runners:
            await runner.cleanup()

    async def keys_ready(self, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while self.runtime.issuers_without_keys():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("issuer keys never arrived")
            await asyncio.sleep(0.02)

    def metric(self, name: str, **labels: str) -> float:
        value = self.runtime.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


#: What every process the suite starts inherits for the listeners it does not name itself:
#: loopback, a port of the kernel's choosing, no gRPC — never 4317/4318/9464, which a local
#: Collector (or a developer's own tracegate) usually holds.
UNNAMED_LISTENERS = {
    "TRACEGATE_LISTEN": "127.0.0.1:0",
    "TRACEGATE_ADMIN_LISTEN": "127.0.0.1:0",
    "TRACEGATE_GRPC_LISTEN": "off",
}


@pytest.fixture(autouse=True, scope="session")
def _hermetic_environment() -> Iterator[None]:
    """No ``TRACEGATE_*`` setting reaches a test's processes from the shell that runs pytest
    (an exported TRACEGATE_LISTEN or TRACEGATE_AUTHZ_LISTEN would change what they do), and
    a process a test starts without naming a listener binds none of the default ports. A
    test that needs a setting passes it (a flag, or its own environment)."""
    saved = {o.env: os.environ.pop(o.env) for o in OPTIONS if o.env in os.environ}
    os.environ.update(UNNAMED_LISTENERS)
    yield
    for name in UNNAMED_LISTENERS:
        os.environ.pop(name, None)
    os.environ.update(saved)


@pytest.fixture
async def issuer() -> AsyncIterator[StandInIssuer]:
    server = StandInIssuer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    server = Sink()
    await server.start()
    yield server
    await server.stop()


def environ() -> dict[str, str]:
    # TRACEGATE_GRPC_LISTEN: a `tracegate serve` process started with this environment does
    # not bind 0.0.0.0:4317 (tests listen on loopback only, on ports of their own).
    return {"LS_TOKEN_PAYMENTS": PAYMENTS_KEY, "LS_TOKEN_DOCS": DOCS_KEY, "TRACEGATE_GRPC_LISTEN": "off"}


StartTracegate = Callable[..., "asyncio.Future[Tracegate]"]


@pytest.fixture
async def start_tracegate(tmp_path: Path, sink: Sink) -> AsyncIterator[Callable[..., Any]]:
    started: list[Tracegate] = []

    async def _start(policy: str, *, env: Mapping[str, str] | None = None, **overrides: str) -> Tracegate:
        policy_dir = tmp_path / "policies"
        policy_dir.mkdir(exist_ok=True)
        (policy_dir / "10-main.yaml").write_text(policy)
        flags = {
            "policies": str(policy_dir),
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "upstream": sink.url,
            "path_traces": "/v1/traces",
            "path_metrics": "/v1/metrics",
            "path_logs": "/v1/logs",
            "data_dir": str(tmp_path / "data"),
            "grpc_listen": "off",
            "watch_interval": "0",  # tests reload when they say so (tests/test_watch.py watches)
            **overrides,
        }
        settings = Settings.load(flags, {})
        lines: list[str] = []
        audit = AuditLog(lines.append, flush_interval=0)
        runtime, runners = await start(settings, env if env is not None else environ(), metrics=Metrics(), audit=audit)
        ingest_port = runners[0].addresses[0][1]
        admin_port = runners[1].addresses[0][1]
        tg = Tracegate(
            runtime, runners, f"http://127.0.0.1:{ingest_port}", f"http://127.0.0.1:{admin_port}", policy_dir, lines
        )
        started.append(tg)
        return tg

    yield _start
    for tg in started:
        await tg.stop()


@pytest.fixture
async def tracegate(start_tracegate: Callable[..., Any], issuer: StandInIssuer) -> Tracegate:
    tg: Tracegate = await start_tracegate(policy_yaml(issuer.url))
    await tg.keys_ready()
    return tg


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def assert_no_secrets(text: str, *tokens: str) -> None:
    """No access key, and no token (nor its signature part), anywhere in ``text``."""
    for secret in SECRETS:
        assert secret not in text
    for token in tokens:
        assert token not in text
        if token.count(".") == 2 and len(token.rsplit(".", 1)[1]) > 16:
            assert token.rsplit(".", 1)[1] not in text


@pytest.fixture(autouse=True)
def _capture_info_logs(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO)


#: Log messages that mean an exception escaped the code that should have handled it.
UNHANDLED_MARKERS = (
    "unhandled error",
    "Error handling request",
    "Unhandled exception",
    "Task exception was never retrieved",
    "Exception in callback",
    "Unclosed client session",
    "Unclosed connector",
)


@pytest.fixture(autouse=True)
def _no_unhandled_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test of the suite fails if any code path logged an unhandled error: no input
    may produce one, whether or not the test was looking for it."""
    yield
    records = caplog.get_records("setup") + caplog.get_records("call")
    unhandled = [r for r in records if any(m in r.getMessage() for m in UNHANDLED_MARKERS)]
    assert not unhandled, [f"{r.name}: {r.getMessage()}" for r in unhandled]
