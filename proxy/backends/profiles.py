"""Backend profiles: where a service account's telemetry goes and how it authenticates there.

Each profile is data from the vendor's own documentation (sources: tests/test_backends.py): per
signal, the OTLP/HTTP URL, the OTLP/gRPC target or None, whether OTLP/JSON is accepted, the headers.
``lightstep``, the default, is tracegate's behaviour before profiles, byte for byte. One way through:
:func:`parse_backend` (YAML -> :class:`BackendSpec` with secret *references*, or problems),
:func:`resolve_credentials`, :func:`build_backend`; :func:`preview` uses placeholder secrets.
Security caveat: every credential value, the composed ``Basic`` one too, is a masked
:class:`~proxy.secrets.Secret`; only :meth:`Route.reveal` gives wire values.
"""

from __future__ import annotations

import base64
import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

from proxy.secrets import Secret, SecretRef, SecretUnavailable, parse_ref, resolve
from proxy.urls import check_grpc_target, check_url

Signal = Literal["traces", "metrics", "logs"]
SIGNALS: tuple[Signal, ...] = ("traces", "metrics", "logs")
DEFAULT_BACKEND = "lightstep"
#: OTLP/HTTP's standard per-signal paths (OTLP specification, "OTLP/HTTP Request").
OTLP_PATHS: Mapping[Signal, str] = MappingProxyType({s: f"/v1/{s}" for s in SIGNALS})
#: Lightstep's OTLP/HTTP paths, as tracegate has always used them (proxy/upstream/forward.py).
LIGHTSTEP_PATHS: Mapping[Signal, str] = MappingProxyType({s: f"/{s}/otlp/v0.9" for s in SIGNALS})
_ALL: frozenset[Signal] = frozenset(SIGNALS)
#: Lightstep's credential header (the gateway door may rename it: TRACEGATE_AUTHZ_KEY_HEADER).
LIGHTSTEP_KEY = "lightstep-access-token"
#: Every header a profile but ``otlp`` (whose names are the user's) sets: the shipped gateway
#: configs pass each through from the authz answer, and the answer has Envoy remove those an
#: account does not set (tests/test_deploy_gateways.py derives it from the profiles).
GATEWAY_HEADERS: frozenset[str] = frozenset(
    {
        LIGHTSTEP_KEY,
        "authorization",
        "x-honeycomb-team",
        "x-honeycomb-dataset",
        "dd-api-key",
        "dd-otlp-source",
        "api-key",
        "x-sf-token",
    }
)


@dataclass(frozen=True)
class Header:
    """A header the profile sets (lower-case name: HTTP header and gRPC metadata key alike);
    a credential's value is a Secret, so the repr of anything holding it stays masked."""

    name: str
    value: Secret | str

    def reveal(self) -> str:
        return self.value.reveal() if isinstance(self.value, Secret) else self.value


@dataclass(frozen=True)
class Route:
    """One signal's way in: ``grpc`` is the OTLP/gRPC target (proxy.urls.grpc_address), None where
    only OTLP/HTTP is accepted (bridge gRPC clients); ``json``: OTLP/JSON accepted, else protobuf only."""

    signal: Signal
    url: str
    grpc: str | None
    json: bool
    headers: tuple[Header, ...]
    #: The names ``headers`` sets: a client's header of one of these names never goes upstream.
    names: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", frozenset(h.name for h in self.headers))

    def header_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.headers)

    def reveal(self) -> tuple[tuple[str, str], ...]:
        """The wire headers with their values: call only where the request leaves."""
        return tuple((h.name, h.reveal()) for h in self.headers)


@dataclass(frozen=True)
class Backend:
    """An account's resolved backend: one Route per signal it may send."""

    profile: str
    routes: Mapping[Signal, Route]

    @property
    def set_header_names(self) -> frozenset[str]:
        """Every name a route sets: the client's copies are dropped, never merged."""
        return frozenset(h.name for r in self.routes.values() for h in r.headers)

    @property
    def credential_header_names(self) -> frozenset[str]:
        return frozenset(h.name for r in self.routes.values() for h in r.headers if isinstance(h.value, Secret))


