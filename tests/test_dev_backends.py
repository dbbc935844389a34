"""The tooling for backend profiles: ``tracegate dev --backend NAME`` as a real process (its
sink checks each backend's documented paths and headers, and says so), ``tracegate explain``
(the backend, each signal's URL and gRPC route, header names and never a value) and
``tracegate check`` (file:line and the allowed values)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.backends.profiles import BACKENDS, parse_backend, preview
from proxy.cli import main
from proxy.dev.backends import DEV_DATASET, DOCUMENTED, account_yaml, check_grpc, check_http
from proxy.dev.standins import free_port
from tests.grpc_clients import METHOD, sdk_export
from tests.test_backend_profiles_e2e import CASES, sdk_http_export

KEY = "dev-made-up-key-0123"
#: The dev key's prefix (proxy/dev/loop.py): the key is never printed either.
KEY_PREFIX = "lsdev-"


# --- the sink's checks, and the dev account of every backend ------------------------------


def test_the_dev_table_covers_every_profile_and_agrees_with_it() -> None:
    """What the dev sink checks is written from the vendors' documentation, apart from
    profiles.py: the two must agree on every backend's paths and header names."""
    assert set(DOCUMENTED) == set(BACKENDS)
    import yaml

    for name, doc in DOCUMENTED.items():
        entry = yaml.safe_load(account_yaml(name, "http://127.0.0.1:1", "http://127.0.0.1:2"))["service_accounts"]["ci"]
        spec, problems = parse_backend(entry)
        assert problems == [] and spec is not None, (name, problems)
        routes = preview(spec).routes
        if name != "lightstep":  # lightstep's URL is TRACEGATE_UPSTREAM's, the dev sink
            assert {s: r.url.removeprefix("http://127.0.0.1:1") for s, r in routes.items()} == doc.paths, name
        assert {s: r.header_names() for s, r in routes.items()} == {
            s: tuple(n for n, _ in doc.headers(s, KEY)) for s in doc.paths
        }, name
        assert dict(CASES[name].paths) == dict(doc.paths)  # and with the wire tests' table


def test_the_sink_says_when_a_request_is_not_as_documented() -> None:
    good = CIMultiDict([("x-honeycomb-team", KEY), ("x-honeycomb-dataset", DEV_DATASET)])
    assert check_http("honeycomb", KEY, "POST", "/v1/metrics", good, 12) == (
        "POST /v1/metrics 12 bytes, the account's key; "
        "as Honeycomb documents it (x-honeycomb-team, x-honeycomb-dataset)"
    )
    cases = [
        ("/v1/metric", good, "the path is none of /v1/traces, /v1/metrics, /v1/logs!"),
        ("/v1/metrics", CIMultiDict([("x-honeycomb-team", KEY)]), "x-honeycomb-dataset: 0 value(s), not the one"),
        ("/v1/metrics", CIMultiDict([*good.items(), ("x-honeycomb-team", "client")]), "x-honeycomb-team: 2 value(s)"),
        ("/v1/metrics", CIMultiDict([*good.items(), ("Authorization", "Bearer ey")]), "the client's credential passed"),
    ]
    for path, headers, problem in cases:
        line = check_http("honeycomb", KEY, "POST", path, headers, 1)
        assert "NOT as Honeycomb documents it" in line and problem in line, line
    grafana = check_http("grafana-cloud", KEY, "POST", "/otlp/v1/logs", CIMultiDict(authorization="Basic x"), 1)
    assert "authorization: 1 value(s), not the one expected" in grafana
    bridged = check_grpc("grafana-cloud", KEY, METHOD["logs"], [("authorization", "Basic x")], 1)
    assert bridged.endswith("it takes logs over OTLP/HTTP only (bridge them)!")
    assert check_grpc("splunk", KEY, METHOD["traces"], [("x-sf-token", KEY)], 3).endswith(
        "the account's key; as Splunk Observability documents it (x-sf-token)"
    )


