"""Every backend profile on the wire: a real tracegate between the real OpenTelemetry SDK
exporters (OTLP/HTTP protobuf and OTLP/gRPC) or a raw OTLP/JSON client, and recording sinks
that stand in for each vendor's endpoint (the account's ``upstream:``/``grpc_upstream:``).

What the sinks must see is written out here from each vendor's documentation (the sources are
in tests/test_backends.py), not computed by proxy/backends/profiles.py: the exact path, the
exact credential header(s) (Grafana's Basic value decoded), the extra headers (Honeycomb's
dataset on metrics, Datadog's source on traces), the body bytes unchanged, and nothing of the
client's credentials: neither its bearer token nor its own copy of a header the backend sets,
even when the operator's header allowlist names it. Every output (logs, audit lines, metrics,
answers) is scanned for the secrets. One tracegate per profile."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from proxy.dev.standins import GrpcSink, Received, Sink, StandInIssuer, free_port
from tests.conftest import Tracegate
from tests.grpc_clients import METHOD, _logs, _metrics, _spans, sdk_export

SIGNALS = ("traces", "metrics", "logs")
ALL = frozenset(SIGNALS)
KEY = "bk-ingest-secret-5f1e0c9a7b3d2e4f"
GC_ID = "918273"
ENV = {"BACKEND_KEY": KEY, "GC_ID": GC_ID, "TRACEGATE_GRPC_LISTEN": "off"}
BASIC = "Basic " + base64.b64encode(f"{GC_ID}:{KEY}".encode()).decode()
#: What must never appear in any output: the key, the composed Basic credential, its pair.
SECRETS = (KEY, BASIC.removeprefix("Basic "), f"{GC_ID}:{KEY}")
#: Nowhere upstream: a client's own value for a header the backend sets.
CLIENT_COPY = "client-copy-must-not-pass"
#: An operator-allowed client header (TRACEGATE_FORWARD_HEADERS), to show the allowlist works.
CI_RUN = ("x-ci-run", "4711")
#: The allowlist also names every backend header a client might send: the route still wins.
FORWARD = "x-ci-run,x-honeycomb-team,x-honeycomb-dataset,dd-api-key,dd-otlp-source,api-key,x-sf-token,x-api-key"
#: What the HTTP sink may see besides the route's headers: framing, the allowlist, the client's own.
HTTP_BASE = frozenset({"host", "content-type", "content-length", "accept-encoding", "accept", "user-agent", CI_RUN[0]})
LIGHTSTEP_PATHS = {s: f"/{s}/otlp/v0.9" for s in SIGNALS}
V1 = {s: f"/v1/{s}" for s in SIGNALS}
#: Signal-shaped OTLP/JSON bodies (tracegate does not parse them: the bytes must arrive unchanged).
JSON_BODIES = {
    "traces": b'{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"ci"}}]},'
    b'"scopeSpans":[{"spans":[{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174",'
    b'"name":"ci-job","kind":1,"startTimeUnixNano":"1","endTimeUnixNano":"2"}]}]}]}',
    "metrics": b'{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":"ci.jobs","sum":{"dataPoints":'
    b'[{"asInt":"3","timeUnixNano":"2"}],"aggregationTemporality":1,"isMonotonic":true}}]}]}]}',
    "logs": b'{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"timeUnixNano":"2","body":{"stringValue":"done"}}]}]}]}',
}


def _same(*pairs: tuple[str, str]) -> dict[str, tuple[tuple[str, str], ...]]:
    return {s: pairs for s in SIGNALS}


@dataclass(frozen=True)
class Case:
    """One profile: the account's keys (YAML; ``{http}``/``{grpc}`` are the sinks), and what the
    vendor's endpoint must receive per signal it accepts."""

    keys: str
    paths: Mapping[str, str]
    headers: Mapping[str, tuple[tuple[str, str], ...]]
    #: Signals whose gRPC clients reach the gRPC sink; the others are bridged to OTLP/HTTP protobuf.
    grpc: frozenset[str] = frozenset()
    #: Signals the backend takes as OTLP/JSON; JSON for the others is refused (415).
    json: frozenset[str] = ALL
    settings: Mapping[str, str] = field(default_factory=dict)

    @property
    def signals(self) -> tuple[str, ...]:
        return tuple(s for s in SIGNALS if s in self.paths)