@dataclass(frozen=True)
class Defaults:
    """What ``lightstep`` keeps honouring: TRACEGATE_UPSTREAM, _UPSTREAM_PATH_*, _GRPC_UPSTREAM."""

    upstream: str = "https://ingest.lightstep.com"
    paths: Mapping[Signal, str] = field(default_factory=lambda: LIGHTSTEP_PATHS)
    grpc_upstream: str = "ingest.lightstep.com:443"


@dataclass(frozen=True)
class BackendProblem:
    """One thing wrong; ``key`` names the account key (the loader adds file:line from it)."""

    key: str
    message: str


@dataclass(frozen=True)
class BackendSpec:
    """A backend as written, options canonical; ``credentials``: part (access_token, instance_id,
    header:<name>) -> its reference, or a literal where not secret (a Grafana instance id)."""

    backend: str
    options: Mapping[str, str] = field(default_factory=dict)
    credentials: Mapping[str, SecretRef | str] = field(default_factory=dict)
    headers: tuple[tuple[str, SecretRef | str], ...] = ()  # backend: otlp
    upstream: str | None = None
    grpc_upstream: str | None = None
    json: bool = True  # backend: otlp
    signals: frozenset[Signal] = _ALL


@dataclass(frozen=True)
class Option:
    """``choices``: each accepted spelling -> its canonical value; or a ``pattern`` (``hint``: an example)."""

    key: str
    choices: Mapping[str, str] | None = None
    pattern: str | None = None
    hint: str = ""
    default: str | None = None


Resolved = tuple[dict[str, Secret], list["BackendProblem"]]
Builder = Callable[["BackendSpec", Mapping[str, Secret], Defaults], dict[Signal, Route]]


@dataclass(frozen=True)
class Profile:
    name: str
    build: Builder
    options: tuple[Option, ...] = ()
    grpc: bool = False  # OTLP/gRPC accepted for at least one signal
    signals: frozenset[Signal] = _ALL
    secrets: tuple[str, ...] = ("access_token",)  # required credential parts
    needs: str = ""  # the option that places the endpoint; ``upstream`` may stand in for it


def _join(base: str, path: str, prefix: str = "") -> str:
    base = base.rstrip("/")
    if prefix and urlsplit(base).path.rstrip("/").endswith(prefix):
        prefix = ""  # pasted from the vendor's console with it (Grafana's /otlp, Dynatrace's /api/v2/otlp)
    return base + prefix + path


def _routes(base: str, paths: Mapping[Signal, str], grpc: Any, js: Any, hs: Any, pre: str = "") -> dict[Signal, Route]:
    """Routes for ``paths``; ``grpc``/``json``/``headers`` are one value or a per-signal map."""

    def of(value: Any, s: Signal) -> Any:
        return value[s] if isinstance(value, Mapping) else value

    return {s: Route(s, _join(base, p, pre), of(grpc, s), of(js, s), of(hs, s)) for s, p in paths.items()}


def _lightstep(spec: BackendSpec, creds: Mapping[str, Secret], d: Defaults) -> dict[Signal, Route]:
    host = spec.options.get("region")
    base = spec.upstream or (f"https://{host}" if host else d.upstream)
    grpc = spec.grpc_upstream or (f"{host}:443" if host else d.grpc_upstream)
    return _routes(base, d.paths, grpc, True, (Header(LIGHTSTEP_KEY, creds["access_token"]),))


_HNY_SETS: tuple[tuple[Signal, str], ...] = (
    ("traces", "traces_dataset"),
    ("metrics", "dataset"),
    ("logs", "logs_dataset"),
)