def test_a_rules_file_from_before_backends_keeps_lightstep_and_refuses_another(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "state" / "policies" / "10-dev-rules.yaml"
    rules.parent.mkdir(parents=True)
    rules.write_text("service_accounts:\n  ci:\n    access_token: {env: LIGHTSTEP_ACCESS_TOKEN}\nrules: []\n")
    ports = ["--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}"]
    assert main(["dev", "--state", str(tmp_path / "state"), *ports, "--backend", "honeycomb"], environ={}) == 2
    assert capsys.readouterr().err == (
        f"tracegate: {rules} defines the service account itself (an older `tracegate dev` wrote it); "
        "remove its service_accounts: block to run --backend honeycomb\n"
    )


# --- tracegate dev --backend NAME, a real process -----------------------------------------


class DevProcess:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    async def wait_for(self, predicate: Callable[[str], bool], timeout: float = 20.0) -> str:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            found = next((line for line in self.lines if predicate(line)), None)
            if found is not None:
                return found
            if self.process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"no such line; dev printed: {self.lines}")

    def exported(self, name: str, block: int = 0) -> str:
        return [line.partition("=")[2] for line in self.lines if line.startswith(f"export {name}=")][block]


@pytest.fixture
async def start_dev(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    running: list[tuple[DevProcess, asyncio.Task[None]]] = []

    async def _start(backend: str) -> DevProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "dev", "--backend", backend, "--state", str(tmp_path / "state"),
            "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}",
            "--grpc-listen", f"127.0.0.1:{free_port()}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        dev = DevProcess(process)

        async def read() -> None:
            assert process.stdout is not None
            async for raw in process.stdout:
                dev.lines.append(raw.decode().rstrip("\n"))

        running.append((dev, asyncio.create_task(read())))
        await dev.wait_for(lambda line: line == "# ready")
        return dev

    yield _start
    for dev, reader in running:
        if dev.process.returncode is None:
            dev.process.terminate()
            await dev.process.wait()
        await reader


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "lightstep"])  # lightstep: tests/test_dev.py
async def test_dev_backend_sink_checks_the_documented_paths_and_headers(
    start_dev: Callable[..., Any], tmp_path: Path, backend: str
) -> None:
    dev: DevProcess = await start_dev(backend)
    doc, case = DOCUMENTED[backend], CASES[backend]
    assert any(line.startswith("# recording sink") and f"(plays {doc.title}: checks" in line for line in dev.lines)
    policies = tmp_path / "state" / "policies"
    assert f"backend: {backend}" in (policies / "05-dev-account.yaml").read_text()
    assert "service_accounts" not in (policies / "10-dev-rules.yaml").read_text()

    http, grpc = dev.exported("OTEL_EXPORTER_OTLP_ENDPOINT"), dev.exported("OTEL_EXPORTER_OTLP_ENDPOINT", 1)
    token = dev.exported("TRACEGATE_DEV_TOKEN")
    headers = {"authorization": f"Bearer {token}"}
    for signal in case.signals:  # the real SDK's exporters, configured as the printed variables say
        ok, _ = await asyncio.to_thread(sdk_http_export, signal, f"{http}/v1/{signal}", headers)
        assert ok, signal
        ok, _ = await asyncio.to_thread(sdk_export, signal, grpc, headers)
        assert ok, signal
    documented = f"the account's key; as {doc.title} documents it ("
    for signal in case.signals:
        path = case.paths[signal]
        seen = [line for line in dev.lines if line.startswith(f"# sink: POST {path} ")]
        want = 1 if signal in case.grpc else 2  # a bridged gRPC export arrives over OTLP/HTTP
        if len(seen) < want:
            await dev.wait_for(lambda line, p=path: line.startswith(f"# sink: POST {p} "))
            seen = [line for line in dev.lines if line.startswith(f"# sink: POST {path} ")]
        assert len(seen) == want and all(documented in line for line in seen), seen
        if signal in case.grpc:
            line = await dev.wait_for(lambda line, s=signal: line.startswith(f"# grpc sink: {METHOD[s]} "))
            assert documented in line, line
    assert not [line for line in dev.lines if "NOT as" in line]
    shown = [line for line in dev.lines if line.startswith(("# sink", "# grpc sink", "{"))]
    assert shown and not [line for line in shown if token in line or KEY_PREFIX in line]
    for signal in (s for s in ("traces", "metrics", "logs") if s not in case.paths):  # Splunk: no OTLP logs
        ok, _ = await asyncio.to_thread(sdk_http_export, signal, f"{http}/v1/{signal}", headers)
        assert not ok
        await dev.wait_for(lambda line, s=signal: '"signal-not-allowed"' in line and f'"{s}"' in line)


