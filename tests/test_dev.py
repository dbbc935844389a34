"""``tracegate dev`` as a real process: it keeps a stand-in issuer, a sink and tracegate
running, prints variables that a real OpenTelemetry SDK exports through as they are,
prints each decision, mints more tokens with chosen claims (``dev token``), reloads its
policy on SIGHUP and cleans up its signing key when stopped."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from proxy.dev.loop import exporter_variables
from proxy.dev.standins import free_port
from proxy.dev.state import dev_claims, parse_claims

#: Exports one span with the OTLP/HTTP exporter configured only by OTEL_EXPORTER_OTLP_*.
SDK_EXPORT = """
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

memory = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(memory))
with provider.get_tracer("test").start_as_current_span("ci-job"):
    pass
exporter = OTLPSpanExporter()
print(exporter.export(memory.get_finished_spans()).name)
"""


@dataclass
class Dev:
    process: asyncio.subprocess.Process
    state: Path
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def wait_for(self, predicate: Any, timeout: float = 20.0) -> str:
        """The first printed line (from the start) for which ``predicate`` is true."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            for line in self.lines:
                if predicate(line):
                    return line
            if self.process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"no such line; dev printed: {self.lines}")

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]

    def exports(self, block: int = 0) -> dict[str, str]:
        """The ``OTEL_*`` variables of the ``block``-th group printed (0: OTLP/HTTP, 1:
        OTLP/gRPC), as bash has them after the token line and that group are pasted."""
        token: list[str] = []
        groups: list[dict[str, str]] = []
        for line in self.lines:
            if line.startswith("export TRACEGATE_DEV_TOKEN="):
                token = [line]
            elif line.startswith("export OTEL_"):
                name = line.removeprefix("export ").partition("=")[0]
                if not groups or name in groups[-1]:
                    groups.append({})
                groups[-1][name] = line
        if len(groups) <= block:
            return {}
        script = "\n".join(["set -eu", *token, *groups[block].values(), "env -0"])
        shell = subprocess.run(["bash", "-c", script], capture_output=True, check=True, env={}, text=True)
        pasted = dict(item.partition("=")[::2] for item in shell.stdout.split("\0") if item)
        return {name: pasted[name] for name in groups[block]}


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *args,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def sdk_export(variables: dict[str, str]) -> str:
    """A real SDK export configured by ``variables`` alone; gRPC when they say so."""
    script = SDK_EXPORT
    if variables.get("OTEL_EXPORTER_OTLP_PROTOCOL") == "grpc":
        script = script.replace(".proto.http.trace_exporter", ".proto.grpc.trace_exporter")
    code, out, err = await run(sys.executable, "-c", script, env=variables)
    assert code == 0, err
    return out.strip()


@pytest.fixture
async def dev(tmp_path: Path) -> AsyncIterator[Dev]:
    state = tmp_path / "state"
    stderr = (tmp_path / "dev.stderr").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "dev",
        "--state",
        str(state),
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--admin-listen",
        f"127.0.0.1:{free_port()}",
        "--grpc-listen",
        f"127.0.0.1:{free_port()}",
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
    )
    stderr.close()
    running = Dev(process, state)

    async def read() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            running.lines.append(raw.decode().rstrip("\n"))

    running.reader = asyncio.create_task(read())
    await running.wait_for(lambda line: line == "# ready")
    yield running
    if process.returncode is None:
        process.kill()
        await process.wait()
    await running.reader