def _honeycomb(spec: BackendSpec, creds: Mapping[str, Secret], d: Defaults) -> dict[Signal, Route]:
    host, team = spec.options["region"], Header("x-honeycomb-team", creds["access_token"])
    sets = {s: spec.options.get(k) for s, k in _HNY_SETS}
    headers = {s: (team, Header("x-honeycomb-dataset", d)) if d else (team,) for s, d in sets.items()}
    grpc = spec.grpc_upstream or (_grpc_from(spec.upstream) if spec.upstream else f"{host}:443")
    return _routes(spec.upstream or f"https://{host}", OTLP_PATHS, grpc, True, headers)


def _grafana(spec: BackendSpec, creds: Mapping[str, Secret], d: Defaults) -> dict[Signal, Route]:
    base = spec.upstream or f"https://otlp-gateway-{spec.options.get('region')}.grafana.net"
    pair = f"{creds['instance_id'].reveal()}:{creds['access_token'].reveal()}".encode()
    basic = Secret("Basic " + base64.b64encode(pair).decode("ascii"))
    return _routes(base, OTLP_PATHS, None, True, (Header("authorization", basic),), pre="/otlp")


def _datadog(spec: BackendSpec, creds: Mapping[str, Secret], d: Defaults) -> dict[Signal, Route]:
    key, source = Header("dd-api-key", creds["access_token"]), spec.options.get("otlp_source")
    headers = {s: (key, Header("dd-otlp-source", source)) if s == "traces" and source else (key,) for s in SIGNALS}
    json = {"traces": True, "metrics": True, "logs": False}  # the logs page documents http/protobuf only
    return _routes(spec.upstream or f"https://otlp.{spec.options.get('site')}", OTLP_PATHS, None, json, headers)


def _splunk(spec: BackendSpec, creds: Mapping[str, Secret], d: Defaults) -> dict[Signal, Route]:
    host = f"ingest.{spec.options.get('realm')}.{spec.options['domain']}"
    key = Header("x-sf-token", creds["access_token"])
    paths: dict[Signal, str] = {"traces": "/v2/trace/otlp", "metrics": "/v2/datapoint/otlp"}
    target = spec.grpc_upstream or (_grpc_from(spec.upstream) if spec.upstream else f"{host}:443")
    grpc = {"traces": target, "metrics": None}  # gRPC documented for traces only
    return _routes(spec.upstream or f"https://{host}", paths, grpc, False, (key,))


def _otlp(spec: BackendSpec, creds: Mapping[str, Secret], d: Defaults) -> dict[Signal, Route]:
    headers = tuple(Header(n, creds[f"header:{n}"] if isinstance(v, SecretRef) else v) for n, v in spec.headers)
    return _routes(spec.upstream or "", OTLP_PATHS, spec.grpc_upstream, spec.json, headers)


def _keyed(header: str, scheme: str = "", *, host: str = "{}", grpc: bool, prefix: str = "") -> Builder:
    """One secret in one header, after the vendor's scheme word (Api-Token, ApiKey) if any."""

    def build(spec: BackendSpec, creds: Mapping[str, Secret], d: Defaults) -> dict[Signal, Route]:
        base = spec.upstream or "https://" + host.format(spec.options.get("region") or spec.options.get("environment"))
        word, token = spec.options.get("token_type", scheme), creds["access_token"]
        key = Header(header, Secret(f"{word} {token.reveal()}") if word else token)
        target = spec.grpc_upstream or (_grpc_from(base) if grpc else None)
        return _routes(base, OTLP_PATHS, target, False, (key,), prefix)

    return build


def _grpc_from(url: str) -> str:
    """The gRPC target on the OTLP/HTTP URL's host and port (Elastic, New Relic, Honeycomb and Splunk
    serve both): an endpoint placed by ``upstream:`` alone takes its gRPC clients too."""
    p = urlsplit(url)
    host = f"[{p.hostname}]" if ":" in (p.hostname or "") else p.hostname  # an IPv6 literal keeps its brackets
    return f"{host}:{p.port or 443}" if p.scheme == "https" else f"http://{host}:{p.port or 80}"


