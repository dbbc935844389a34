"""Backend profiles pinned against each vendor's documentation (the URL in each test's comment),
secrets kept masked, validation messages, and the native deployment-event requests.

Pure data in, data out: no sockets here. The wire tests (a recording sink per profile, the real
OTel SDK as client) belong with the forwarder once it reads these profiles."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.backends.native import NATIVE_KEYS, MarkerEvent, native_request, parse_native, resolve_token
from proxy.backends.profiles import (
    BACKEND_KEYS,
    BACKENDS,
    LIGHTSTEP_PATHS,
    Backend,
    BackendSpec,
    Defaults,
    build_backend,
    parse_backend,
    preview,
    resolve_credentials,
)
from proxy.dev.standins import free_port
from proxy.observe.metrics import Metrics
from proxy.policy.model import ServiceAccount, Where
from proxy.secrets import Secret, SecretRef
from proxy.settings.config import Settings
from proxy.upstream.forward import DEFAULT_PATHS, Forwarder
from proxy.upstream.grpc import GrpcUpstream
from proxy.upstream.headers import HeaderPolicy
from proxy.upstream.pool import UpstreamPool

KEY = "sekrit-ingest-key-0123456789"
ID = "123456"
MARKER = "sekrit-marker-key-9876543210"
ENV = {"KEY": KEY, "ID": ID, "MARKER": MARKER}
SECRETS = (KEY, MARKER)
REF = {"env": "KEY"}


def backend(entry: dict[str, Any], defaults: Defaults | None = None) -> Backend:
    spec, problems = parse_backend(entry)
    assert problems == [] and spec is not None, problems
    creds, unresolved = resolve_credentials(spec, ENV)
    assert unresolved == []
    return build_backend(spec, creds, defaults or Defaults())


def wire(b: Backend) -> dict[str, tuple[str, str | None, bool, tuple[tuple[str, str], ...]]]:
    return {s: (r.url, r.grpc, r.json, r.reveal()) for s, r in b.routes.items()}


def problems(entry: dict[str, Any]) -> dict[str, str]:
    spec, found = parse_backend(entry)
    assert spec is None
    return {p.key: p.message for p in found}


# --- lightstep: today's behaviour, byte for byte --------------------------------------------


def test_lightstep_paths_are_the_forwarders() -> None:
    assert dict(LIGHTSTEP_PATHS) == dict(DEFAULT_PATHS)


@pytest.mark.parametrize("upstream", [None, "https://ls-proxy.example.com/base/"])
def test_lightstep_reproduces_the_forwarder_and_grpc_upstream(upstream: str | None) -> None:
    """Lightstep, the default, is tracegate's behaviour before profiles, byte for byte: the
    URL (TRACEGATE_UPSTREAM or the account's upstream, plus Lightstep's paths), exactly one
    ``lightstep-access-token`` appended after the client's allowed headers, first in gRPC
    metadata, and the same route whether the runtime built it or the forwarder did."""
    settings = Settings.load({}, {})
    defaults = Defaults(settings.upstream, settings.paths, settings.grpc_upstream)
    entry: dict[str, Any] = {"access_token": REF} | ({"upstream": upstream} if upstream else {})
    b = backend(entry, defaults)
    assert b.profile == "lightstep" and set(b.routes) == {"traces", "metrics", "logs"}
    account = ServiceAccount(
        "ci", SecretRef("env", "KEY"), frozenset(), upstream, Where("p.yaml", 1), access_token=Secret(KEY)
    )
    forwarder = Forwarder(
        None,  # type: ignore[arg-type]
        HeaderPolicy(),
        Metrics(),
        upstream=settings.upstream,
        paths=settings.paths,
        pool=UpstreamPool(),
        grpc_upstream=settings.grpc_upstream,
    )
    grpc = GrpcUpstream(Metrics(), default_target=settings.grpc_upstream, timeout=30, max_message=1 << 20)
    base = (upstream or "https://ingest.lightstep.com").rstrip("/")
    for signal, route in b.routes.items():
        assert route.url == f"{base}/{signal}/otlp/v0.9" == str(forwarder.url(forwarder.route(account, signal)))
        assert forwarder.route(account, signal) == route
        client = CIMultiDictProxy(
            CIMultiDict([("Content-Type", "application/x-protobuf"), ("lightstep-access-token", "x")])
        )
        assert list(HeaderPolicy().upstream(client, route).items()) == [
            ("Content-Type", "application/x-protobuf"),
            ("Accept-Encoding", "identity"),
            ("lightstep-access-token", KEY),
        ]
        assert grpc.metadata((("lightstep-access-token", "x"),), route) == (("lightstep-access-token", KEY),)
        assert route.grpc == "ingest.lightstep.com:443" and route.json


def test_lightstep_eu_and_grpc_upstream() -> None:
    # https://docs.lightstep.com/docs/eu-datacenter ("ingest.eu.lightstep.com")
    routes = wire(backend({"access_token": REF, "region": "eu"}))
    assert routes["traces"][:2] == ("https://ingest.eu.lightstep.com/traces/otlp/v0.9", "ingest.eu.lightstep.com:443")
    port = free_port()  # never 4317, which a local Collector may hold
    own = backend({"access_token": REF, "grpc_upstream": f"http://127.0.0.1:{port}"})
    assert own.routes["logs"].grpc == f"http://127.0.0.1:{port}"


# --- vendors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("region", "host"), [("us", "api.honeycomb.io"), ("eu", "api.eu1.honeycomb.io"), (None, "api.honeycomb.io")]
)
def test_honeycomb(region: str | None, host: str) -> None:
    # https://docs.honeycomb.io/send-data/opentelemetry (gRPC, HTTP/protobuf, HTTP/JSON) and
    # https://docs.honeycomb.io/send-data/metrics/application (x-honeycomb-team; x-honeycomb-dataset for metrics)
    entry = {"backend": "honeycomb", "access_token": REF, "dataset": "ci-metrics"} | (
        {"region": region} if region else {}
    )
    team = ("x-honeycomb-team", KEY)
    assert wire(backend(entry)) == {
        "traces": (f"https://{host}/v1/traces", f"{host}:443", True, (team,)),
        "metrics": (f"https://{host}/v1/metrics", f"{host}:443", True, (team, ("x-honeycomb-dataset", "ci-metrics"))),
        "logs": (f"https://{host}/v1/logs", f"{host}:443", True, (team,)),
    }
    classic = backend({"backend": "honeycomb", "access_token": REF, "traces_dataset": "t", "logs_dataset": "l"})
    assert classic.routes["traces"].reveal()[1] == ("x-honeycomb-dataset", "t")
    assert classic.routes["logs"].reveal()[1] == ("x-honeycomb-dataset", "l")


@pytest.mark.parametrize("instance_id", [{"env": "ID"}, 123456, "123456"])
def test_grafana_cloud_basic_from_two_parts(instance_id: Any) -> None:
    # https://grafana.com/docs/grafana-cloud/send-data/otlp/send-data-otlp/ : <endpoint>/otlp + /v1/...,
    # Authorization: Basic base64(instance id:access policy token); OTLP/HTTP only.
    b = backend(
        {"backend": "grafana-cloud", "region": "prod-eu-west-2", "instance_id": instance_id, "access_token": REF}
    )
    for signal, route in b.routes.items():
        assert route.url == f"https://otlp-gateway-prod-eu-west-2.grafana.net/otlp/v1/{signal}"
        assert route.grpc is None
        ((name, value),) = route.reveal()
        scheme, _, encoded = value.partition(" ")
        assert (name, scheme) == ("authorization", "Basic")
        assert base64.b64decode(encoded, validate=True).decode() == f"{ID}:{KEY}"


def test_grafana_cloud_console_url_is_not_doubled() -> None:
    # regions created since 2026-01-15 have nested hosts: paste the portal's URL as upstream
    # (https://grafana.com/docs/grafana-cloud/security-and-account-management/region-url-formats/)
    url = "https://otlp-gateway-prod-us-east-4.aws-us-east-1-0.grafana.net/otlp/"
    b = backend({"backend": "grafana-cloud", "upstream": url, "instance_id": 1, "access_token": REF})
    assert b.routes["metrics"].url == "https://otlp-gateway-prod-us-east-4.aws-us-east-1-0.grafana.net/otlp/v1/metrics"


@pytest.mark.parametrize(
    "site",
    [
        "datadoghq.com",
        "us3.datadoghq.com",
        "us5.datadoghq.com",
        "datadoghq.eu",
        "ap1.datadoghq.com",
        "ap2.datadoghq.com",
    ],
)
def test_datadog(site: str) -> None:
    # DataDog/documentation assets/scripts/config/regions.config.js (otlp_*_endpoint: https://otlp.<site>/v1/...);
    # https://docs.datadoghq.com/opentelemetry/setup/otlp_ingest/ : dd-api-key; traces need dd-otlp-source;
    # no gRPC; JSON for traces and metrics, the logs page shows protobuf only.
    b = backend({"backend": "datadog", "site": site, "otlp_source": "acme", "access_token": REF})
    key = ("dd-api-key", KEY)
    assert wire(b) == {
        "traces": (f"https://otlp.{site}/v1/traces", None, True, (key, ("dd-otlp-source", "acme"))),
        "metrics": (f"https://otlp.{site}/v1/metrics", None, True, (key,)),
        "logs": (f"https://otlp.{site}/v1/logs", None, False, (key,)),
    }


@pytest.mark.parametrize(
    ("region", "host"),
    [("us", "otlp.nr-data.net"), ("eu", "otlp.eu01.nr-data.net"), ("fedramp", "gov-otlp.nr-data.net")],
)
def test_newrelic(region: str, host: str) -> None:
    # https://docs.newrelic.com/docs/opentelemetry/best-practices/opentelemetry-otlp/ : gRPC and HTTP on 443,
    # header api-key: <license key>
    b = backend({"backend": "newrelic", "region": region, "access_token": REF})
    for signal, route in b.routes.items():
        assert (route.url, route.grpc, route.reveal()) == (
            f"https://{host}/v1/{signal}",
            f"{host}:443",
            (("api-key", KEY),),
        )


@pytest.mark.parametrize(
    ("token_type", "word"), [(None, "Api-Token"), ("api-token", "Api-Token"), ("platform", "Bearer")]
)
def test_dynatrace(token_type: str | None, word: str) -> None:
    # https://docs.dynatrace.com/docs/ingest-from/opentelemetry/getting-started/otlp-export :
    # https://{env}.live.dynatrace.com/api/v2/otlp + /v1/...; HTTP only, protobuf only; Authorization: Api-Token
    entry = {"backend": "dynatrace", "environment": "abc12345", "access_token": REF} | (
        {"token_type": token_type} if token_type else {}
    )
    for signal, route in backend(entry).routes.items():
        assert route.url == f"https://abc12345.live.dynatrace.com/api/v2/otlp/v1/{signal}"
        assert (route.grpc, route.json, route.reveal()) == (None, False, (("authorization", f"{word} {KEY}"),))
    activegate = backend(
        {"backend": "dynatrace", "upstream": "https://ag.example:9999/e/abc12345", "access_token": REF}
    )
    assert activegate.routes["logs"].url == "https://ag.example:9999/e/abc12345/api/v2/otlp/v1/logs"


def test_elastic() -> None:
    # https://www.elastic.co/docs/reference/opentelemetry/motlp : Authorization: ApiKey <key>; the
    # Collector example sends OTLP/gRPC to the same https endpoint. JSON: elastic/apm-server#12636 (open).
    url = "https://proj.ingest.eu-west-1.aws.elastic.cloud"
    b = backend({"backend": "elastic", "upstream": url, "access_token": REF})
    for signal, route in b.routes.items():
        assert (route.url, route.grpc, route.json) == (
            f"{url}/v1/{signal}",
            "proj.ingest.eu-west-1.aws.elastic.cloud:443",
            False,
        )
        assert route.reveal() == (("authorization", f"ApiKey {KEY}"),)


@pytest.mark.parametrize(
    ("domain", "suffix"), [(None, "signalfx.com"), ("splunkcloud", "observability.splunkcloud.com")]
)
def test_splunk(domain: str | None, suffix: str) -> None:
    # https://help.splunk.com/.../send-traces-to-splunk-observability-cloud-using-the-grpc-endpoint (gRPC for traces,
    # X-SF-Token); OTLP/HTTP exporter docs: /v2/trace/otlp and /v2/datapoint/otlp; no OTLP logs path.
    entry = {"backend": "splunk", "realm": "eu0", "access_token": REF} | ({"domain": domain} if domain else {})
    host = f"ingest.eu0.{suffix}"
    assert wire(backend(entry)) == {
        "traces": (f"https://{host}/v2/trace/otlp", f"{host}:443", False, (("x-sf-token", KEY),)),
        "metrics": (f"https://{host}/v2/datapoint/otlp", None, False, (("x-sf-token", KEY),)),
    }


def test_generic_otlp() -> None:
    entry = {
        "backend": "otlp",
        "upstream": "https://otel.example.com:4318",
        "grpc_upstream": "otel.example.com:4317",
        "headers": {"X-Api-Key": {"env": "KEY"}, "X-Scope-OrgID": "acme"},
    }
    b = backend(entry)
    assert wire(b)["logs"] == (
        "https://otel.example.com:4318/v1/logs",
        "otel.example.com:4317",
        True,
        (("x-api-key", KEY), ("x-scope-orgid", "acme")),
    )
    assert b.credential_header_names == {"x-api-key"} and b.set_header_names == {"x-api-key", "x-scope-orgid"}


# --- what tracegate check, explain and the header allowlist read ---------------------------


@pytest.mark.parametrize(
    ("entry", "names"),
    [
        ({}, {"lightstep-access-token"}),
        ({"backend": "honeycomb"}, {"x-honeycomb-team"}),
        ({"backend": "grafana-cloud", "region": "prod-us-east-0", "instance_id": 1}, {"authorization"}),
        ({"backend": "datadog", "site": "datadoghq.com"}, {"dd-api-key"}),
        ({"backend": "newrelic"}, {"api-key"}),
        ({"backend": "dynatrace", "environment": "abc12345"}, {"authorization"}),
        ({"backend": "elastic", "upstream": "https://e.example.com"}, {"authorization"}),
        ({"backend": "splunk", "realm": "us1"}, {"x-sf-token"}),
    ],
)
def test_credential_header_names_and_preview_without_secrets(entry: dict[str, Any], names: set[str]) -> None:
    spec, found = parse_backend({"access_token": {"env": "UNSET"}} | entry)
    assert found == [] and spec is not None
    shown = preview(spec)  # no secret is read: the variable is not even set
    assert shown.credential_header_names == names
    assert all(r.url.startswith("https://") and r.header_names() for r in shown.routes.values())


def test_backend_keys_cover_every_option() -> None:
    assert set(BACKENDS) == {
        "lightstep",
        "honeycomb",
        "grafana-cloud",
        "datadog",
        "newrelic",
        "dynatrace",
        "elastic",
        "splunk",
        "otlp",
    }
    assert {"backend", "region", "site", "realm", "environment", "dataset", "instance_id", "headers"} <= set(
        BACKEND_KEYS
    )
    assert not set(BACKEND_KEYS) & set(NATIVE_KEYS)


def test_signals_default_to_what_the_backend_accepts() -> None:
    spec, _ = parse_backend({"backend": "splunk", "realm": "us1", "access_token": REF})
    assert spec is not None and spec.signals == {"traces", "metrics"}
    spec, _ = parse_backend({"backend": "honeycomb", "access_token": REF, "signals": ["traces"]})
    assert spec is not None and set(preview(spec).routes) == {"traces"}


# --- validation messages ---------------------------------------------------------------------


def test_unknown_backend_names_the_allowed_ones() -> None:
    message = problems({"backend": "honeycom"})["backend"]
    assert message.startswith("backend 'honeycom' is unknown; did you mean 'honeycomb'? allowed: lightstep, honeycomb,")
    assert message.endswith("elastic, splunk, otlp")


def test_region_typo_names_the_allowed_values() -> None:
    assert problems({"backend": "honeycomb", "region": "eu1", "access_token": REF}) == {
        "region": "region 'eu1' is not a honeycomb region; did you mean 'eu'? allowed: us, eu"
    }
    site = problems({"backend": "datadog", "site": "ddog-gov.com", "access_token": REF})["site"]
    assert site.startswith("site 'ddog-gov.com' is not a datadog site;") and "datadoghq.eu" in site
    assert problems({"backend": "splunk", "realm": "us3", "access_token": REF})["realm"].endswith("jp0, sg0")
    zone = problems({"backend": "grafana-cloud", "region": "prod-euwest-2", "instance_id": 1, "access_token": REF})
    assert zone == {
        "region": "region 'prod-euwest-2' does not look like a grafana-cloud region (for example prod-eu-west-2)"
    }


def test_missing_credential_parts_and_placement() -> None:
    assert problems({"backend": "grafana-cloud", "region": "prod-eu-west-2", "access_token": REF}) == {
        "instance_id": "backend grafana-cloud needs instance_id: {env: NAME} or {file: /path} or the number itself"
    }
    assert problems({"backend": "datadog"}) == {
        "site": "backend datadog needs site (or upstream: the endpoint's URL)",
        "access_token": "backend datadog needs access_token: {env: NAME} or {file: /path}",
    }
    assert problems({"backend": "elastic", "access_token": REF}) == {"upstream": "backend elastic needs upstream"}
    both = {"backend": "dynatrace", "environment": "abc12345", "upstream": "https://x.example.com", "access_token": REF}
    assert problems(both) == {"environment": "backend dynatrace: set environment or upstream, not both"}


def test_option_values_cannot_break_a_header() -> None:
    found = problems({"backend": "honeycomb", "access_token": REF, "dataset": "ci\r\nx-evil: 1"})
    assert found == {"dataset": "dataset must be a non-empty string on one line"}


def test_signal_not_accepted() -> None:
    found = problems({"backend": "splunk", "realm": "us1", "access_token": REF, "signals": ["traces", "logs"]})
    assert found == {"signals": "backend splunk does not accept logs over OTLP; accepted: traces, metrics"}


def test_keys_of_other_backends_and_transport() -> None:
    found = problems({"backend": "newrelic", "site": "datadoghq.com", "access_token": REF})
    assert found == {"site": "site is not a key of backend newrelic; its keys: access_token, region"}
    grpc = problems(
        {
            "backend": "grafana-cloud",
            "region": "prod-eu-west-2",
            "instance_id": 1,
            "access_token": REF,
            "upstream_protocol": "grpc",
        }
    )
    assert grpc == {"upstream_protocol": "backend grafana-cloud takes OTLP/HTTP only; remove upstream_protocol: grpc"}


def test_otlp_headers_are_checked() -> None:
    found = parse_backend(
        {
            "backend": "otlp",
            "upstream": "https://o.example.com",
            "access_token": REF,
            "headers": {"Authorization": KEY, "Host": "x", "x_bad": "y"},
        }
    )[1]
    messages = [p.message for p in found]
    assert messages == [
        "backend otlp takes its credentials in headers:, not access_token",
        "headers.authorization is written inline; secrets are references: {env: NAME} or {file: /path}",
        "headers: 'Host' cannot be set upstream (invalid, reserved or hop-by-hop)",
        "headers: 'x_bad' cannot be set upstream (invalid, reserved or hop-by-hop)",
    ]
    assert problems({"backend": "otlp", "upstream": "https://o.example.com"})["headers"].startswith(
        "backend otlp needs headers:"
    )


def test_urls_follow_the_project_rule() -> None:
    found = problems({"backend": "elastic", "upstream": "http://elastic.example.com", "access_token": REF})
    assert found["upstream"].startswith("upstream: ") and "https" in found["upstream"]


def test_unset_secret_names_the_reference_only() -> None:
    spec, _ = parse_backend({"backend": "honeycomb", "access_token": {"env": "NOPE"}})
    assert spec is not None
    assert [p.message for p in resolve_credentials(spec, ENV)[1]] == [
        "access_token: environment variable NOPE is not set; set it or fix the reference"
    ]


# --- secrets ---------------------------------------------------------------------------------


def test_no_secret_in_any_repr_str_or_message() -> None:
    rendered: list[str] = []
    for entry in (
        {"access_token": REF},
        {"backend": "grafana-cloud", "region": "prod-eu-west-2", "instance_id": {"env": "ID"}, "access_token": REF},
        {"backend": "dynatrace", "environment": "abc12345", "access_token": REF},
        {"backend": "otlp", "upstream": "https://o.example.com", "headers": {"x-api-key": REF}},
    ):
        spec, _ = parse_backend(entry)
        assert spec is not None
        b = backend(entry)
        rendered += [repr(spec), str(spec), repr(b), str(b), *(repr(r) for r in b.routes.values())]
        revealed = [v for r in b.routes.values() for _, v in r.reveal()]
        assert any(KEY in v or "Basic " in v for v in revealed)  # the credential is there, only revealed
    for inline in (
        {"access_token": KEY},
        {"backend": "otlp", "upstream": "https://o.example.com", "headers": {"x-token": KEY}},
    ):
        rendered += [repr(p) for p in parse_backend(inline)[1]]
    event = MarkerEvent("checkout", "a" * 40, 1_700_000_000_000_000_000, "delivery-1")
    for backend_entry in NATIVE_ENTRIES.values():
        native = parse_native(backend_entry, parse_backend(backend_entry)[0])[0]  # type: ignore[arg-type]
        assert native is not None
        rendered.append(repr(native_request(native, {"access_token": Secret(KEY)}, Secret(MARKER), event)))
    basic = base64.b64encode(f"{ID}:{KEY}".encode()).decode()
    leaks = [text for text in rendered for secret in (*SECRETS, basic) if secret in text]
    assert leaks == []


# --- native deployment events ----------------------------------------------------------------

NATIVE_ENTRIES: dict[str, dict[str, Any]] = {
    "honeycomb": {"backend": "honeycomb", "region": "eu", "access_token": REF, "marker_token": {"env": "MARKER"}},
    "grafana-cloud": {
        "backend": "grafana-cloud",
        "region": "prod-eu-west-2",
        "instance_id": 1,
        "access_token": REF,
        "marker_token": {"env": "MARKER"},
        "stack_url": "https://acme.grafana.net",
    },
    "datadog": {"backend": "datadog", "site": "datadoghq.eu", "access_token": REF},
    "newrelic": {"backend": "newrelic", "region": "eu", "access_token": REF, "marker_token": {"env": "MARKER"}},
    "dynatrace": {"backend": "dynatrace", "environment": "abc12345", "access_token": REF},
}
SHA = "0123456789abcdef0123456789abcdef01234567"
EVENT = MarkerEvent(
    service="checkout",
    version=SHA,
    time_unix_nano=1_700_000_060_000_000_000,
    started_unix_nano=1_700_000_000_000_000_000,
    event_id="gitea:delivery-42",
    ref="main",
    environment="production",
    url="https://git.example.com/acme/checkout/actions/runs/7",
    repository_url="https://git.example.com/acme/checkout",
)


def native(name: str, event: MarkerEvent = EVENT) -> tuple[str, str, dict[str, str], dict[str, Any]]:
    entry = NATIVE_ENTRIES[name]
    spec, found = parse_backend(entry)
    assert spec is not None, found
    settings, found = parse_native(entry, spec)
    assert settings is not None, found
    creds, _ = resolve_credentials(spec, ENV)
    token, _ = resolve_token(settings, ENV)
    request = native_request(settings, creds, token, event)
    body = json.loads(request.body_bytes())
    return request.method, request.url, dict(request.reveal()), body


def test_honeycomb_marker() -> None:
    # https://docs.honeycomb.io/api/tag/Markers/ : POST /1/markers/{datasetSlug} (__all__: environment-wide),
    # X-Honeycomb-Team (a configuration key, Manage Markers); start_time in Unix seconds, message, type, url.
    assert native("honeycomb") == (
        "POST",
        "https://api.eu1.honeycomb.io/1/markers/__all__",
        {"x-honeycomb-team": MARKER, "content-type": "application/json"},
        {
            "message": "deploy checkout 0123456789ab (main)",
            "type": "deploy",
            "start_time": 1_700_000_060,
            "url": EVENT.url,
        },
    )


def test_grafana_annotation() -> None:
    # https://grafana.com/docs/grafana-cloud/developer-resources/api-reference/http-api/api-legacy/annotations/ :
    # POST /api/annotations, time/timeEnd epoch ms, tags, text; a service-account token as Bearer.
    method, url, headers, body = native("grafana-cloud")
    assert (method, url) == ("POST", "https://acme.grafana.net/api/annotations")
    assert headers == {"authorization": f"Bearer {MARKER}", "content-type": "application/json"}
    assert body == {
        "time": 1_700_000_000_000,
        "timeEnd": 1_700_000_060_000,
        "tags": ["deployment", "service:checkout", f"version:{SHA}", "environment:production"],
        "text": f"deploy checkout 0123456789ab (main) {EVENT.url}",
    }


def test_datadog_dora_deployment() -> None:
    # https://docs.datadoghq.com/api/latest/dora-metrics/send-a-deployment-event/ :
    # POST https://api.<site>/api/v2/dora/deployment, DD-API-KEY; data.attributes: service, started_at,
    # finished_at (ns), git.commit_sha/repository_url, env, version, id.
    method, url, headers, body = native("datadog")
    assert (method, url, headers) == (
        "POST",
        "https://api.datadoghq.eu/api/v2/dora/deployment",
        {"dd-api-key": KEY, "content-type": "application/json"},
    )
    attributes = body["data"]["attributes"]
    deployment_id = attributes.pop("id")
    assert re.fullmatch(r"[A-Za-z0-9_.:-]{16,128}", deployment_id)
    assert attributes == {
        "service": "checkout",
        "version": SHA,
        "started_at": 1_700_000_000_000_000_000,
        "finished_at": 1_700_000_060_000_000_000,
        "git": {"commit_sha": SHA, "repository_url": "https://git.example.com/acme/checkout"},
        "env": "production",
    }
    assert native("datadog")[3]["data"]["attributes"]["id"] == deployment_id  # a resend: the same deployment


def test_newrelic_change_tracking() -> None:
    # https://docs.newrelic.com/docs/change-tracking/config/nerdgraph : changeTrackingCreateEvent with
    # categoryAndTypeData {categoryFields {deployment {version}}, kind {category "deployment", type "basic"}},
    # entitySearch {query}; NerdGraph at https://api.eu.newrelic.com/graphql with an API-Key (user key).
    method, url, headers, body = native("newrelic")
    assert (method, url, headers) == (
        "POST",
        "https://api.eu.newrelic.com/graphql",
        {"api-key": MARKER, "content-type": "application/json"},
    )
    query = body["query"]
    assert query.startswith("mutation { changeTrackingCreateEvent(changeTrackingEvent: {")
    assert (
        f'categoryFields: {{ deployment: {{ version: "{SHA}", commit: "{SHA}", deepLink: "{EVENT.url}" }} }}' in query
    )
    assert 'kind: { category: "deployment", type: "basic" }' in query
    assert "entitySearch: { query: \"name = 'checkout'\" }" in query and "timestamp: 1700000060000" in query
    quoted = MarkerEvent('check"out', SHA, 0, "id", message='a "quoted"\nmessage')
    assert 'shortDescription: "a \\"quoted\\"\\nmessage"' in native("newrelic", quoted)[3]["query"]
    with pytest.raises(ValueError, match="single quote"):
        native("newrelic", MarkerEvent("o'brien", SHA, 0, "id"))


def test_dynatrace_custom_deployment() -> None:
    # https://docs.dynatrace.com/docs/shortlink/api-events-v2-post-event : POST /api/v2/events/ingest (events.ingest),
    # eventType CUSTOM_DEPLOYMENT, title, startTime/endTime ms, entitySelector, properties dt.event.deployment.*.
    method, url, headers, body = native("dynatrace")
    assert (method, url) == ("POST", "https://abc12345.live.dynatrace.com/api/v2/events/ingest")
    assert headers == {"authorization": f"Api-Token {KEY}", "content-type": "application/json"}
    assert body == {
        "eventType": "CUSTOM_DEPLOYMENT",
        "title": "deploy checkout 0123456789ab (main)",
        "startTime": 1_700_000_000_000,
        "endTime": 1_700_000_060_000,
        "entitySelector": 'type(SERVICE),entityName.equals("checkout")',
        "properties": {
            "dt.event.deployment.name": "checkout 0123456789ab",
            "dt.event.deployment.version": SHA,
            "dt.event.deployment.release_stage": "production",
            "dt.event.deployment.ci_back_link": EVENT.url,
        },
    }
    odd = native("dynatrace", MarkerEvent('a"b~c', SHA, 0, "id"))[3]
    assert odd["entitySelector"] == 'type(SERVICE),entityName.equals("a~"b~~c")'


def test_native_validation() -> None:
    splunk = {"backend": "splunk", "realm": "us1", "access_token": REF, "marker_token": {"env": "MARKER"}}
    spec = parse_backend(splunk)[0]
    assert spec is not None
    assert [p.message for p in parse_native(splunk, spec)[1]] == [
        "marker_token is not a key of backend splunk; its keys: none",
        "backend splunk has no native deployment API; use markers: [otlp]",
    ]
    assert parse_native({"access_token": REF}, BackendSpec("lightstep"), wanted=False) == (None, [])
    honeycomb = {"backend": "honeycomb", "access_token": REF}
    assert [p.message for p in parse_native(honeycomb, BackendSpec("honeycomb"))[1]] == [
        "Honeycomb Markers needs marker_token: a configuration key with the Manage Markers permission"
    ]
    grafana = {"marker_token": MARKER}
    assert {p.key: p.message for p in parse_native(grafana, BackendSpec("grafana-cloud"))[1]} == {
        "marker_token": "marker_token is written inline; secrets are references: {env: NAME} or {file: /path}",
        "stack_url": "Grafana annotations need stack_url: https://<stack>.grafana.net",
    }


def test_grpc_upstream_on_an_http_only_backend_is_refused() -> None:
    """It would be silently ignored: such a backend's gRPC clients are bridged to OTLP/HTTP."""
    found = problems(
        {
            "backend": "grafana-cloud",
            "region": "prod-eu-west-2",
            "instance_id": 1,
            "access_token": REF,
            "grpc_upstream": "otlp.example.com:443",
        }
    )
    assert found["grpc_upstream"].startswith("backend grafana-cloud takes OTLP/HTTP only")