async def test_dev_real_sdk_export_decisions_more_tokens_reload_and_cleanup(dev: Dev) -> None:
    variables = dev.exports()
    assert set(variables) == {
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_HEADERS",
    }
    assert variables["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert variables["OTEL_EXPORTER_OTLP_HEADERS"].startswith("authorization=Bearer%20ey")
    assert (dev.state / "signing-key.pem").stat().st_mode & 0o077 == 0
    assert dev.state.stat().st_mode & 0o077 == 0

    # 1. The printed variables, as they are, make a real SDK export succeed: HTTP, and gRPC.
    assert await sdk_export(variables) == "SUCCESS"
    grpc_variables = dev.exports(1)
    assert grpc_variables["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert await sdk_export(grpc_variables) == "SUCCESS"
    await dev.wait_for(lambda line: line.startswith("# grpc sink: ") and "the account's key" in line)
    line = await dev.wait_for(lambda line: line.startswith("{") and '"allowed"' in line)
    record = json.loads(line)
    assert (record["rule"], record["service_account"], record["upstream_status"]) == ("my-project", "ci", 200)
    await dev.wait_for(lambda line: line.startswith("# sink: POST /traces/otlp/v0.9") and "the account's key" in line)
    printed_token = variables["OTEL_EXPORTER_OTLP_HEADERS"].removeprefix("authorization=Bearer%20")
    assert not [line for line in dev.lines if line.startswith("{") and printed_token in line]
    assert [line for line in dev.lines if printed_token in line] == [f"export TRACEGATE_DEV_TOKEN={printed_token}"]

    # 2. `dev token --claim` mints for the running issuer; a fork is denied by the deny rule.
    code, out, err = await run(
        sys.executable, "-m", "proxy", "dev", "token", "--state", str(dev.state),
        "--claim", "project_path=payments/forks/api", "--export",
    )  # fmt: skip
    assert code == 0, err
    fork_headers = out.strip().removeprefix("export OTEL_EXPORTER_OTLP_HEADERS=")
    sinks_before = len([line for line in dev.lines if line.startswith("# sink:")])
    assert await sdk_export({**variables, "OTEL_EXPORTER_OTLP_HEADERS": fork_headers}) == "FAILURE"
    line = await dev.wait_for(lambda line: '"rule-denied"' in line)
    assert json.loads(line)["project_path"] == "payments/forks/api"

    # 3. Another project is not allowed until the dev rules say so (edit + SIGHUP).
    code, other, err = await run(
        sys.executable, "-m", "proxy", "dev", "token", "--state", str(dev.state),
        "--claim", "project_id=777", "--claim", "project_path=docs/site",
    )  # fmt: skip
    assert code == 0, err
    other_headers = f"authorization=Bearer%20{other.strip()}"
    assert await sdk_export({**variables, "OTEL_EXPORTER_OTLP_HEADERS": other_headers}) == "FAILURE"
    await dev.wait_for(lambda line: '"no-rule-matched"' in line and '"docs/site"' in line)
    assert len([line for line in dev.lines if line.startswith("# sink:")]) == sinks_before
    rules = dev.state / "policies" / "10-dev-rules.yaml"
    rules.write_text(rules.read_text().replace('project_id: "4242"', 'project_id: ["4242", "777"]'))
    dev.process.send_signal(signal.SIGHUP)
    await dev.wait_for(lambda line: line == "# policy reloaded")
    assert await sdk_export({**variables, "OTEL_EXPORTER_OTLP_HEADERS": other_headers}) == "SUCCESS"
    await dev.wait_for(lambda line: '"allowed"' in line and '"docs/site"' in line)

    # 4. A second dev on the same state directory is refused; SIGTERM stops it and removes the key.
    code, _, err = await run(sys.executable, "-m", "proxy", "dev", "--state", str(dev.state))
    assert code == 2
    assert "another `tracegate dev`" in err
    taken = variables["OTEL_EXPORTER_OTLP_ENDPOINT"].removeprefix("http://")
    code, _, err = await run(
        sys.executable, "-m", "proxy", "dev", "--state", str(dev.state.parent / "other"), "--listen", taken
    )
    assert code == 2
    assert err.splitlines() == [f"tracegate: --listen={taken}: cannot listen there (Address already in use); "
                                "is another tracegate running? pass --listen 127.0.0.1:PORT"]  # fmt: skip
    dev.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(dev.process.wait(), 20) == 0
    assert not (dev.state / "signing-key.pem").exists()
    assert not (dev.state / "state.json").exists()
    code, _, err = await run(sys.executable, "-m", "proxy", "dev", "token", "--state", str(dev.state))
    assert code == 2
    assert "no running `tracegate dev`" in err

    # 5. Started again on the same state: the user's rules are kept, the issuer file is new.
    issuer_file = dev.state / "policies" / "00-dev-issuer.yaml"
    first_issuer = issuer_file.read_text()
    again = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "dev", "--state", str(dev.state),
        "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}",
        "--grpc-listen", "off",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert again.stdout is not None
        while (await asyncio.wait_for(again.stdout.readline(), 20)).strip() != b"# ready":
            pass
        assert '["4242", "777"]' in rules.read_text()
        assert issuer_file.read_text() != first_issuer
    finally:
        again.send_signal(signal.SIGTERM)
        await asyncio.wait_for(again.communicate(), 20)
    assert again.returncode == 0


async def bash(*lines: str) -> str:
    """Run printed lines as a user pasting them would (bash, with this environment's PATH)."""
    code, out, err = await run("bash", "-c", "\n".join(["set -eu", *lines]))
    assert code == 0, err
    return out


async def test_dev_webhook_payloads_draw_the_pipeline_trace_that_traceparent_names(dev: Dev) -> None:
    """The printed curl lines deliver the bundled payloads as GitLab and Gitea would; the job
    span the GitLab job hook draws is the span /v1/traceparent answers for the dev token."""
    curls = [line for line in dev.lines if line.startswith("curl ")]
    assert [line.split("/webhooks/")[1].split()[0] for line in curls] == ["gitlab"] * 2 + ["gitea"] * 3
    answers = [json.loads(await bash(line)) for line in curls]
    assert answers == [
        {"accepted": True, "reason": "stored", "spans": 1},
        {"accepted": True, "reason": "stored", "spans": 1},
        {"accepted": True, "reason": "stored"},
        {"accepted": True, "reason": "stored"},
        {"accepted": True, "reason": "stored", "services": ["payments-api"]},
    ]
    token = next(line for line in dev.lines if line.startswith("export TRACEGATE_DEV_TOKEN="))
    parent = next(line for line in dev.lines if line.startswith("export TRACEPARENT="))
    version, trace, job_span, flags = (await bash(token, parent, 'printf %s "$TRACEPARENT"')).split("-")
    assert (version, flags, len(trace), len(job_span)) == ("00", "01", 32, 16)

    # What the sink (playing Lightstep) received: the pipeline's root span and the job span under it.
    root = await dev.wait_for(lambda line: line.startswith("# sink:   span 'pipeline Build and test' "))
    assert root.startswith(f"# sink:   span 'pipeline Build and test' trace {trace} span ")
    assert root.endswith(" parent -")
    root_span = root.split(" span ")[-1].split()[0]
    await dev.wait_for(
        lambda line: line == f"# sink:   span 'job unit-tests' trace {trace} span {job_span} parent {root_span}"
    )
    # The Gitea run: its own trace, the job under the run; and the push's deployment marker.
    run_line = await dev.wait_for(lambda line: line.startswith("# sink:   span 'workflow CI' trace "))
    gitea_trace, run_span = run_line.split(" trace ")[1].split(" span ")[0], run_line.split(" span ")[-1].split()[0]
    assert gitea_trace != trace
    await dev.wait_for(
        lambda line: (
            line.startswith(f"# sink:   span 'job test' trace {gitea_trace} span ")
            and line.endswith(f" parent {run_span}")
        )
    )
    await dev.wait_for(lambda line: line.startswith("# sink:   span 'deployment api@main (push)' "))
    await dev.wait_for(lambda _: len([r for r in dev.audit() if r["event"] == "outbox"]) == 5)
    assert {r["decision"] for r in dev.audit() if r["event"] == "outbox"} == {"delivered"}
    sunk = [line for line in dev.lines if line.startswith("# sink: POST /traces/otlp/v0.9 ")]
    assert len(sunk) == 5 and all("the account's key; as Lightstep documents it" in line for line in sunk)

    # No secret is printed: the curl lines read them from the state directory.
    secrets = [(dev.state / "secrets" / name).read_text() for name in ("gitlab-webhook-token", "gitea-webhook-secret")]
    assert all(len(secret) >= 32 and not [line for line in dev.lines if secret in line] for secret in secrets)
    assert all(path.stat().st_mode & 0o077 == 0 for path in (dev.state / "secrets").iterdir())
    dev.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(dev.process.wait(), 20) == 0
    assert not list((dev.state / "secrets").iterdir())


async def test_dev_policy_passes_check_strict_and_explain_tells_the_forge_of_its_payloads(dev: Dev) -> None:
    policies = str(dev.state / "policies")
    code, out, err = await run(sys.executable, "-m", "proxy", "check", "--strict", policies)
    assert (code, out.splitlines()) == (
        0,
        ["ok: 4 file(s), 1 issuer(s), 1 service account(s), 2 rule(s), 2 webhook(s)"],
    )
    trace = {}
    for name, source, entry in (("gitlab-job", "gitlab", "dev-gitlab"), ("gitea-workflow-job", "gitea", "dev-gitea")):
        payload = str(dev.state / "payloads" / f"{name}.json")
        code, out, err = await run(sys.executable, "-m", "proxy", "explain", policies, "--payload", payload)
        assert code == 0, out + err
        assert out.startswith(f"{source} ") and f"entry {entry!r}" in out
        trace[source] = out.split("  trace ")[1].split()[0]
    # The same trace as /v1/traceparent names for the dev token.
    token = next(line for line in dev.lines if line.startswith("export TRACEGATE_DEV_TOKEN="))
    parent = next(line for line in dev.lines if line.startswith("export TRACEPARENT="))
    assert (await bash(token, parent, 'printf %s "$TRACEPARENT"')).split("-")[1] == trace["gitlab"]


def test_the_bundled_payloads_are_the_documented_examples() -> None:
    from importlib.resources import files

    from proxy.dev.forges import DELIVERIES

    examples = Path(__file__).parent.parent / "examples" / "webhooks"
    for delivery in DELIVERIES:
        bundled = (files("proxy.dev") / "payloads" / delivery.file).read_bytes()
        assert bundled == (examples / delivery.file).read_bytes(), delivery.file


def test_claims_follow_gitlab_derivations() -> None:
    claims = dev_claims("http://127.0.0.1:1", parse_claims(["project_path=a/b/c", "ref=v1", "ref_type=tag"]), 60)
    assert claims["namespace_path"] == "a/b"
    assert claims["sub"] == "project_path:a/b/c:ref_type:tag:ref:v1"
    assert claims["ref_path"] == "refs/tags/v1"
    assert claims["exp"] - claims["iat"] == 60
    removed = dev_claims("http://127.0.0.1:1", parse_claims(["environment=", "sub=custom"]), 60)
    assert "environment" not in removed
    assert removed["sub"] == "custom"
    with pytest.raises(ValueError, match="expected NAME=VALUE"):
        parse_claims(["project_path"])


async def test_the_printed_collector_exporter_is_valid_yaml_naming_the_same_endpoint_and_token(dev: Dev) -> None:
    import yaml

    start = dev.lines.index("exporters:")
    block = yaml.safe_load("\n".join(dev.lines[start : start + 4]))
    exporter = block["exporters"]["otlphttp/tracegate"]
    variables = dev.exports()
    assert exporter["endpoint"] == variables["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert exporter["headers"] == {"authorization": "Bearer ${env:TRACEGATE_DEV_TOKEN}"}  # the Collector's syntax
    assert variables["OTEL_EXPORTER_OTLP_HEADERS"].startswith("authorization=Bearer%20ey")


def test_grpc_variables_appear_once_a_grpc_endpoint_exists() -> None:
    http_only = exporter_variables("T", "http://127.0.0.1:4318")
    assert "export OTEL_EXPORTER_OTLP_PROTOCOL=grpc" not in http_only
    both = exporter_variables("T", "http://127.0.0.1:4318", "http://127.0.0.1:4317")
    assert "export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317" in both
    assert "export OTEL_EXPORTER_OTLP_PROTOCOL=grpc" in both


def test_the_request_path_never_imports_the_stand_ins() -> None:
    import subprocess

    script = (
        "import sys, proxy.cli, proxy.run.server, proxy.gate.runtime, proxy.doors.ingest, proxy.ci.routes\n"
        "proxy.cli._parser()\n"
        "print(sorted(m for m in sys.modules if m in ('proxy.dev.standins', 'proxy.dev.demo')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_dev_refuses_a_non_loopback_listener(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli import main

    assert main(["dev", "--state", str(tmp_path / "s"), "--listen", "0.0.0.0:4318"], environ={}) == 2
    assert "tracegate dev listens on loopback only" in capsys.readouterr().err