_LS = Option("region", {"us": "ingest.lightstep.com", "eu": "ingest.eu.lightstep.com"})
_HNY = Option("region", {"us": "api.honeycomb.io", "eu": "api.eu1.honeycomb.io"}, default="us")
_GC = Option("region", pattern=r"prod-[a-z]+-[a-z]+-\d+", hint="prod-eu-west-2")
_DD_SITES = ("datadoghq.com", "datadoghq.eu", "us3.datadoghq.com", "us5.datadoghq.com", "ap1.datadoghq.com")
_DD = (Option("site", {s: s for s in (*_DD_SITES, "ap2.datadoghq.com")}), Option("otlp_source"))
_NR_HOSTS = {"us": "otlp.nr-data.net", "eu": "otlp.eu01.nr-data.net", "fedramp": "gov-otlp.nr-data.net"}
_NR = Option("region", _NR_HOSTS, default="us")
_DT = Option("environment", pattern="[a-z0-9]{3,32}", hint="abc12345, from https://abc12345.live.dynatrace.com")
_DT_TOKEN = Option("token_type", {"api-token": "Api-Token", "platform": "Bearer"}, default="api-token")
_REALMS = Option("realm", {r: r for r in ("us0", "us1", "us2", "eu0", "eu1", "eu2", "au0", "jp0", "sg0")})
_SPLUNK_DOMAINS = {"signalfx": "signalfx.com", "splunkcloud": "observability.splunkcloud.com"}
_SPLUNK = Option("domain", _SPLUNK_DOMAINS, default="signalfx")
_DYNATRACE = _keyed("authorization", "Api-Token", host="{}.live.dynatrace.com", grpc=False, prefix="/api/v2/otlp")
_PROFILES = (
    Profile("lightstep", _lightstep, (_LS,), grpc=True),
    Profile("honeycomb", _honeycomb, (_HNY, *(Option(k) for _, k in _HNY_SETS)), grpc=True),
    Profile("grafana-cloud", _grafana, (_GC,), secrets=("instance_id", "access_token"), needs="region"),
    Profile("datadog", _datadog, _DD, needs="site"),
    Profile("newrelic", _keyed("api-key", grpc=True), (_NR,), grpc=True),
    Profile("dynatrace", _DYNATRACE, (_DT, _DT_TOKEN), needs="environment"),
    Profile("elastic", _keyed("authorization", "ApiKey", grpc=True), grpc=True, needs="upstream"),
    Profile("splunk", _splunk, (_REALMS, _SPLUNK), grpc=True, signals=frozenset({"traces", "metrics"}), needs="realm"),
    Profile("otlp", _otlp, grpc=True, secrets=(), needs="upstream"),
)
PROFILES: Mapping[str, Profile] = MappingProxyType({p.name: p for p in _PROFILES})
BACKENDS: tuple[str, ...] = tuple(PROFILES)
_OPTIONS = tuple(dict.fromkeys(o.key for p in _PROFILES for o in p.options))
#: Every service-account key this module reads; the loader adds them to the keys it allows.
BACKEND_KEYS: tuple[str, ...] = ("backend", "instance_id", "headers", "json", *_OPTIONS)
#: Header names backend: otlp may not set (framing, hop-by-hop, or chosen by tracegate).
_FRAMING = ("host", "content-length", "content-type", "content-encoding", "transfer-encoding", "expect")
RESERVED_HEADERS = frozenset((*_FRAMING, "connection", "keep-alive", "te", "trailer", "upgrade", "accept-encoding"))
_NUMBER = {"instance_id": " or the number itself"}
_TOKEN = re.compile(r"[!#$%&'*+.^`|~0-9a-z-]+")
_CREDENTIAL_WORDS = re.compile(r"auth|cookie|key|token|secret|password|signature")


