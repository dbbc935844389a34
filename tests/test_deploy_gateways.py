"""The shipped gateway configurations (deploy/) hold what their contract with tracegate needs.

Envoy, Traefik and Envoy Gateway cannot run here: their files are parsed as YAML, checked
for the keys the contract depends on, and then tracegate is sent a check built *from the
file's own values* (path prefix, the headers the gateway forwards, the secret header), and
its answer must carry every header the file tells the gateway to copy upstream.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.answers import _BY_STATUS, status_protobuf
from proxy.dev.standins import StandInIssuer
from proxy.doors.authz import SECRET_HEADER
from tests.conftest import PAYMENTS_KEY, Tracegate, environ, policy_yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def load(path: str) -> list[Any]:
    return list(yaml.safe_load_all((DEPLOY / path).read_text()))


def ext_authz_filters(envoy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Listener name → its ext_authz filter config."""
    found = {}
    for listener in envoy["static_resources"]["listeners"]:
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        names = [f["name"] for f in manager["http_filters"]]
        assert names[-1] == "envoy.filters.http.router"
        assert names.index("envoy.filters.http.ext_authz") < names.index("envoy.filters.http.router")
        for route in manager["route_config"]["virtual_hosts"][0]["routes"]:
            assert route["request_headers_to_remove"] == ["authorization"]
        found[listener["name"]] = next(
            f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"
        )
    return found


def patterns(matcher: dict[str, Any]) -> list[str]:
    return [p["exact"] for p in matcher["patterns"]]


def test_nginx_error_bodies_are_the_otlp_status_tracegate_itself_writes() -> None:
    errors = DEPLOY / "nginx" / "errors"
    for status in (401, 403):
        code, message = _BY_STATUS[status]
        assert (errors / f"{status}.pb").read_bytes() == status_protobuf(code, message)
        assert json.loads((errors / f"{status}.json").read_text()) == {"code": code, "message": message}
    assert (errors / "503.pb").read_bytes() == status_protobuf(14, "authorization unavailable; retry")
    assert json.loads((errors / "503.json").read_text())["code"] == 14


def test_nginx_template_documents_every_placeholder() -> None:
    import re

    text = (DEPLOY / "nginx" / "tracegate-gateway.conf").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    for name in set(re.findall(r"\{\{([A-Z_]+)\}\}", body)):
        assert re.search(rf"#   {name}\b|{name.rsplit('_', 1)[0]}_\w+ / ", header), name
    for needed in ("proxy_cache_methods GET HEAD POST", "proxy_pass_request_body off", "grpc_pass", "auth_request "):
        assert needed in body
    assert 'proxy_set_header Authorization "";' in body and 'grpc_set_header Authorization "";' in body


