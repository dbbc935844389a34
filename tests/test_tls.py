"""TLS and mTLS on the ingest listener, end to end with the real OpenTelemetry SDK, and the
certificate reloaded on SIGHUP without closing the listener."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from proxy.dev.standins import Sink, StandInIssuer
from proxy.errors import ConfigError
from proxy.settings.config import Settings
from proxy.settings.tls import TlsFiles, server_context
from tests.certs import Issued, TestCA
from tests.conftest import PAYMENTS_KEY, Tracegate, policy_yaml
from tests.test_ingest import export_span


@pytest.fixture
def ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TestCA:
    # requests lets these override the exporter's own CA file (a requests quirk); a CI
    # machine may set them for its package mirror.
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    return TestCA(tmp_path / "pki")


async def start_tls(start_tracegate: Any, issuer: StandInIssuer, server: Issued, **more: str) -> tuple[Tracegate, str]:
    tg: Tracegate = await start_tracegate(
        policy_yaml(issuer.url), tls_cert=str(server.cert), tls_key=str(server.key), **more
    )
    await tg.keys_ready()
    return tg, tg.url.replace("http://", "https://")


async def test_sdk_exports_over_tls_with_otel_exporter_otlp_certificate(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tg, url = await start_tls(start_tracegate, issuer, ca.issue("tracegate"))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(ca.cert))  # as a pipeline would set it
    headers = {"authorization": f"Bearer {issuer.mint()}"}
    result = await asyncio.to_thread(export_span, url + "/v1/traces", headers)
    assert result.name == "SUCCESS"
    assert [r.headers["lightstep-access-token"] for r in sink.received] == [PAYMENTS_KEY]


async def test_mtls_refuses_a_client_without_a_certificate_and_serves_one_with(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tg, url = await start_tls(start_tracegate, issuer, ca.issue("tracegate"), tls_client_ca=str(ca.cert))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(ca.cert))
    headers = {"authorization": f"Bearer {issuer.mint()}"}
    result = await asyncio.to_thread(export_span, url + "/v1/traces", headers, timeout=2)
    assert result.name == "FAILURE"
    assert sink.received == []
    client = ca.issue("ci-runner", server=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", str(client.cert))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CLIENT_KEY", str(client.key))
    result = await asyncio.to_thread(export_span, url + "/v1/traces", headers)
    assert result.name == "SUCCESS"
    assert len(sink.received) == 1


async def _served_serial(url: str, ca: Path) -> int:
    host, port = url.removeprefix("https://").split(":")
    context = ssl.create_default_context(cafile=str(ca))
    _reader, writer = await asyncio.open_connection(host, int(port), ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return x509.load_der_x509_certificate(der).serial_number


async def test_sighup_reloads_the_certificate_and_keeps_open_connections(
    start_tracegate: Any, issuer: StandInIssuer, ca: TestCA
) -> None:
    first = ca.issue("tracegate")
    tg, url = await start_tls(start_tracegate, issuer, first)
    host, port = url.removeprefix("https://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), ssl=ssl.create_default_context(cafile=str(ca.cert)))
    assert await _served_serial(url, ca.cert) == first.serial
    second = ca.issue("tracegate")  # same paths, new certificate and key: as a renewal writes them
    assert second.serial != first.serial
    assert await tg.runtime.reload()
    assert await _served_serial(url, ca.cert) == second.serial
    # The connection opened before the reload still works.
    writer.write(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 404")
    writer.close()
    assert tg.metric("tracegate_tls_reloads_total", result="ok") == 1


async def test_a_broken_certificate_on_reload_keeps_the_old_one(
    start_tracegate: Any, issuer: StandInIssuer, ca: TestCA
) -> None:
    first = ca.issue("tracegate")
    tg, url = await start_tls(start_tracegate, issuer, first)
    first.key.write_text("not a key")
    await tg.runtime.reload()
    assert tg.metric("tracegate_tls_reloads_total", result="failed") == 1
    assert await _served_serial(url, ca.cert) == first.serial


def test_tls_settings_errors_name_the_setting(tmp_path: Path, ca: TestCA) -> None:
    with pytest.raises(ConfigError, match="TRACEGATE_TLS_CERT and TRACEGATE_TLS_KEY"):
        Settings.load({"tls_cert": "/x.pem"}, {})
    with pytest.raises(ConfigError, match="TRACEGATE_TLS_CLIENT_CA needs"):
        Settings.load({"tls_client_ca": "/ca.pem"}, {})
    with pytest.raises(ConfigError, match=r"TRACEGATE_TLS_CERT=.*cannot load"):
        server_context(TlsFiles(tmp_path / "missing.pem", tmp_path / "missing.key"))
    server = ca.issue("tracegate")
    with pytest.raises(ConfigError, match=r"TRACEGATE_TLS_CLIENT_CA=.*cannot read"):
        server_context(TlsFiles(server.cert, server.key, tmp_path / "no-ca.pem"))


def test_listener_context_is_tls_1_2_or_later_without_compression(ca: TestCA) -> None:
    server = ca.issue("tracegate")
    context = server_context(TlsFiles(server.cert, server.key))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    assert all(
        "CBC" not in c["name"] and c["kea"] != "RSA" for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"
    )
