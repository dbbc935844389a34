"""``tracegate demo``: the whole path on this machine, with nothing to configure.

Starts a stand-in GitLab issuer and an OTLP sink on loopback, writes a one-rule policy,
starts tracegate between them, then exports a real span with the OpenTelemetry SDK using
a minted CI ID token, and shows what the sink received (the key redacted). Then it sends
a forged token and shows the refusal, and exports once more over OTLP/gRPC (port 4317's
door) to a gRPC sink. Exit 0 if everything happened as it should.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from proxy.dev.standins import GrpcSink, Sink, StandInIssuer
from proxy.observe.audit import AuditLog
from proxy.run.server import start
from proxy.secrets import Secret
from proxy.settings.config import Settings

POLICY = """\
issuers:
  demo-gitlab:
    issuer: {issuer}
    audiences: [tracegate]
service_accounts:
  checkout-ci:
    access_token: {{env: LS_TOKEN_CHECKOUT}}
    signals: [traces, metrics, logs]
rules:
  - name: checkout-protected-refs
    issuer: demo-gitlab
    when: {{project_path: "shop/checkout", ref_protected: "true"}}
    service_account: checkout-ci
"""


class _AuditTap:
    """Collects the audit records tracegate writes, to show them."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def __call__(self, text: str) -> None:
        self.lines += [json.loads(line) for line in text.splitlines()]


def _export(endpoint: str, token: str, *, grpc: bool = False) -> bool:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout", "service.version": "1.4.2"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("tracegate.demo").start_as_current_span("ci-job: test"):
        pass
    provider.shutdown()
    headers = {"authorization": f"Bearer {token}"}
    exporter: OTLPSpanExporter | GrpcSpanExporter
    if grpc:  # what OTEL_EXPORTER_OTLP_PROTOCOL=grpc selects
        exporter = GrpcSpanExporter(endpoint=endpoint, insecure=True, headers=headers, timeout=10)
    else:
        exporter = OTLPSpanExporter(endpoint=endpoint, headers=headers, timeout=10)
    try:
        return exporter.export(memory.get_finished_spans()) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()


async def run_demo() -> int:
    tap = _AuditTap()
    issuer, sink, grpc_sink = StandInIssuer(), Sink(), GrpcSink()
    await issuer.start()
    await sink.start()
    await grpc_sink.start()
    key = Secret("lsdemo-" + secrets.token_hex(16))
    with tempfile.TemporaryDirectory() as tmp:
        policies = Path(tmp) / "policies"
        policies.mkdir()
        (policies / "demo.yaml").write_text(POLICY.format(issuer=issuer.url))
        flags = {
            "policies": str(policies),
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "upstream": sink.url,
            "data_dir": str(Path(tmp) / "data"),
            "grpc_listen": "127.0.0.1:0",
            "grpc_upstream": grpc_sink.target,
        }
        runtime, runners = await start(
            Settings.load(flags, {}), {"LS_TOKEN_CHECKOUT": key.reveal()}, audit=AuditLog(tap, flush_interval=0)
        )
        url = f"http://127.0.0.1:{runners[0].addresses[0][1]}"
        try:
            for _ in range(200):
                if not runtime.issuers_without_keys():
                    break
                await asyncio.sleep(0.025)
            ok = await _story(url, issuer, sink, key, tap)
            grpc_port = runtime.grpc_address[1] if runtime.grpc_address is not None else 0
            ok = await _grpc_story(grpc_port, issuer, grpc_sink, key, tap) and ok
        finally:
            for runner in runners:
                await runner.cleanup()
            await issuer.stop()
            await sink.stop()
            await grpc_sink.stop()
    print("\ndemo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


async def _story(url: str, issuer: StandInIssuer, sink: Sink, key: Secret, tap: _AuditTap) -> bool:
    print(f"stand-in issuer  {issuer.url}  (OIDC discovery + JWKS, RSA and EC keys)")
    print(f"OTLP sink        {sink.url}  (plays Lightstep)")
    print(f"tracegate        {url}/v1/traces")
    token = issuer.mint(
        project_path="shop/checkout", namespace_path="shop", sub="project_path:shop/checkout:ref_type:branch:ref:main"
    )
    print("\n1. a CI job exports a span with the OpenTelemetry SDK, its ID token as the bearer credential")
    accepted = await asyncio.to_thread(_export, url + "/v1/traces", token)
    got = sink.received[-1] if sink.received else None
    print(f"   exporter result: {'SUCCESS' if accepted else 'FAILURE'}")
    injected = got is not None and got.headers.getall("lightstep-access-token", []) == [key.reveal()]
    if got is not None:
        print(f"   sink received {len(got.body)} bytes at {got.path}")
        print(f"   lightstep-access-token upstream: {key.redacted()}  (the service account's key: {injected})")
        print(
            f"   client's Authorization header upstream: {'present!' if 'Authorization' in got.headers else 'removed'}"
        )
    if tap.lines:
        line = tap.lines[-1]
        print(
            f"   audit: decision={line['decision']} rule={line['rule']} account={line['service_account']} "
            f"project={line['project_path']} pipeline={line['pipeline_id']} upstream={line['upstream_status']}"
        )

    print("\n2. the same request with a forged token (claims edited, signature kept)")
    head, _, sig = token.split(".")
    forged_claims = issuer.mint(project_path="shop/admin").split(".")[1]
    before = len(sink.received)
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            url + "/v1/traces",
            data=b"",
            headers={"Authorization": f"Bearer {head}.{forged_claims}.{sig}", "Content-Type": "application/json"},
        ) as resp,
    ):
        refused_status, refused_body = resp.status, await resp.text()
    print(f"   HTTP {refused_status} {refused_body}")
    if tap.lines:
        print(f"   audit: decision={tap.lines[-1]['decision']} reason={tap.lines[-1]['reason']}")
    print(f"   requests that reached the sink: {len(sink.received) - before}")
    return bool(
        accepted
        and injected
        and got is not None
        and "Authorization" not in got.headers
        and refused_status == 401
        and len(sink.received) == before
    )


async def _grpc_story(port: int, issuer: StandInIssuer, sink: GrpcSink, key: Secret, tap: _AuditTap) -> bool:
    print(f"\n3. the same CI job exporting over OTLP/gRPC (OTEL_EXPORTER_OTLP_PROTOCOL=grpc) to 127.0.0.1:{port}")
    print(f"   gRPC sink {sink.target} plays Lightstep's ingest.lightstep.com:443")
    token = issuer.mint(
        project_path="shop/checkout", namespace_path="shop", sub="project_path:shop/checkout:ref_type:branch:ref:main"
    )
    accepted = await asyncio.to_thread(_export, f"http://127.0.0.1:{port}", token, grpc=True)
    got = sink.received[-1] if sink.received else None
    print(f"   exporter result: {'SUCCESS' if accepted else 'FAILURE'}")
    injected = got is not None and got.values("lightstep-access-token") == [key.reveal()]
    if got is not None:
        print(f"   sink received {len(got.body)} bytes via {got.method}")
        print(f"   lightstep-access-token upstream: {key.redacted()}  (the service account's key: {injected})")
        print(
            f"   client's authorization metadata upstream: {'present!' if got.values('authorization') else 'removed'}"
        )
    if tap.lines:
        line = tap.lines[-1]
        print(
            f"   audit: transport={line['transport']} decision={line['decision']} account={line['service_account']} "
            f"upstream={line['upstream_status']}"
        )
    return bool(accepted and injected and got is not None and not got.values("authorization"))
