"""Native deployment events: each vendor's own "a deployment happened" API, as request data.

OTLP markers (proxy/ci/marker.py) reach every backend; a webhook entry with
``markers: [otlp, native]`` also sends the vendor's native event: Honeycomb Markers, a Grafana
annotation, a Datadog DORA deployment, a New Relic change-tracking event (NerdGraph), a
Dynatrace CUSTOM_DEPLOYMENT event. Each function here is pure: account + event in,
:class:`NativeRequest` (method, url, headers, JSON body) out; the outbox sends it, retries it
and dedupes it. Sources of every field name: tests/test_backends.py.

Honeycomb, Grafana and New Relic refuse an ingest key for these APIs (a configuration key with
Manage Markers, a service-account token, a user key), so those accounts name a
``marker_token``; Datadog and Dynatrace accept the ingest key when it has the scope.
Security caveat: tokens stay Secrets inside :class:`NativeRequest`; its repr is masked.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from proxy.backends.profiles import BackendProblem, BackendSpec, Header, secret_ref
from proxy.secrets import Secret, SecretRef, SecretUnavailable, resolve
from proxy.urls import check_url

#: Service-account keys read here (the loader adds them to the keys it allows).
NATIVE_KEYS = ("marker_token", "marker_dataset", "stack_url", "entity_guid", "entity_selector")
#: Backend -> its native API, and the native keys it reads.
NATIVE_APIS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "honeycomb": ("Honeycomb Markers", ("marker_token", "marker_dataset")),
    "grafana-cloud": ("Grafana annotations", ("marker_token", "stack_url")),
    "datadog": ("Datadog DORA deployments", ("marker_token",)),
    "newrelic": ("New Relic change tracking", ("marker_token", "entity_guid")),
    "dynatrace": ("Dynatrace events (CUSTOM_DEPLOYMENT)", ("marker_token", "entity_selector")),
}
_OWN_TOKEN = {
    "honeycomb": "a configuration key with the Manage Markers permission",
    "grafana-cloud": "a Grafana service-account token allowed to write annotations",
    "newrelic": "a New Relic user key (NerdGraph)",
}
#: New Relic OTLP host (the region's canonical value) -> its NerdGraph endpoint.
_NERDGRAPH = {
    "otlp.nr-data.net": "https://api.newrelic.com/graphql",
    "otlp.eu01.nr-data.net": "https://api.eu.newrelic.com/graphql",
    "gov-otlp.nr-data.net": "https://gov-api.newrelic.com/graphql",
}
_JSON = Header("content-type", "application/json")


@dataclass(frozen=True)
class MarkerEvent:
    """One deployment, vendor-neutral. Times are Unix nanoseconds; ``event_id`` is the outbox
    key, stable across resends (it makes Datadog's deployment id)."""

    service: str
    version: str  # the commit SHA
    time_unix_nano: int  # when it finished
    event_id: str
    ref: str | None = None
    environment: str | None = None
    url: str | None = None  # a link back: the pipeline, the compare view
    message: str | None = None
    repository_url: str | None = None
    started_unix_nano: int | None = None

    def text(self) -> str:
        ref = f" ({self.ref})" if self.ref else ""
        return self.message or f"deploy {self.service} {self.version[:12]}{ref}"


@dataclass(frozen=True)
class NativeSpec:
    """An account's native-event settings; ``token`` None: the ingest key is used."""

    backend: BackendSpec
    token: SecretRef | None = None
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NativeRequest:
    method: str
    url: str
    headers: tuple[Header, ...]
    body: Mapping[str, Any]

    def body_bytes(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":"), ensure_ascii=False).encode()

    def reveal(self) -> tuple[tuple[str, str], ...]:
        """The wire headers with their values: call only where the request leaves."""
        return tuple((h.name, h.reveal()) for h in self.headers)