TOKEN = "access_token: {{env: BACKEND_KEY}}"
HNY_TEAM = ("x-honeycomb-team", KEY)
DD_KEY = ("dd-api-key", KEY)
CASES: dict[str, Case] = {
    # Today's behaviour, byte for byte: Lightstep's paths, one lightstep-access-token.
    "lightstep": Case(
        f"{TOKEN}\nupstream: {{http}}\ngrpc_upstream: {{grpc}}",
        LIGHTSTEP_PATHS,
        _same(("lightstep-access-token", KEY)),
        grpc=ALL,
    ),
    "honeycomb": Case(
        f"backend: honeycomb\n{TOKEN}\ndataset: ci-metrics\nupstream: {{http}}\ngrpc_upstream: {{grpc}}",
        V1,
        {"traces": (HNY_TEAM,), "metrics": (HNY_TEAM, ("x-honeycomb-dataset", "ci-metrics")), "logs": (HNY_TEAM,)},
        grpc=ALL,
    ),
    # OTLP/HTTP only (gRPC clients bridged); the base path /otlp; Basic base64(instance id:token).
    "grafana-cloud": Case(
        f"backend: grafana-cloud\ninstance_id: {{{{env: GC_ID}}}}\n{TOKEN}\nupstream: {{http}}",
        {s: f"/otlp/v1/{s}" for s in SIGNALS},
        _same(("authorization", BASIC)),
    ),
    # OTLP/HTTP only; logs protobuf only; traces carry dd-otlp-source.
    "datadog": Case(
        f"backend: datadog\n{TOKEN}\notlp_source: acme\nupstream: {{http}}",
        V1,
        {"traces": (DD_KEY, ("dd-otlp-source", "acme")), "metrics": (DD_KEY,), "logs": (DD_KEY,)},
        json=frozenset({"traces", "metrics"}),
    ),
    "newrelic": Case(
        f"backend: newrelic\n{TOKEN}\nupstream: {{http}}\ngrpc_upstream: {{grpc}}",
        V1,
        _same(("api-key", KEY)),
        grpc=ALL,
        json=frozenset(),
    ),
    # A platform token: Authorization: Bearer <token>, where the client's own Bearer (its ID token) was.
    "dynatrace": Case(
        f"backend: dynatrace\n{TOKEN}\ntoken_type: platform\nupstream: {{http}}",
        {s: f"/api/v2/otlp/v1/{s}" for s in SIGNALS},
        _same(("authorization", f"Bearer {KEY}")),
        json=frozenset(),
    ),
    "elastic": Case(
        f"backend: elastic\n{TOKEN}\nupstream: {{http}}\ngrpc_upstream: {{grpc}}",
        V1,
        _same(("authorization", f"ApiKey {KEY}")),
        grpc=ALL,
        json=frozenset(),
    ),
    # No OTLP logs; gRPC documented for traces only (metrics bridged); Splunk's own paths.
    "splunk": Case(
        f"backend: splunk\n{TOKEN}\nupstream: {{http}}\ngrpc_upstream: {{grpc}}",
        {"traces": "/v2/trace/otlp", "metrics": "/v2/datapoint/otlp"},
        {s: (("x-sf-token", KEY),) for s in ("traces", "metrics")},
        grpc=frozenset({"traces"}),
        json=frozenset(),
    ),
    "otlp": Case(
        "backend: otlp\nheaders: {{x-api-key: {{env: BACKEND_KEY}}, x-scope-orgid: acme}}\n"
        "upstream: {http}\ngrpc_upstream: {grpc}",
        V1,
        _same(("x-api-key", KEY), ("x-scope-orgid", "acme")),
        grpc=ALL,
    ),
}


