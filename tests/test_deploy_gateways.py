"""The shipped gateway configurations (deploy/) hold what their contract with tracegate needs.

Envoy, Traefik and Envoy Gateway cannot run here: their files are parsed as YAML, checked
for the keys the contract depends on, and then tracegate is sent a check built *from the
file's own values* (path prefix, the headers the gateway forwards, the secret header), and
its answer must carry every header the file tells the gateway to copy upstream.

The credential headers every gateway passes through are derived here from
proxy/backends/profiles.py (:func:`credential_headers`: every profile built with placeholder
secrets), so a new profile's header that no shipped config names fails this file. Each
gateway's header handling is then replayed on tracegate's real answers, for a Lightstep, a
Honeycomb and a Grafana Cloud account, by the rules its own source follows (cited where
replayed): the upstream must get exactly the account's headers and no client copy.
"""

from __future__ import annotations

import base64
import json
import re
import textwrap
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.answers import _BY_STATUS, status_protobuf
from proxy.backends.profiles import PROFILES, Option, parse_backend, preview
from proxy.dev.standins import StandInIssuer
from proxy.doors.authz import SECRET_HEADER
from tests.conftest import PAYMENTS_KEY, Tracegate, environ, policy_yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
GATEWAY_DOC = Path(__file__).resolve().parent.parent / "docs" / "gateway.md"
#: The profile whose header names its user writes: the shipped lists cannot know them (docs/gateway.md).
USER_NAMED = "otlp"
#: The headers a client's token may come in (proxy/identity/identify.py): the check reads them.
TOKEN_HEADERS = frozenset({"authorization", "lightstep-access-token"})


def _values(option: Option) -> list[str]:
    """Every value to try for one option: each choice, the hint's example for a pattern, or a
    placeholder for free text (a Honeycomb dataset, Datadog's otlp_source)."""
    if option.choices is not None:
        return list(option.choices)
    if option.pattern is not None:
        example = re.split(r"[ ,]", option.hint)[0]
        assert re.fullmatch(option.pattern, example), (option.key, option.hint)
        return [example]
    return ["placeholder"]


def profile_samples() -> Iterator[tuple[str, dict[str, Any]]]:
    """Each profile but ``otlp`` as a service account with placeholder secret references and
    every option set (free-text ones too, so optional headers appear): once with each option's
    first value, then once for each other choice of each option."""
    for name, profile in PROFILES.items():
        if name == USER_NAMED:
            continue
        values = {o.key: _values(o) for o in profile.options}
        entry: dict[str, Any] = {"backend": name, **{part: {"env": "PLACEHOLDER"} for part in profile.secrets}}
        entry |= {key: choices[0] for key, choices in values.items()}
        if profile.needs == "upstream":
            entry["upstream"] = "https://backend.example"
        yield name, entry
        for key, choices in values.items():
            for other in choices[1:]:
                yield name, entry | {key: other}


@cache
def headers_by_profile() -> Mapping[str, frozenset[str]]:
    found: dict[str, set[str]] = {}
    for name, entry in profile_samples():
        spec, problems = parse_backend(entry)
        assert spec is not None, (name, problems)
        for route in preview(spec).routes.values():
            found.setdefault(name, set()).update(route.header_names())
    return {name: frozenset(names) for name, names in found.items()}


def credential_headers() -> frozenset[str]:
    """Every header name a backend profile sets (lower case): the gateways' fixed list."""
    return frozenset().union(*headers_by_profile().values())