def build_backend(spec: BackendSpec, credentials: Mapping[str, Secret], defaults: Defaults = Defaults()) -> Backend:
    """The account's routes for the signals it may send; ``credentials`` from resolve_credentials."""
    routes = PROFILES[spec.backend].build(spec, credentials, defaults)
    return Backend(spec.backend, MappingProxyType({s: r for s, r in routes.items() if s in spec.signals}))


def preview(spec: BackendSpec, defaults: Defaults = Defaults()) -> Backend:
    """The routes with placeholder secrets: URLs and header *names* for check and explain."""
    fake = {part: Secret(v if isinstance(v, str) else "0") for part, v in spec.credentials.items()}
    return build_backend(spec, fake, defaults)


def resolve_credentials(spec: BackendSpec, environ: Mapping[str, str]) -> Resolved:
    """Read every secret part now (on load and on each reload, so rotation follows the files)."""
    out: dict[str, Secret] = {}
    problems: list[BackendProblem] = []
    for part, ref in spec.credentials.items():
        try:
            out[part] = resolve(ref, environ) if isinstance(ref, SecretRef) else Secret(ref)
        except SecretUnavailable as exc:
            key, what = ("headers", part[7:]) if part.startswith("header:") else (part, part)
            problems.append(BackendProblem(key, f"{what}: {exc}; set it or fix the reference"))
    return out, problems


def secret_ref(value: Any, what: str) -> SecretRef | str:
    """A secret reference, or the message saying why ``value`` is not one (never echoing it)."""
    return parse_ref(value, what)


def allowed(bad: str, choices: Any) -> str:
    """``allowed: a, b`` with a "did you mean" for a near miss (a typo'd region, a backend)."""
    close = difflib.get_close_matches(bad, list(choices), n=1)
    return (f"did you mean {close[0]!r}? " if close else "") + "allowed: " + ", ".join(choices)