def policy(issuer_url: str, accounts: Mapping[str, str]) -> str:
    """``accounts``: name -> its keys (YAML); a rule per account on project_path ``<name>/*``."""
    lines = ["issuers:", "  gitlab:", f"    issuer: {issuer_url}", "    audiences: [tracegate]", "service_accounts:"]
    for name, keys in accounts.items():
        lines += [f"  {name}:", *(f"    {line}" for line in keys.splitlines())]
    lines.append("rules:")
    for name in accounts:
        lines += [f"  - name: {name}", "    issuer: gitlab", f'    when: {{project_path: "{name}/*"}}']
        lines.append(f"    service_account: {name}")
    return "\n".join(lines) + "\n"


@pytest.fixture
async def grpc_sink() -> AsyncIterator[GrpcSink]:
    server = GrpcSink()
    await server.start()
    yield server
    await server.stop()


async def start(start_tracegate: Callable[..., Any], text: str, **overrides: str) -> tuple[Tracegate, int]:
    # TRACEGATE_UPSTREAM / _GRPC_UPSTREAM lead nowhere: only the account's own endpoint may be used.
    settings = {
        "upstream": "http://127.0.0.1:9",
        "grpc_upstream": "http://127.0.0.1:9",
        "grpc_listen": "127.0.0.1:0",
        "forward_headers": FORWARD,
        **{f"path_{s}": p for s, p in LIGHTSTEP_PATHS.items()},
        **overrides,
    }
    tg: Tracegate = await start_tracegate(text, env=ENV, **settings)
    await tg.keys_ready()
    assert tg.runtime.grpc_address is not None
    return tg, tg.runtime.grpc_address[1]


def client_headers(case: Case, signal: str, token: str, *, lightstep: bool) -> dict[str, str]:
    """The client's credential (Lightstep exporters put it in lightstep-access-token), its own
    copy of every other header the backend sets, and one header the operator allows."""
    headers = {"lightstep-access-token": token} if lightstep else {"authorization": f"Bearer {token}"}
    for name, _ in case.headers[signal]:
        headers.setdefault(name, CLIENT_COPY)
    return {**headers, CI_RUN[0]: CI_RUN[1]}


def sdk_http_export(signal: str, endpoint: str, headers: dict[str, str]) -> tuple[bool, bytes]:
    """One batch with the SDK's OTLP/HTTP protobuf exporter (blocking: run it in a thread);
    whether it succeeded, and the bytes it sent (the exporters' shared encoding)."""
    from opentelemetry.exporter.otlp.proto.http import _log_exporter, metric_exporter, trace_exporter

    data, sent = {"traces": _spans, "metrics": _metrics, "logs": _logs}[signal]()
    exporter_class: Any = {
        "traces": trace_exporter.OTLPSpanExporter,
        "metrics": metric_exporter.OTLPMetricExporter,
        "logs": _log_exporter.OTLPLogExporter,
    }[signal]
    exporter = exporter_class(endpoint=endpoint, headers=headers, timeout=10)
    try:
        result = exporter.export(data)
    finally:
        exporter.shutdown()
    return result.name == "SUCCESS", sent


def assert_http_wire(got: Received, case: Case, signal: str, body: bytes, content_type: str, token: str) -> None:
    expected = case.headers[signal]
    assert (got.method, got.path) == ("POST", case.paths[signal])
    for name, value in expected:
        assert got.headers.getall(name) == [value], name
    names = {n.lower() for n in got.headers}
    assert names - HTTP_BASE == {n for n, _ in expected}  # nothing else of the client's
    assert got.headers["Content-Type"] == content_type
    assert got.body == body
    values = " ".join(got.headers.values())
    assert token not in values and CLIENT_COPY not in values


def assert_basic(value: str) -> None:
    """Grafana Cloud's credential, decoded: instance id and access-policy token."""
    scheme, _, encoded = value.partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded, validate=True).decode() == f"{GC_ID}:{KEY}"