def test_the_credential_header_list_is_every_name_a_profile_sets() -> None:
    found = headers_by_profile()
    assert set(found) == set(PROFILES) - {USER_NAMED}
    for name, names in found.items():
        assert names, f"profile {name} sets no header"
    assert {
        "lightstep-access-token",
        "authorization",
        "x-honeycomb-team",
        "x-honeycomb-dataset",
    } <= credential_headers()
    # The gateway mode page documents the list, as each shipped file's header does.
    section = GATEWAY_DOC.read_text()
    for path in (
        "nginx/tracegate-gateway.conf",
        "envoy/envoy.yaml",
        "traefik/tracegate.yaml",
        "gateway-api/tracegate.yaml",
    ):
        header = "\n".join(line for line in (DEPLOY / path).read_text().splitlines() if line.startswith("#"))
        for name in credential_headers():
            assert re.search(rf"\b{name}\b", header), (path, name)
    for name in credential_headers():
        assert f"`{name}`" in section, name


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
            # Route header rules run after ext_authz: removing a credential header there would
            # strip the account's own (a Grafana Cloud Authorization).
            touched = {h.lower() for h in route.get("request_headers_to_remove", [])}
            touched |= {h["header"]["key"].lower() for h in route.get("request_headers_to_add", [])}
            assert not touched & credential_headers(), route["match"]
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


def test_nginx_sets_every_credential_header_from_the_answer_alone() -> None:
    """Per server: each credential header is read from the authz answer and set from it, and
    set from nothing else. proxy_set_header / grpc_set_header replace every client copy of
    the name, and nginx sends no header whose value is empty."""
    text = (DEPLOY / "nginx" / "tracegate-gateway.conf").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    servers = body.split("\nserver {")[1:]
    assert len(servers) == 2
    for server, kind in zip(servers, ("proxy", "grpc"), strict=True):
        read = dict(re.findall(r"auth_request_set \$tracegate_cred_(\w+) \$upstream_http_(\w+);", server))
        assert read == {name.replace("-", "_"): name.replace("-", "_") for name in credential_headers()}
        sets = re.findall(rf"{kind}_set_header (\S+) (\S+);", server)
        credential_sets = [(n.lower(), v) for n, v in sets if n.lower() in credential_headers()]
        assert sorted(credential_sets) == sorted(
            (name, "$tracegate_cred_" + name.replace("-", "_")) for name in credential_headers()
        )


def envoy_client_strip(envoy: dict[str, Any]) -> set[str]:
    """The names the header_mutation filter removes before ext_authz (the same on every listener)."""
    found = []
    for listener in envoy["static_resources"]["listeners"]:
        filters = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        names = [f["name"] for f in filters]
        assert names.index("envoy.filters.http.header_mutation") < names.index("envoy.filters.http.ext_authz")
        mutation = filters[names.index("envoy.filters.http.header_mutation")]["typed_config"]
        assert set(mutation["mutations"]) == {"request_mutations"}
        found.append({m["remove"].lower() for m in mutation["mutations"]["request_mutations"]})
    assert all(f == found[0] for f in found)
    return found[0]


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
    response = service["authorization_response"]
    assert all(p["ignore_case"] for p in response["allowed_upstream_headers"]["patterns"])
    assert set(patterns(response["allowed_upstream_headers"])) == credential_headers()
    # Before the check, the client's copies of every credential header that carries no token.
    assert envoy_client_strip(envoy) == credential_headers() - TOKEN_HEADERS
    assert {"www-authenticate", "retry-after"} <= set(patterns(response["allowed_client_headers"]))
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
        assert resp.headers["lightstep-access-token"] == PAYMENTS_KEY
        removed = {n.strip() for n in resp.headers["x-envoy-auth-headers-to-remove"].split(",")}
        assert "authorization" in removed and "lightstep-access-token" not in removed


