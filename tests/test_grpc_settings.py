"""The gRPC settings and policy keys: validated at load, with messages that say what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.errors import ConfigError
from proxy.grpc_status import from_http, retry_after_seconds
from proxy.policy import load_policy
from proxy.settings.config import Settings
from proxy.urls import grpc_address
from tests.test_policy import ENV, HEAD, problems, write


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ingest.lightstep.com:443", ("ingest.lightstep.com", 443, True)),
        ("https://ingest.eu.lightstep.com", ("ingest.eu.lightstep.com", 443, True)),
        ("http://127.0.0.1:4317", ("127.0.0.1", 4317, False)),
        ("http://[::1]:4317", ("::1", 4317, False)),
        ("localhost:4317", ("localhost", 4317, True)),
    ],
)
def test_grpc_targets(value: str, expected: tuple[str, int, bool]) -> None:
    assert grpc_address(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("http://ingest.lightstep.com:443", "must use TLS"),
        ("http://127.0.0.1", "needs a port"),
        ("grpc://x:1", "use HOST:PORT"),
        ("ingest.lightstep.com:443/path", "nothing else"),
        ("user:pw@ingest.lightstep.com:443", "nothing else"),
        ("ingest.lightstep.com:notaport", "not HOST:PORT"),
        ("", "nothing else"),
    ],
)
def test_bad_grpc_targets(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        grpc_address(value)


def test_settings() -> None:
    defaults = Settings.load({}, {})
    assert defaults.grpc_listen == ("0.0.0.0", 4317)
    assert defaults.grpc_upstream == "ingest.lightstep.com:443"
    assert Settings.load({"grpc_listen": "off"}, {}).grpc_listen is None
    assert defaults.grpc_upstream_ca == ""  # grpcio's own roots
    assert Settings.load({}, {"TRACEGATE_GRPC_UPSTREAM_CA": "/etc/ca.pem"}).grpc_upstream_ca == "/etc/ca.pem"
    assert Settings.load({}, {"TRACEGATE_GRPC_LISTEN": "127.0.0.1:14317"}).grpc_listen == ("127.0.0.1", 14317)
    with pytest.raises(ConfigError, match=r"TRACEGATE_GRPC_UPSTREAM='http://example.com:4317'.*must use TLS"):
        Settings.load({}, {"TRACEGATE_GRPC_UPSTREAM": "http://example.com:4317"})
    with pytest.raises(ConfigError, match=r"--grpc-listen='4317'.*HOST:PORT"):
        Settings.load({"grpc_listen": "4317"}, {})


def test_policy_keys_load(tmp_path: Path) -> None:
    extra = (
        "service_accounts:\n  bridged:\n    access_token: {env: LS_PAY}\n    upstream_protocol: http\n"
        "  eu:\n    access_token: {env: LS_PAY}\n    grpc_upstream: ingest.eu.lightstep.com:443\n"
    )
    policy = load_policy(write(tmp_path, HEAD, extra), environ=ENV)
    assert policy.service_accounts["bridged"].upstream_protocol == "http"
    assert policy.service_accounts["eu"].grpc_upstream == "ingest.eu.lightstep.com:443"
    assert policy.service_accounts["eu"].upstream_protocol == "grpc"
    assert policy.service_accounts["payments-ci"].grpc_upstream is None


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "service_accounts:\n  x:\n    access_token: {env: LS_PAY}\n    grpc_upstream: http://10.0.0.1:4317\n",
            "01.yaml:4: service account 'x'.grpc_upstream: 'http://10.0.0.1:4317' must use TLS",
        ),
        (
            "service_accounts:\n  x:\n    access_token: {env: LS_PAY}\n    upstream_protocol: thrift\n",
            "01.yaml:4: service account 'x'.upstream_protocol must be grpc or http",
        ),
    ],
)
def test_bad_policy_keys_name_file_and_line(tmp_path: Path, extra: str, expected: str) -> None:
    found = problems(tmp_path, HEAD, extra)
    assert any(expected in p for p in found), found


@pytest.mark.parametrize(
    ("status", "retry_after", "code", "delay"),
    [
        (200, None, "OK", None),
        (400, None, "INVALID_ARGUMENT", None),
        (401, None, "UNAUTHENTICATED", None),
        (413, "5", "RESOURCE_EXHAUSTED", None),
        (429, "2", "UNAVAILABLE", 2.0),
        (503, None, "UNAVAILABLE", None),
        (503, "Wed, 21 Oct 2015 07:28:00 GMT", "UNAVAILABLE", None),
        (500, None, "UNKNOWN", None),
    ],
)
def test_http_answers_map_to_grpc(status: int, retry_after: str | None, code: str, delay: float | None) -> None:
    answer = from_http(status, b"\x0a\x00", "application/x-protobuf", retry_after)
    assert answer.code.name == code
    assert bool(answer.trailers) == (delay is not None)
    assert retry_after_seconds(retry_after) == (float(retry_after) if retry_after and retry_after.isdigit() else None)