def parse_native(
    entry: Mapping[str, Any], spec: BackendSpec, *, wanted: bool = True
) -> tuple[NativeSpec | None, list[BackendProblem]]:
    """The account's native-event keys. ``wanted``: a webhook asks ``markers: [native]``, so
    what the vendor needs must be there; otherwise only the keys written are checked."""
    problems: list[BackendProblem] = []
    api = NATIVE_APIS.get(spec.backend)
    own = api[1] if api else ()
    for key in (k for k in NATIVE_KEYS if k in entry and k not in own):
        problems.append(
            BackendProblem(key, f"{key} is not a key of backend {spec.backend}; its keys: {', '.join(own) or 'none'}")
        )
    if api is None:
        if wanted:
            problems.append(
                BackendProblem("backend", f"backend {spec.backend} has no native deployment API; use markers: [otlp]")
            )
        return None, problems
    token: SecretRef | None = None
    if "marker_token" in entry:
        ref = secret_ref(entry["marker_token"], "marker_token")
        token = ref if isinstance(ref, SecretRef) else None
        problems += [] if token else [BackendProblem("marker_token", str(ref))]
    options = {k: entry[k] for k in own if k != "marker_token" and k in entry}
    for key, value in options.items():
        if not isinstance(value, str) or not value or any(c in value for c in "\r\n\0"):
            problems.append(BackendProblem(key, f"{key} must be a non-empty string on one line"))
        elif key == "stack_url" and (problem := check_url(value)):
            problems.append(BackendProblem(key, f"stack_url: {problem}"))
    if wanted:
        written = {p.key for p in problems}
        problems += [p for p in missing(NativeSpec(spec, token, options)) if p.key not in written]
    return (None, problems) if problems else (NativeSpec(spec, token, options), [])


def missing(native: NativeSpec | None, backend: BackendSpec | None = None) -> list[BackendProblem]:
    """What ``markers: [native]`` needs of an account and does not find: a backend with a
    native API, the marker_token its vendor requires, Grafana's stack_url. ``native`` as the
    account was loaded (None: it has no native settings; ``backend`` then says which it is)."""
    spec = native.backend if native is not None else backend or BackendSpec("lightstep")
    api = NATIVE_APIS.get(spec.backend)
    if api is None:
        have = ", ".join(NATIVE_APIS)
        message = f"backend {spec.backend} has no native deployment API; use markers: [otlp] (native: {have})"
        return [BackendProblem("backend", message)]
    native = native or NativeSpec(spec)
    problems = []
    if native.token is None and spec.backend in _OWN_TOKEN:
        problems.append(BackendProblem("marker_token", f"{api[0]} needs marker_token: {_OWN_TOKEN[spec.backend]}"))
    if spec.backend == "grafana-cloud" and "stack_url" not in native.options:
        problems.append(BackendProblem("stack_url", "Grafana annotations need stack_url: https://<stack>.grafana.net"))
    return problems


def resolve_token(native: NativeSpec, environ: Mapping[str, str]) -> tuple[Secret | None, list[BackendProblem]]:
    if native.token is None:
        return None, []
    try:
        return resolve(native.token, environ), []
    except SecretUnavailable as exc:
        return None, [BackendProblem("marker_token", f"marker_token: {exc}; set it or fix the reference")]


def native_request(
    native: NativeSpec, credentials: Mapping[str, Secret], token: Secret | None, event: MarkerEvent
) -> NativeRequest:
    """The vendor's request for ``event``. ``credentials``: the account's resolved ingest
    credentials; ``token``: the resolved marker_token, if any. Raises ValueError for an event
    the vendor's syntax cannot carry (a quote in a New Relic entity name)."""
    key = token or credentials["access_token"]
    return _BUILDERS[native.backend.backend](native, key, event)


def _ms(ns: int) -> int:
    return ns // 1_000_000