async def test_traefik_config_and_tracegate_agree_on_the_check(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    [traefik] = load("traefik/tracegate.yaml")
    middlewares = traefik["http"]["middlewares"]
    auth = middlewares["tracegate-auth"]["forwardAuth"]
    assert auth["trustForwardHeader"] is False
    assert {h.lower() for h in auth["authResponseHeaders"]} == credential_headers()
    for name, router in traefik["http"]["routers"].items():
        assert router["middlewares"][0] == "tracegate-auth", name
        for later in router["middlewares"][1:]:  # none may undo what ForwardAuth set
            touched = middlewares[later].get("headers", {}).get("customRequestHeaders", {})
            assert not {h.lower() for h in touched} & credential_headers(), (name, later)
    tg: Tracegate = await start_tracegate(policy_yaml(issuer.url), authz_listen="127.0.0.1:0", authz_dialect="traefik")
    await tg.keys_ready()
    path = "/" + auth["address"].split("/", 3)[3]
    url = f"http://127.0.0.1:{tg.runners[2].addresses[0][1]}"
    client_headers = {"Authorization": f"Bearer {issuer.mint()}", "Content-Type": "application/x-protobuf"}
    check = {k: v for k, v in client_headers.items() if k in auth["authRequestHeaders"]}
    check.update({"X-Forwarded-Method": "POST", "X-Forwarded-Uri": "/v1/traces", "X-Forwarded-Proto": "http"})
    async with client.get(url + path, headers=check) as resp:
        assert resp.status == 200
        assert resp.headers["Lightstep-Access-Token"] == PAYMENTS_KEY


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
    paths = [rule["matches"][0]["path"]["value"] for rule in route["spec"]["rules"]]
    assert paths == ["/v1/traces", "/v1/metrics", "/v1/logs"]
    for rule in route["spec"]["rules"]:
        # Route filters run after extAuth: one that removed a credential header would strip the account's.
        for f in rule["filters"]:
            modifier = f.get("requestHeaderModifier", {})
            touched = {h.lower() for h in modifier.get("remove", [])}
            touched |= {h["name"].lower() for key in ("set", "add") for h in modifier.get(key, [])}
            assert not touched & credential_headers(), rule["matches"]
    ext = policy["spec"]["extAuth"]
    assert ext["failOpen"] is False
    http = ext["http"]
    assert set(http["headersToBackend"]) == credential_headers()
    tg: Tracegate = await start_tracegate(
        policy_yaml(issuer.url), authz_listen="127.0.0.1:0", authz_dialect="envoy", authz_path_prefix=http["path"]
    )
    await tg.keys_ready()
    url = f"http://127.0.0.1:{tg.runners[2].addresses[0][1]}"
    client_headers = {"authorization": f"Bearer {issuer.mint()}", "content-type": "application/x-protobuf"}
    check = {k: v for k, v in client_headers.items() if k in ext["headersToExtAuth"]}
    for path in paths:
        async with client.post(url + http["path"] + path, headers=check) as resp:
            assert resp.status == 200
            assert resp.headers["lightstep-access-token"] == PAYMENTS_KEY


# --- Every backend through each gateway's header rules --------------------------------------

HONEYCOMB_KEY = "hcaik_01abcdefghijklmnopqrstuvwxyz0123456789"
GRAFANA_TOKEN = "glc_eyJvIjoiMTIzIiwibiI6InRyYWNlZ2F0ZSJ9"
GRAFANA_INSTANCE = "123456"


def backends_policy(issuer_url: str) -> str:
    """A Lightstep, a Honeycomb and a Grafana Cloud account, each reached by one project."""
    return textwrap.dedent(f"""\
        issuers:
          gitlab:
            issuer: {issuer_url}
            audiences: [tracegate]
            algorithms: [RS256, ES256]
        service_accounts:
          lightstep-ci:
            access_token: {{env: LS_TOKEN_PAYMENTS}}
          honeycomb-ci:
            backend: honeycomb
            access_token: {{env: HONEYCOMB_KEY}}
            dataset: ci-metrics
          grafana-ci:
            backend: grafana-cloud
            region: prod-eu-west-2
            instance_id: {GRAFANA_INSTANCE}
            access_token: {{env: GRAFANA_TOKEN}}
        rules:
          - name: lightstep
            issuer: gitlab
            when: {{project_path: lightstep/app}}
            service_account: lightstep-ci
          - name: honeycomb
            issuer: gitlab
            when: {{project_path: honeycomb/app}}
            service_account: honeycomb-ci
          - name: grafana
            issuer: gitlab
            when: {{project_path: grafana/app}}
            service_account: grafana-ci
        """)


def backends_environ() -> dict[str, str]:
    return {**environ(), "HONEYCOMB_KEY": HONEYCOMB_KEY, "GRAFANA_TOKEN": GRAFANA_TOKEN}


def expected_credentials(project: str, signal: str) -> dict[str, list[str]]:
    """What the upstream must get, by the vendors' documentation (tests/test_backends.py),
    written out rather than read from tracegate: Honeycomb's dataset header on metrics only,
    Grafana Cloud's Basic value decoded."""
    if project == "lightstep/app":
        return {"lightstep-access-token": [PAYMENTS_KEY]}
    if project == "honeycomb/app":
        dataset = {"x-honeycomb-dataset": ["ci-metrics"]} if signal == "metrics" else {}
        return {"x-honeycomb-team": [HONEYCOMB_KEY], **dataset}
    assert project == "grafana/app"
    basic = base64.b64encode(f"{GRAFANA_INSTANCE}:{GRAFANA_TOKEN}".encode()).decode()
    return {"authorization": [f"Basic {basic}"]}


#: (project, signal) pairs every gateway replay covers.
BACKEND_CASES = [
    ("lightstep/app", "traces"),
    ("honeycomb/app", "traces"),
    ("honeycomb/app", "metrics"),
    ("grafana/app", "metrics"),
]


def forged_requests(token: str) -> list[CIMultiDict[str]]:
    """A client's headers carrying its token (in either header tracegate reads) and its own
    copy of every other credential header: none of those may reach the upstream."""
    forged = [(name, f"client-{name}") for name in sorted(credential_headers() - TOKEN_HEADERS)]
    extra = [("content-type", "application/x-protobuf")]
    return [
        CIMultiDict([("authorization", f"Bearer {token}"), *forged, *extra]),
        CIMultiDict([("lightstep-access-token", token), *forged, *extra]),
    ]


def credentials_sent(upstream: CIMultiDict[str]) -> dict[str, list[str]]:
    return {name: upstream.getall(name) for name in sorted(credential_headers()) if name in upstream}


def envoy_upstream(
    client: CIMultiDict[str], strip: set[str], allowed_upstream: set[str], answer: CIMultiDictProxy[str]
) -> CIMultiDict[str]:
    """Envoy's request to the upstream after an OK check: the header_mutation removals, then,
    as source/extensions/filters/http/ext_authz/ext_authz.cc ``onComplete`` does, every
    allowed_upstream_headers name the answer carries set (``setCopy``, replacing the client's),
    then every name in the answer's x-envoy-auth-headers-to-remove removed."""
    upstream = CIMultiDict((k, v) for k, v in client.items() if k.lower() not in strip)
    for name in allowed_upstream:
        if name in answer:
            upstream[name] = answer[name]
    for name in answer.get("x-envoy-auth-headers-to-remove", "").split(","):
        upstream.popall(name.strip(), None)
    return upstream


def traefik_upstream(
    client: CIMultiDict[str], response_headers: list[str], answer: CIMultiDictProxy[str]
) -> CIMultiDict[str]:
    """Traefik's ForwardAuth after a 2xx (pkg/middlewares/auth/forward.go): for each
    authResponseHeaders name, ``req.Header.Del`` then the answer's values if it has any."""
    upstream = CIMultiDict(client)
    for name in response_headers:
        upstream.popall(name, None)
        for value in answer.getall(name, []):
            upstream.add(name, value)
    return upstream


async def _replay(
    client: aiohttp.ClientSession,
    issuer: StandInIssuer,
    ask: Callable[[CIMultiDict[str], str], Any],
    deliver: Callable[[CIMultiDict[str], CIMultiDictProxy[str]], CIMultiDict[str]],
) -> None:
    for project, signal in BACKEND_CASES:
        token = issuer.mint(project_path=project)
        for request in forged_requests(token):
            async with ask(request, signal) as resp:
                assert resp.status == 200, (project, signal)
                upstream = deliver(request, resp.headers)
            assert credentials_sent(upstream) == expected_credentials(project, signal), (project, signal, request)
            assert token not in str(upstream) and "client-" not in str(upstream)


async def test_traefik_passes_each_backends_credentials_and_no_client_copy(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    [traefik] = load("traefik/tracegate.yaml")
    auth = traefik["http"]["middlewares"]["tracegate-auth"]["forwardAuth"]
    tg: Tracegate = await start_tracegate(
        backends_policy(issuer.url), env=backends_environ(), authz_listen="127.0.0.1:0", authz_dialect="traefik"
    )
    await tg.keys_ready()
    url = f"http://127.0.0.1:{tg.runners[2].addresses[0][1]}/" + auth["address"].split("/", 3)[3]

    def ask(request: CIMultiDict[str], signal: str) -> Any:
        check = CIMultiDict(
            (k, v) for k, v in request.items() if k.lower() in map(str.lower, auth["authRequestHeaders"])
        )
        check.update({"X-Forwarded-Method": "POST", "X-Forwarded-Uri": f"/v1/{signal}", "X-Forwarded-Proto": "http"})
        return client.get(url, headers=check)

    await _replay(
        client, issuer, ask, lambda request, answer: traefik_upstream(request, auth["authResponseHeaders"], answer)
    )


async def test_envoy_passes_each_backends_credentials_and_no_client_copy(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    [envoy] = load("envoy/envoy.yaml")
    config = ext_authz_filters(envoy)["otlp_http"]["typed_config"]
    service = config["http_service"]
    [added] = service["authorization_request"]["headers_to_add"]
    forwarded = {n.lower() for n in patterns(config["allowed_headers"])}
    allowed_upstream = set(patterns(service["authorization_response"]["allowed_upstream_headers"]))
    strip = envoy_client_strip(envoy)
    tg: Tracegate = await start_tracegate(
        backends_policy(issuer.url),
        env={**backends_environ(), "AUTHZ_SECRET": added["value"]},
        authz_listen="127.0.0.1:0",
        authz_dialect="envoy",
        authz_path_prefix=service["path_prefix"],
        authz_secret="env:AUTHZ_SECRET",
    )
    await tg.keys_ready()
    url = f"http://127.0.0.1:{tg.runners[2].addresses[0][1]}" + service["path_prefix"]

    def ask(request: CIMultiDict[str], signal: str) -> Any:
        check = CIMultiDict((k, v) for k, v in request.items() if k.lower() in forwarded and k.lower() not in strip)
        check[added["key"]] = added["value"]
        return client.post(f"{url}/v1/{signal}", headers=check)

    await _replay(client, issuer, ask, lambda request, answer: envoy_upstream(request, strip, allowed_upstream, answer))


async def test_envoy_gateway_passes_each_backends_credentials_and_no_client_copy(
    start_tracegate: Callable[..., Any], issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    ext = {d["kind"]: d for d in load("gateway-api/tracegate.yaml")}["SecurityPolicy"]["spec"]["extAuth"]
    tg: Tracegate = await start_tracegate(
        backends_policy(issuer.url),
        env=backends_environ(),
        authz_listen="127.0.0.1:0",
        authz_dialect="envoy",
        authz_path_prefix=ext["http"]["path"],
    )
    await tg.keys_ready()
    url = f"http://127.0.0.1:{tg.runners[2].addresses[0][1]}" + ext["http"]["path"]

    def ask(request: CIMultiDict[str], signal: str) -> Any:
        check = CIMultiDict((k, v) for k, v in request.items() if k.lower() in ext["headersToExtAuth"])
        return client.post(f"{url}/v1/{signal}", headers=check)

    allowed_upstream = set(ext["http"]["headersToBackend"])
    await _replay(client, issuer, ask, lambda request, answer: envoy_upstream(request, set(), allowed_upstream, answer))


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


def test_the_authz_door_knows_every_profiles_gateway_header() -> None:
    """The door's list of names Envoy removes when an account does not set them is the
    list derived from the profiles: a new profile header cannot be left to the client."""
    from proxy.backends.profiles import GATEWAY_HEADERS

    assert credential_headers() == GATEWAY_HEADERS