def parse_backend(entry: Mapping[str, Any]) -> tuple[BackendSpec | None, list[BackendProblem]]:
    """A service account's raw YAML mapping -> (spec, []) or (None, every problem); no message echoes a secret."""
    problems: list[BackendProblem] = []

    def bad(key: str, message: str) -> None:
        problems.append(BackendProblem(key, message))

    name = entry.get("backend", DEFAULT_BACKEND)
    profile = PROFILES.get(name) if isinstance(name, str) else None
    if profile is None:
        return None, [
            BackendProblem("backend", f"backend {str(name)[:40]!r} is unknown; {allowed(str(name), BACKENDS)}")
        ]
    own = {o.key for o in profile.options} | set(profile.secrets) | ({"headers", "json"} if name == "otlp" else set())
    for key in (k for k in entry if k in BACKEND_KEYS and k not in own and k != "backend"):
        bad(key, f"{key} is not a key of backend {name}; its keys: {', '.join(sorted(own)) or 'none'}")
    if name == "otlp" and "access_token" in entry:
        bad("access_token", "backend otlp takes its credentials in headers:, not access_token")
    options: dict[str, str] = {}
    for opt in profile.options:
        value = entry.get(opt.key, opt.default)
        if value is None:
            continue
        if not isinstance(value, str) or not value or not value.isprintable():
            bad(opt.key, f"{opt.key} must be a non-empty string on one line")
        elif opt.choices is not None and value not in opt.choices:
            bad(opt.key, f"{opt.key} {value[:40]!r} is not a {name} {opt.key}; {allowed(value, opt.choices)}")
        elif opt.pattern is not None and not re.fullmatch(opt.pattern, value):
            bad(opt.key, f"{opt.key} {value[:40]!r} does not look like a {name} {opt.key} (for example {opt.hint})")
        else:
            options[opt.key] = opt.choices[value] if opt.choices is not None else value
    urls = {k: entry.get(k) for k in ("upstream", "grpc_upstream")}
    for key, check in (("upstream", check_url), ("grpc_upstream", check_grpc_target)):
        value = urls[key]
        if value is not None and (problem := check(value) if isinstance(value, str) else "must be a string"):
            bad(key, f"{key}: {problem}")
    need, placed = profile.needs, entry.get(profile.needs) is not None
    if need and not placed and urls["upstream"] is None:
        bad(need, f"backend {name} needs {need}" + ("" if need == "upstream" else " (or upstream: the endpoint's URL)"))
    elif need not in ("", "upstream") and placed and urls["upstream"] is not None:
        bad(need, f"backend {name}: set {need} or upstream, not both")
    credentials: dict[str, SecretRef | str] = {}
    for part in profile.secrets:
        value = entry.get(part)
        if value is None:
            bad(part, f"backend {name} needs {part}: {{env: NAME}} or {{file: /path}}" + _NUMBER.get(part, ""))
        elif part == "instance_id" and isinstance(value, int | str) and str(value).isdigit():
            credentials[part] = str(value)  # a stack's numeric id is no secret; it may be written out
        elif isinstance(ref := secret_ref(value, part), SecretRef):
            credentials[part] = ref
        else:
            bad(part, ref)
    headers = _headers(entry.get("headers"), bad) if name == "otlp" else ()
    credentials |= {f"header:{n}": v for n, v in headers if isinstance(v, SecretRef)}
    if not isinstance(json := entry.get("json", True), bool):
        bad("json", "json must be true or false")
    signals = _signals(entry.get("signals"), profile, bad)
    if urls["grpc_upstream"] is not None and not profile.grpc:
        bad("grpc_upstream", f"backend {name} takes OTLP/HTTP only (gRPC clients are bridged); remove grpc_upstream")
    if entry.get("upstream_protocol") == "grpc" and not profile.grpc:
        bad("upstream_protocol", f"backend {name} takes OTLP/HTTP only; remove upstream_protocol: grpc")
    if problems:
        return None, problems
    return BackendSpec(name, options, credentials, headers, urls["upstream"], urls["grpc_upstream"], json, signals), []


def _signals(written: Any, profile: Profile, bad: Callable[[str, str], None]) -> frozenset[Signal]:
    """The account's signals (unknown names are the loader's); absent: all the backend accepts."""
    if written is None:
        return profile.signals
    names = [written] if isinstance(written, str) else list(written) if isinstance(written, list) else []
    if refused := [s for s in SIGNALS if s in names and s not in profile.signals]:
        accepted = ", ".join(s for s in SIGNALS if s in profile.signals)
        bad("signals", f"backend {profile.name} does not accept {', '.join(refused)} over OTLP; accepted: {accepted}")
    return frozenset(s for s in SIGNALS if s in names and s in profile.signals)


def _headers(raw: Any, bad: Callable[[str, str], None]) -> tuple[tuple[str, SecretRef | str], ...]:
    """backend: otlp's headers: a credential-looking name must take a secret reference."""
    if not isinstance(raw, Mapping) or not raw:
        bad("headers", "backend otlp needs headers: {name: {env: NAME}, {file: /path} or a non-secret value}")
        return ()
    out: list[tuple[str, SecretRef | str]] = []
    for name, value in raw.items():
        lower = str(name).strip().lower()
        if not _TOKEN.fullmatch(lower) or lower in RESERVED_HEADERS or lower.startswith(("x-forwarded-", "proxy-")):
            bad("headers", f"headers: {str(name)[:40]!r} cannot be set upstream (invalid, reserved or hop-by-hop)")
        elif isinstance(value, str) and not _CREDENTIAL_WORDS.search(lower) and not any(c in value for c in "\r\n\0"):
            out.append((lower, value))
        elif isinstance(ref := secret_ref(value, f"headers.{lower}"), SecretRef):
            out.append((lower, ref))
        else:
            bad("headers", ref)
    return tuple(out)