def assert_no_secret(text: str, token: str) -> None:
    for secret in (*SECRETS, token, token.rsplit(".", 1)[1]):
        assert secret not in text


@pytest.mark.parametrize("name", list(CASES))
async def test_every_profile_on_the_wire(
    name: str,
    start_tracegate: Callable[..., Any],
    issuer: StandInIssuer,
    sink: Sink,
    grpc_sink: GrpcSink,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    case = CASES[name]
    keys = case.keys.format(http=sink.url, grpc=grpc_sink.target)
    tg, port = await start(start_tracegate, policy(issuer.url, {"ci": keys}))
    token = issuer.mint(project_path="ci/app")
    outputs: list[str] = []
    lightstep = name == "lightstep"
    for signal in case.signals:
        headers = client_headers(case, signal, token, lightstep=lightstep)

        # 1. OTLP/HTTP protobuf, the real SDK exporter.
        sink.received.clear()
        ok, sent = await asyncio.to_thread(sdk_http_export, signal, f"{tg.url}/v1/{signal}", headers)
        assert ok, signal
        (got,) = sink.received
        assert_http_wire(got, case, signal, sent, "application/x-protobuf", token)
        if name == "grafana-cloud":
            assert_basic(got.headers["authorization"])

        # 2. OTLP/JSON, where the backend takes it (the refusal: test_json_to_a_protobuf_only_backend).
        if signal in case.json:
            sink.received.clear()
            body = JSON_BODIES[signal]
            async with client.post(
                f"{tg.url}/v1/{signal}", data=body, headers={**headers, "Content-Type": "application/json"}
            ) as resp:
                assert resp.status == 200, signal
                outputs.append(f"{resp.headers!r} {await resp.text()}")
            (got,) = sink.received
            assert_http_wire(got, case, signal, body, "application/json", token)

        # 3. OTLP/gRPC, the real SDK exporter: to the gRPC sink, or bridged to OTLP/HTTP protobuf.
        sink.received.clear()
        grpc_sink.received.clear()
        metadata = {k: v for k, v in headers.items()}
        ok, sent = await asyncio.to_thread(sdk_export, signal, f"http://127.0.0.1:{port}", metadata)
        assert ok, signal
        if signal in case.grpc:
            assert sink.received == []
            (call,) = grpc_sink.received
            assert (call.method, call.body) == (METHOD[signal], sent)
            for header, value in case.headers[signal]:
                assert call.values(header) == [value], header
            assert call.values(CI_RUN[0]) == [CI_RUN[1]]
            shown = repr(call.metadata)
            assert token not in shown and CLIENT_COPY not in shown
            if not lightstep:
                assert call.values("lightstep-access-token") == []
            if all(h != "authorization" for h, _ in case.headers[signal]):
                assert call.values("authorization") == []
        else:
            assert grpc_sink.received == []
            (got,) = sink.received
            assert_http_wire(got, case, signal, sent, "application/x-protobuf", token)

    # A signal the backend does not take is not granted at all (check refuses a rule asking for it).
    for signal in (s for s in SIGNALS if s not in case.paths):
        sink.received.clear()
        async with client.post(
            f"{tg.url}/v1/{signal}",
            data=b"\x0a\x00",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-protobuf"},
        ) as resp:
            assert resp.status == 403
            outputs.append(await resp.text())
        assert sink.received == [] and grpc_sink.received == []
        assert tg.audit()[-1]["reason"] == "signal-not-allowed"

    allowed = [r for r in tg.audit() if r["decision"] == "allowed"]
    assert len(allowed) == sum(3 if s in case.json else 2 for s in case.signals)
    assert {r["service_account"] for r in allowed} == {"ci"}
    async with client.get(f"{tg.admin_url}/metrics") as resp:
        outputs.append(await resp.text())
    assert_no_secret("\n".join([caplog.text, *tg.audit_lines, *outputs]), token)


PROTOBUF_ONLY = {name: case for name, case in CASES.items() if case.json != ALL}


async def test_json_to_a_protobuf_only_backend_is_refused_before_anything_is_sent(
    start_tracegate: Callable[..., Any],
    issuer: StandInIssuer,
    sink: Sink,
    grpc_sink: GrpcSink,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One tracegate, one account per protobuf-only profile (project ``<name>/…``): every JSON
    export to a signal taken as protobuf only is answered 415 in JSON, audited as
    ``backend-json-unsupported``, and nothing reaches either sink."""
    accounts = {name: case.keys.format(http=sink.url, grpc=grpc_sink.target) for name, case in PROTOBUF_ONLY.items()}
    assert set(accounts) == {"datadog", "newrelic", "dynatrace", "elastic", "splunk"}
    tg, _ = await start(start_tracegate, policy(issuer.url, accounts))
    outputs: list[str] = []
    for name, case in PROTOBUF_ONLY.items():
        token = issuer.mint(project_path=f"{name}/app")
        for signal in (s for s in case.signals if s not in case.json):
            headers = {**client_headers(case, signal, token, lightstep=False), "Content-Type": "application/json"}
            async with client.post(f"{tg.url}/v1/{signal}", data=JSON_BODIES[signal], headers=headers) as resp:
                text = await resp.text()
                assert (resp.status, resp.content_type) == (415, "application/json"), (name, signal, text)
                outputs.append(text)
            assert set(json.loads(text)) == {"code", "message"}  # google.rpc.Status, as every refusal
            record = tg.audit()[-1]
            assert (record["service_account"], record["signal"], record["reason"]) == (
                name,
                signal,
                "backend-json-unsupported",
            )
            assert sink.received == [] and grpc_sink.received == []
            assert_no_secret(text, token)
    async with client.get(f"{tg.admin_url}/metrics") as resp:
        outputs.append(await resp.text())
    assert_no_secret("\n".join([caplog.text, *tg.audit_lines, *outputs]), token)


#: A port of the test's choosing (never 4317/4318, which a local Collector may hold).
PORT = free_port()


@pytest.mark.parametrize(
    ("entry", "target"),
    [
        # Was ingest.None.signalfx.com:443 (no realm when upstream places the endpoint).
        ({"backend": "splunk", "upstream": "https://splunk-gw.example.com"}, "splunk-gw.example.com:443"),
        # Was api.honeycomb.io:443: an EU (or Refinery) endpoint's gRPC clients went to the US with its key.
        ({"backend": "honeycomb", "upstream": "https://api.eu1.honeycomb.io"}, "api.eu1.honeycomb.io:443"),
        ({"backend": "newrelic", "upstream": "https://otlp.eu01.nr-data.net"}, "otlp.eu01.nr-data.net:443"),
        ({"backend": "elastic", "upstream": "https://e.example.com:8200"}, "e.example.com:8200"),
        ({"backend": "honeycomb", "upstream": f"http://127.0.0.1:{PORT}"}, f"http://127.0.0.1:{PORT}"),
        # Was http://::1:PORT, which passed check and failed on the first gRPC call (not HOST:PORT).
        ({"backend": "elastic", "upstream": f"http://[::1]:{PORT}"}, f"http://[::1]:{PORT}"),
    ],
)
def test_an_endpoint_placed_by_upstream_alone_takes_its_grpc_clients_too(entry: dict[str, str], target: str) -> None:
    """Where the vendor serves OTLP/gRPC and OTLP/HTTP on one host, ``upstream:`` alone places both."""
    from proxy.backends.profiles import parse_backend, preview
    from proxy.urls import check_grpc_target

    spec, problems = parse_backend({**entry, "access_token": {"env": "BACKEND_KEY"}})
    assert problems == [] and spec is not None
    assert {r.grpc for r in preview(spec).routes.values()} - {None} == {target}
    assert check_grpc_target(target) is None