# --- tracegate explain and check ----------------------------------------------------------

POLICY = """\
issuers:
  gitlab:
    issuer: https://gitlab.example.com
    audiences: [tracegate]
service_accounts:
  grafana:
    backend: grafana-cloud
    region: prod-eu-west-2
    instance_id: {env: GC_ID}
    access_token: {env: GC_TOKEN}
  honeycomb:
    backend: honeycomb
    region: eu
    access_token: {env: HNY_KEY}
    dataset: ci-metrics
  honeycomb-http:
    backend: honeycomb
    access_token: {env: HNY_KEY}
    upstream_protocol: http
    signals: [traces]
  splunk:
    backend: splunk
    realm: eu0
    access_token: {file: /run/secrets/splunk}
  otlp:
    backend: otlp
    upstream: https://otel.example.com:4318
    headers: {x-api-key: {env: OTLP_KEY}, x-scope-orgid: acme}
  lightstep:
    access_token: {env: LS_TOKEN}
rules:
"""
SECRET_VALUES = {"GC_ID": "555111", "GC_TOKEN": "glc_sekrit_0123", "HNY_KEY": "hny_sekrit_4567", "LS_TOKEN": "ls_s_89"}


def explain(tmp_path: Path, account: str, *args: str, environ: dict[str, str] | None = None) -> tuple[int, list[str]]:
    rules = "".join(
        f"  - {{name: {n}, issuer: gitlab, when: {{project_path: {n}/app}}, service_account: {n}}}\n"
        for n in ("grafana", "honeycomb", "honeycomb-http", "splunk", "otlp", "lightstep")
    )
    (tmp_path / "p").mkdir(exist_ok=True)
    (tmp_path / "p" / "policy.yaml").write_text(POLICY + rules)
    claims = tmp_path / "claims.json"
    claims.write_text(f'{{"iss": "https://gitlab.example.com", "aud": "tracegate", "project_path": "{account}/app"}}')
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["explain", str(tmp_path / "p"), "--claims", str(claims), *args], environ=environ or {})
    text = out.getvalue()
    for value in SECRET_VALUES.values():
        assert value not in text
    lines = text.splitlines()
    return code, lines[lines.index(next(line for line in lines if line.startswith("allowed"))) :]