async def test_envoy_config_and_tracegate_agree_on_the_check(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    [envoy] = load("envoy/envoy.yaml")
    filters = ext_authz_filters(envoy)
    assert set(filters) == {"otlp_http", "otlp_grpc"}
    config = filters["otlp_http"]["typed_config"]
    assert filters["otlp_grpc"]["typed_config"] == config  # one check contract for HTTP and gRPC
    assert config["failure_mode_allow"] is False
    service = config["http_service"]
    prefix = service["path_prefix"]
    forwarded = patterns(config["allowed_headers"])
    assert {"authorization", "lightstep-access-token"} <= set(forwarded)
    upstream = patterns(service["authorization_response"]["allowed_upstream_headers"])
    assert upstream == ["lightstep-access-token"]
    assert {"www-authenticate", "retry-after"} <= set(
        patterns(service["authorization_response"]["allowed_client_headers"])
    )
    [added] = service["authorization_request"]["headers_to_add"]
    assert added["key"].lower() == SECRET_HEADER.lower()
    grpc_manager = envoy["static_resources"]["listeners"][1]["filter_chains"][0]["filters"][0]["typed_config"]
    assert grpc_manager["codec_type"] == "HTTP2"

    env = {**environ(), "AUTHZ_SECRET": added["value"]}
    tg: Tracegate = await start_tracegate(
        policy_yaml(issuer.url),
        env=env,
        authz_listen="127.0.0.1:0",
        authz_dialect="envoy",
        authz_path_prefix=prefix,
        authz_secret="env:AUTHZ_SECRET",
    )
    await tg.keys_ready()
    url = f"http://127.0.0.1:{tg.runners[2].addresses[0][1]}"
    client_headers = {"authorization": f"Bearer {issuer.mint()}", "content-type": "application/grpc", "cookie": "x"}
    check = {k: v for k, v in client_headers.items() if k in forwarded}
    check[added["key"]] = added["value"]
    async with client.post(
        url + prefix + "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export", headers=check
    ) as resp:
        assert resp.status == 200
        for name in upstream:
            assert resp.headers[name] == PAYMENTS_KEY
        assert resp.headers["x-envoy-auth-headers-to-remove"] == "authorization"


async def test_traefik_config_and_tracegate_agree_on_the_check(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    [traefik] = load("traefik/tracegate.yaml")
    middlewares = traefik["http"]["middlewares"]
    auth = middlewares["tracegate-auth"]["forwardAuth"]
    assert auth["trustForwardHeader"] is False
    assert middlewares["strip-credential"]["headers"]["customRequestHeaders"]["Authorization"] == ""
    for name, router in traefik["http"]["routers"].items():
        assert router["middlewares"][:2] == ["tracegate-auth", "strip-credential"], name
    tg: Tracegate = await start_tracegate(policy_yaml(issuer.url), authz_listen="127.0.0.1:0", authz_dialect="traefik")
    await tg.keys_ready()
    path = "/" + auth["address"].split("/", 3)[3]
    url = f"http://127.0.0.1:{tg.runners[2].addresses[0][1]}"
    client_headers = {"Authorization": f"Bearer {issuer.mint()}", "Content-Type": "application/x-protobuf"}
    check = {k: v for k, v in client_headers.items() if k in auth["authRequestHeaders"]}
    check.update({"X-Forwarded-Method": "POST", "X-Forwarded-Uri": "/v1/traces", "X-Forwarded-Proto": "http"})
    async with client.get(url + path, headers=check) as resp:
        assert resp.status == 200
        for name in auth["authResponseHeaders"]:
            assert resp.headers[name] == PAYMENTS_KEY


async def test_envoy_gateway_policy_and_route_and_tracegate_agree(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    docs = {d["kind"]: d for d in load("gateway-api/tracegate.yaml")}
    assert set(docs) == {"HTTPRoute", "Backend", "SecurityPolicy"}
    route, policy = docs["HTTPRoute"], docs["SecurityPolicy"]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert policy["spec"]["targetRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": route["metadata"]["name"]}
    ]
    for rule in route["spec"]["rules"]:
        removed = [f for f in rule["filters"] if f["type"] == "RequestHeaderModifier"]
        assert removed[0]["requestHeaderModifier"]["remove"] == ["authorization"]
    ext = policy["spec"]["extAuth"]
    assert ext["failOpen"] is False
    http = ext["http"]
    assert http["headersToBackend"] == ["lightstep-access-token"]
    tg: Tracegate = await start_tracegate(
        policy_yaml(issuer.url), authz_listen="127.0.0.1:0", authz_dialect="envoy", authz_path_prefix=http["path"]
    )
    await tg.keys_ready()
    url = f"http://127.0.0.1:{tg.runners[2].addresses[0][1]}"
    client_headers = {"authorization": f"Bearer {issuer.mint()}", "content-type": "application/x-protobuf"}
    check = {k: v for k, v in client_headers.items() if k in ext["headersToExtAuth"]}
    for rule in route["spec"]["rules"]:
        path = rule["matches"][0]["path"]["value"]
        async with client.post(url + http["path"] + path, headers=check) as resp:
            assert resp.status == 200
            assert resp.headers["lightstep-access-token"] == PAYMENTS_KEY


def test_nginx_template_is_valid_for_a_tls_upstream(tmp_path: Path) -> None:
    """The production rendering (https and grpcs to Lightstep, verified TLS) passes ``nginx -t``."""
    import subprocess

    from tests.nginx_gateway import NginxGateway
    from tests.system import require_program

    nginx = require_program("nginx", "nginx", "/usr/sbin/nginx")
    gw = NginxGateway(
        nginx, tmp_path, "127.0.0.1:4319", "127.0.0.1:443", "127.0.0.1:443", scheme="https", grpc_scheme="grpcs"
    )
    gw.http_port, gw.grpc_port = 4318, 4317  # nginx -t checks the config without binding
    config = gw.config()
    assert config.count("https://tracegate_otlp_http") == 3 and config.count("grpcs://") == 3
    (tmp_path / "nginx.conf").write_text(config)
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")], capture_output=True, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