def _honeycomb(native: NativeSpec, key: Secret, e: MarkerEvent) -> NativeRequest:
    spec = native.backend
    base = (spec.upstream or f"https://{spec.options['region']}").rstrip("/")
    dataset = quote(native.options.get("marker_dataset", "__all__"), safe="")  # __all__: environment-wide
    body = {"message": e.text(), "type": "deploy", "start_time": e.time_unix_nano // 1_000_000_000}
    if e.url:
        body["url"] = e.url
    return NativeRequest("POST", f"{base}/1/markers/{dataset}", (Header("x-honeycomb-team", key), _JSON), body)


def _grafana(native: NativeSpec, key: Secret, e: MarkerEvent) -> NativeRequest:
    tags = ["deployment", f"service:{e.service}", f"version:{e.version}"]
    tags += [f"environment:{e.environment}"] if e.environment else []
    body: dict[str, Any] = {"time": _ms(e.started_unix_nano or e.time_unix_nano), "tags": tags}
    if e.started_unix_nano is not None:
        body["timeEnd"] = _ms(e.time_unix_nano)
    body["text"] = e.text() + (f" {e.url}" if e.url else "")
    auth = Header("authorization", Secret(f"Bearer {key.reveal()}"))
    return NativeRequest("POST", native.options["stack_url"].rstrip("/") + "/api/annotations", (auth, _JSON), body)


def _datadog(native: NativeSpec, key: Secret, e: MarkerEvent) -> NativeRequest:
    spec = native.backend
    base = (spec.upstream or f"https://api.{spec.options['site']}").rstrip("/")
    digest = hashlib.sha256(f"{e.event_id}\0{e.service}".encode()).hexdigest()[:40]
    attributes: dict[str, Any] = {
        "id": f"tracegate-{digest}",  # 16-128 of [A-Za-z0-9-_.:]: a resend is the same deployment
        "service": e.service,
        "version": e.version,
        "started_at": e.started_unix_nano or e.time_unix_nano,
        "finished_at": e.time_unix_nano,
    }
    if e.repository_url:
        attributes["git"] = {"commit_sha": e.version, "repository_url": e.repository_url}
    if e.environment:
        attributes["env"] = e.environment
    headers = (Header("dd-api-key", key), _JSON)
    return NativeRequest("POST", f"{base}/api/v2/dora/deployment", headers, {"data": {"attributes": attributes}})


def _gql(value: str) -> str:
    """A GraphQL string literal: JSON's escapes are all GraphQL escapes (spec §2.9.4)."""
    return json.dumps(value, ensure_ascii=True)


def _newrelic(native: NativeSpec, key: Secret, e: MarkerEvent) -> NativeRequest:
    guid = native.options.get("entity_guid")
    if "'" in (guid or e.service):
        raise ValueError("an entity search value cannot hold a single quote")
    query = f"id = '{guid}'" if guid else f"name = '{e.service}'"
    deployment = f"version: {_gql(e.version)}, commit: {_gql(e.version)}"
    deployment += f", deepLink: {_gql(e.url)}" if e.url else ""
    mutation = (
        "mutation { changeTrackingCreateEvent(changeTrackingEvent: {"
        f" categoryAndTypeData: {{ categoryFields: {{ deployment: {{ {deployment} }} }},"
        ' kind: { category: "deployment", type: "basic" } },'
        f" entitySearch: {{ query: {_gql(query)} }}, shortDescription: {_gql(e.text())},"
        f" groupId: {_gql(e.event_id)}, timestamp: {_ms(e.time_unix_nano)}"
        " }) { changeTrackingEvent { changeTrackingId } messages } }"
    )
    url = native.backend.upstream and native.backend.upstream.rstrip("/") + "/graphql"
    endpoint = url or _NERDGRAPH[native.backend.options["region"]]
    return NativeRequest("POST", endpoint, (Header("api-key", key), _JSON), {"query": mutation})


def _selector_value(value: str) -> str:
    """A quoted entity-selector value: Dynatrace escapes ``~`` and ``"`` with ``~``."""
    return '"' + re.sub(r'([~"])', r"~\1", value) + '"'


def _dynatrace(native: NativeSpec, key: Secret, e: MarkerEvent) -> NativeRequest:
    spec = native.backend
    base = spec.upstream or f"https://{spec.options['environment']}.live.dynatrace.com"
    base = base.rstrip("/").removesuffix("/api/v2/otlp")
    selector = native.options.get("entity_selector") or f"type(SERVICE),entityName.equals({_selector_value(e.service)})"
    properties = {"dt.event.deployment.name": f"{e.service} {e.version[:12]}", "dt.event.deployment.version": e.version}
    if e.environment:
        properties["dt.event.deployment.release_stage"] = e.environment
    if e.url:
        properties["dt.event.deployment.ci_back_link"] = e.url
    body = {
        "eventType": "CUSTOM_DEPLOYMENT",
        "title": e.text(),
        "startTime": _ms(e.started_unix_nano or e.time_unix_nano),
        "endTime": _ms(e.time_unix_nano),
        "entitySelector": selector,
        "properties": properties,
    }
    auth = Header("authorization", Secret(f"{spec.options['token_type']} {key.reveal()}"))
    return NativeRequest("POST", f"{base}/api/v2/events/ingest", (auth, _JSON), body)


_BUILDERS: Mapping[str, Callable[[NativeSpec, Secret, MarkerEvent], NativeRequest]] = {
    "honeycomb": _honeycomb,
    "grafana-cloud": _grafana,
    "datadog": _datadog,
    "newrelic": _newrelic,
    "dynatrace": _dynatrace,
}