def test_explain_shows_the_backend_urls_grpc_routes_and_header_names_only(tmp_path: Path) -> None:
    code, lines = explain(tmp_path, "grafana", environ=SECRET_VALUES)
    assert code == 0
    assert lines[0].endswith("credentials from instance_id {env: GC_ID}, access_token {env: GC_TOKEN})")
    base = "https://otlp-gateway-prod-eu-west-2.grafana.net/otlp/v1"
    assert lines[1:] == [
        "  backend: grafana-cloud (header names only; values are never shown)",
        *(
            f"    {s}: {base}/{s} (protobuf or JSON); gRPC clients: bridged to OTLP/HTTP (protobuf); "
            "headers: authorization"
            for s in ("traces", "metrics", "logs")
        ),
    ]
    _, lines = explain(tmp_path, "honeycomb", "--signal", "metrics")
    assert lines[1:] == [
        "  backend: honeycomb (header names only; values are never shown)",
        "    metrics: https://api.eu1.honeycomb.io/v1/metrics (protobuf or JSON); "
        "gRPC clients: api.eu1.honeycomb.io:443; headers: x-honeycomb-team, x-honeycomb-dataset",
    ]
    _, lines = explain(tmp_path, "honeycomb-http")  # upstream_protocol: http bridges even where gRPC is taken
    assert lines[2:] == [
        "    traces: https://api.honeycomb.io/v1/traces (protobuf or JSON); gRPC clients: bridged to OTLP/HTTP "
        "(protobuf); headers: x-honeycomb-team"
    ]
    _, lines = explain(tmp_path, "splunk")
    assert lines[0].endswith("(signals: metrics, traces; key from {file: /run/secrets/splunk})")
    assert lines[2:] == [
        "    traces: https://ingest.eu0.signalfx.com/v2/trace/otlp (protobuf only); gRPC clients: "
        "ingest.eu0.signalfx.com:443; headers: x-sf-token",
        "    metrics: https://ingest.eu0.signalfx.com/v2/datapoint/otlp (protobuf only); gRPC clients: bridged to "
        "OTLP/HTTP (protobuf); headers: x-sf-token",
    ]
    _, lines = explain(tmp_path, "otlp", "--signal", "logs")
    assert lines[0].endswith("credentials from x-api-key {env: OTLP_KEY})")
    assert lines[2:] == [
        "    logs: https://otel.example.com:4318/v1/logs (protobuf or JSON); gRPC clients: bridged to OTLP/HTTP "
        "(protobuf); headers: x-api-key, x-scope-orgid"
    ]
    # Lightstep's URL and gRPC target are the settings' (TRACEGATE_UPSTREAM …), as serve would use them.
    _, lines = explain(
        tmp_path, "lightstep", "--signal", "traces", environ={"TRACEGATE_UPSTREAM": "https://ls.example"}
    )
    assert lines[0].endswith("key from {env: LS_TOKEN})")
    assert lines[2:] == [
        "    traces: https://ls.example/traces/otlp/v0.9 (protobuf or JSON); gRPC clients: ingest.lightstep.com:443; "
        "headers: lightstep-access-token"
    ]


CHECKED = """\
issuers:
  gitlab:
    issuer: https://gitlab.example.com
    audiences: [tracegate]
service_accounts:
  a:
    backend: honeycom
    access_token: {env: A}
  b:
    backend: honeycomb
    region: eu1
    access_token: {env: B}
  c:
    backend: grafana-cloud
    region: prod-eu-west-2
    access_token: {env: C}
  d:
    backend: splunk
    realm: us1
    access_token: {env: D}
    signals: [traces, logs]
  e:
    backend: datadog
    site: datadoghq.eu
    region: eu
    access_token: glc_inline_sekrit
rules:
  - {name: r, issuer: gitlab, when: {project_path: x/y}, service_account: d}
"""


def test_check_names_file_line_and_the_allowed_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.yaml").write_text(CHECKED)
    assert main(["check", str(tmp_path)], environ={}) == 1
    where = f"{tmp_path}/a.yaml"
    assert capsys.readouterr().out.splitlines() == [
        f"{where}:7: service account 'a'.backend 'honeycom' is unknown; did you mean 'honeycomb'? allowed: lightstep, "
        "honeycomb, grafana-cloud, datadog, newrelic, dynatrace, elastic, splunk, otlp",
        f"{where}:11: service account 'b'.region 'eu1' is not a honeycomb region; did you mean 'eu'? allowed: us, eu",
        f"{where}:13: service account 'c': backend grafana-cloud needs instance_id: {{env: NAME}} or {{file: /path}} "
        "or the number itself",
        f"{where}:21: service account 'd': backend splunk does not accept logs over OTLP; accepted: traces, metrics",
        f"{where}:25: service account 'e'.region is not a key of backend datadog; its keys: access_token, otlp_source, "
        "site",
        f"{where}:26: service account 'e'.access_token is written inline; secrets are references: {{env: NAME}} or "
        "{file: /path}",
    ]
