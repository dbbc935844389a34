"""``tracegate dev --backend NAME``: the dev account of each backend, and what its sink checks.

The dev loop's service account ``ci`` is written on every start (``05-dev-account.yaml``) with
the chosen backend and the recording sinks as its endpoint. Each request the sinks receive is
checked against what the vendor documents — the path per signal and the exact credential and
extra headers (tests/test_backends.py names the sources) — written out here, *not* read from
proxy/backends/profiles.py, so that the sink checks the profile instead of echoing it. A line
says what was seen: the path, the size, the header names and whether each held the account's
value; never a value (the dev key is made up, but the client's token is real enough).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIGNALS = ("traces", "metrics", "logs")
#: The dev account's key variable: Lightstep's as before profiles, one name for the others.
LIGHTSTEP_KEY_VARIABLE = "LIGHTSTEP_ACCESS_KEY_LINE"
KEY_VARIABLE = "DEV_BACKEND_KEY"
#: A made-up Grafana Cloud stack (instance) id: a number, so it may be written out.
DEV_INSTANCE_ID = "123456"
DEV_DATASET = "ci-metrics"
_V1 = {s: f"/v1/{s}" for s in SIGNALS}
#: The OTLP/gRPC services, by signal.
_SERVICES = {
    "traces": "/opentelemetry.proto.collector.trace.v1.TraceService/",
    "metrics": "/opentelemetry.proto.collector.metrics.v1.MetricsService/",
    "logs": "/opentelemetry.proto.collector.logs.v1.LogsService/",
}

Expect = Callable[[str, str], tuple[tuple[str, str], ...]]


def _one(name: str, scheme: str = "") -> Expect:
    return lambda _signal, key: ((name, f"{scheme} {key}" if scheme else key),)


def _honeycomb(signal: str, key: str) -> tuple[tuple[str, str], ...]:
    team = ("x-honeycomb-team", key)
    return (team, ("x-honeycomb-dataset", DEV_DATASET)) if signal == "metrics" else (team,)


def _grafana(_signal: str, key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", "Basic " + base64.b64encode(f"{DEV_INSTANCE_ID}:{key}".encode()).decode()),)


@dataclass(frozen=True)
class Documented:
    """One vendor's OTLP intake as its documentation describes it, and the dev account's keys
    (YAML lines; ``{key}`` is the key variable, ``{http}``/``{grpc}`` the sinks)."""

    title: str
    paths: Mapping[str, str]
    headers: Expect
    keys: str
    #: Signals whose gRPC clients reach the gRPC sink; the others' are bridged to OTLP/HTTP.
    grpc: frozenset[str] = frozenset()

    def signal_of(self, path: str) -> str | None:
        return next((s for s, p in self.paths.items() if p == path), None)


#: Where a client's own credential would be: never upstream, unless the backend sets it itself.
_CLIENT = ("authorization", "lightstep-access-token")
_KEY_LINE = "access_token: {{env: {key}}}"
_HTTP = "upstream: {http}"
_BOTH = "upstream: {http}\ngrpc_upstream: {grpc}"
_ALL = frozenset(SIGNALS)
DOCUMENTED: Mapping[str, Documented] = {
    # The sinks are TRACEGATE_UPSTREAM and TRACEGATE_GRPC_UPSTREAM, as before profiles.
    "lightstep": Documented(
        "Lightstep", {s: f"/{s}/otlp/v0.9" for s in SIGNALS}, _one("lightstep-access-token"), _KEY_LINE, _ALL
    ),
    "honeycomb": Documented(
        "Honeycomb", _V1, _honeycomb, f"backend: honeycomb\n{_KEY_LINE}\ndataset: {DEV_DATASET}\n{_BOTH}", _ALL
    ),
    "grafana-cloud": Documented(
        "Grafana Cloud",
        {s: f"/otlp/v1/{s}" for s in SIGNALS},
        _grafana,
        f"backend: grafana-cloud\ninstance_id: {DEV_INSTANCE_ID}\n{_KEY_LINE}\n{_HTTP}",
    ),
    "datadog": Documented("Datadog", _V1, _one("dd-api-key"), f"backend: datadog\n{_KEY_LINE}\n{_HTTP}"),
    "newrelic": Documented("New Relic", _V1, _one("api-key"), f"backend: newrelic\n{_KEY_LINE}\n{_BOTH}", _ALL),
    "dynatrace": Documented(
        "Dynatrace",
        {s: f"/api/v2/otlp/v1/{s}" for s in SIGNALS},
        _one("authorization", "Api-Token"),
        f"backend: dynatrace\n{_KEY_LINE}\n{_HTTP}",
    ),
    "elastic": Documented(
        "Elastic", _V1, _one("authorization", "ApiKey"), f"backend: elastic\n{_KEY_LINE}\n{_BOTH}", _ALL
    ),
    "splunk": Documented(
        "Splunk Observability",
        {"traces": "/v2/trace/otlp", "metrics": "/v2/datapoint/otlp"},
        _one("x-sf-token"),
        f"backend: splunk\n{_KEY_LINE}\n{_BOTH}",
        frozenset({"traces"}),
    ),
    "otlp": Documented(
        "a generic OTLP endpoint",
        _V1,
        _one("x-api-key"),
        "backend: otlp\nheaders: {{x-api-key: {{env: {key}}}}}\n" + _BOTH,
        _ALL,
    ),
}


def key_variable(backend: str) -> str:
    return LIGHTSTEP_KEY_VARIABLE if backend == "lightstep" else KEY_VARIABLE


def account_yaml(backend: str, http: str, grpc: str) -> str:
    """``05-dev-account.yaml``: the dev service account ``ci`` of ``backend``, its endpoint the sinks."""
    doc = DOCUMENTED[backend]
    keys = doc.keys.format(key=key_variable(backend), http=http, grpc=grpc)
    indented = "\n".join(f"    {line}" for line in keys.splitlines())
    return (
        f"# Rewritten by `tracegate dev --backend {backend}` on every start: the dev service account,\n"
        f"# its key made up, its endpoint the recording sink (which plays {doc.title}).\n"
        f"service_accounts:\n  ci:\n{indented}\n"
    )


def account_in_own_file(rules: Path, backend: str) -> bool:
    """Whether the dev account goes in its own file: not when a rules file written before
    ``--backend`` defines ``ci`` itself (Lightstep: it keeps serving; another backend: refused,
    saying what to remove). Raises ValueError."""
    import yaml

    try:
        written = yaml.safe_load(rules.read_text(encoding="utf-8")) if rules.exists() else None
    except (yaml.YAMLError, OSError, ValueError):
        written = None  # the policy loader says what is wrong with it
    old = isinstance(written, dict) and "service_accounts" in written
    if old and backend != "lightstep":
        raise ValueError(
            f"{rules} defines the service account itself (an older `tracegate dev` wrote it); "
            f"remove its service_accounts: block to run --backend {backend}"
        )
    return not old


def banner(backend: str) -> str:
    doc = DOCUMENTED[backend]
    names = dict.fromkeys(n for s in doc.paths for n, _ in doc.headers(s, ""))
    return f"plays {doc.title}: checks {', '.join(doc.paths.values())} and {', '.join(names)}"


def _verdict(backend: str, signal: str, seen: Callable[[str], list[str]], key: str) -> str:
    doc = DOCUMENTED[backend]
    expected = doc.headers(signal, key)
    wrong = [f"{name}: {len(seen(name))} value(s), not the one expected" for name, v in expected if seen(name) != [v]]
    names = {name for name, _ in expected}
    wrong += [f"{name}: the client's credential passed" for name in _CLIENT if name not in names and seen(name)]
    if wrong:
        return f"NOT as {doc.title} documents it: {'; '.join(wrong)}!"
    return f"the account's key; as {doc.title} documents it ({', '.join(n for n, _ in expected)})"


def check_http(backend: str, key: str, method: str, path: str, headers: Any, size: int) -> str:
    """What the HTTP sink saw, and whether it is what ``backend`` documents, as one line.
    ``headers``: a case-insensitive multi-mapping (the sink's CIMultiDict)."""
    doc = DOCUMENTED[backend]
    signal = doc.signal_of(path)
    if signal is None:
        verdict = f"NOT as {doc.title} documents it: the path is none of {', '.join(doc.paths.values())}!"
    else:
        verdict = _verdict(backend, signal, lambda name: list(headers.getall(name, ())), key)
    return f"{method} {path} {size} bytes, {verdict}"


def check_grpc(backend: str, key: str, method: str, metadata: Iterable[tuple[str, str | bytes]], size: int) -> str:
    """The same for a call the gRPC sink received (the signal from its OTLP service)."""
    doc = DOCUMENTED[backend]
    signal = next((s for s, service in _SERVICES.items() if method.startswith(service)), None)
    pairs = [(k, v if isinstance(v, str) else v.decode("latin-1")) for k, v in metadata]
    if signal is None:
        verdict = f"NOT as {doc.title} documents it: not an OTLP Export method!"
    elif signal not in doc.grpc:
        verdict = f"NOT as {doc.title} documents it: it takes {signal} over OTLP/HTTP only (bridge them)!"
    else:
        verdict = _verdict(backend, signal, lambda name: [v for k, v in pairs if k == name], key)
    return f"{method} {size} bytes, {verdict}"
