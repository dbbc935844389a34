"""The gateway door: tracegate as the decision point behind nginx, Envoy or Traefik.

A gateway carries the bytes and asks this listener only "who is this, and which key do
they get?". A check request carries the client's headers and no body; where the original
method and path are depends on the gateway (:data:`DIALECTS`):

* ``nginx`` ``auth_request``: ``X-Original-URI`` / ``X-Original-Method``, set by the
  shipped config with ``proxy_set_header`` (so a client's own copies are overwritten).
* ``envoy`` HTTP ``ext_authz``: the check *is* the original method and path, under the
  ``http_service`` ``path_prefix`` (``TRACEGATE_AUTHZ_PATH_PREFIX``).
* ``traefik`` ``ForwardAuth``: ``X-Forwarded-Uri`` / ``X-Forwarded-Method``, which Traefik
  overwrites while ``trustForwardHeader`` is false.

The dialect is configured, never sniffed per request: a client could otherwise send its own
``X-Original-URI`` through a gateway that does not overwrite it, and be decided for one
signal while the gateway forwards another.

The path names the signal (OTLP/HTTP, OTLP/gRPC service paths, the configured upstream
paths); then :func:`proxy.gate.admission.admit` decides, exactly as for the ingest: same token
rules, token cache, policy, audit line (``event: authz``) and metrics (``transport=authz``).
An unknown path, a method other than POST, or a check without its original request is
denied, and so is an account with ``stamp:`` (``stamp-needs-proxy``): the gateway forwards
the body untouched, so an answer with its key would let the client's own identity
attributes through unstamped. An allow is answered 200 with the account's key in a
header; every answer carries cache hints so that no gateway honours an allow past the
token's ``exp`` or past ``TRACEGATE_AUTHZ_MAX_AGE_SECONDS`` (the bound on how long a
rotated key takes to arrive).

Security: the answers carry account keys. The listener is meant for loopback or a
pod-local address; it can require mTLS (the shared ``TRACEGATE_TLS_*`` settings) and/or a
shared secret in ``X-Tracegate-Authz-Secret``, compared in constant time.
"""

from __future__ import annotations

import hmac
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import MultiDict

from proxy.answers import refusal
from proxy.backends.profiles import GATEWAY_HEADERS, LIGHTSTEP_KEY
from proxy.doors.protocol import guard
from proxy.errors import BodyError, ConfigError
from proxy.gate.admission import Admitted, Refused, admit, refuse
from proxy.gate.runtime import Runtime
from proxy.secrets import Secret, SecretUnavailable, resolve

#: The header a gateway puts its shared secret in (when TRACEGATE_AUTHZ_SECRET is set).
SECRET_HEADER = "X-Tracegate-Authz-Secret"  # noqa: S105 - a header name
#: OTLP/gRPC service paths, by signal (opentelemetry-proto collector services).
GRPC_PATHS = {
    "traces": "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    "metrics": "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
    "logs": "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
}
#: The signal label of a check whose path names none.
NO_SIGNAL = "unknown"
#: The refusal of an account with ``stamp:``. 403, as every policy refusal of this door:
#: nginx's ``auth_request`` takes 2xx, 401 and 403 as answers and turns any other status
#: into a 500, and a 4xx other than 401 is "denied" to Envoy and Traefik alike.
STAMP_NEEDS_PROXY = "stamp-needs-proxy"
_UNSAFE = re.compile(r"[^\x21-\x7e]")


def signal_paths(upstream_paths: Mapping[str, str]) -> dict[str, str]:
    """Path → signal: OTLP/HTTP ``/v1/<signal>``, the OTLP/gRPC methods, and the configured
    upstream paths. Raises ConfigError if one path would name two signals."""
    table: dict[str, str] = {}
    sources = [{s: f"/v1/{s}" for s in GRPC_PATHS}, GRPC_PATHS, upstream_paths]
    for source in sources:
        for signal, path in source.items():
            if table.setdefault(path, signal) != signal:
                raise ConfigError(
                    f"upstream path {path} is also the OTLP path of {table[path]}: the authorization listener "
                    f"could not tell {signal} from {table[path]}; set TRACEGATE_UPSTREAM_PATH_{signal.upper()} "
                    "to the upstream's own path for it"
                )
    return table


@dataclass(frozen=True)
class Original:
    method: str
    target: str  # path and query, as the client sent them


def _one(request: web.Request, name: str) -> str | None:
    values = request.headers.getall(name, ())
    return values[0] if len(values) == 1 and values[0] else None


def original_request(request: web.Request, dialect: str, prefix: str) -> Original | None:
    """The client's method and request target, read where ``dialect`` puts them; None if
    the check request does not carry them (a gateway that is not configured as shipped)."""
    if dialect == "envoy":
        target = request.raw_path
        if prefix:
            if not target.startswith(prefix + "/"):
                return None
            target = target[len(prefix) :]
        return Original(request.method, target)
    uri, method = (
        ("X-Original-URI", "X-Original-Method") if dialect == "nginx" else ("X-Forwarded-Uri", "X-Forwarded-Method")
    )
    found, verb = _one(request, uri), _one(request, method)
    if found is None or verb is None:
        return None
    return Original(verb, found)


def _cache_headers(seconds: int) -> dict[str, str]:
    """nginx honours ``X-Accel-Expires`` over ``Cache-Control`` and caches a ``private``
    answer only when ``X-Accel-Expires`` comes first: it is written first."""
    return {"X-Accel-Expires": str(seconds), "Cache-Control": f"private, max-age={seconds}"}


def _header_safe(name: str) -> str:
    return _UNSAFE.sub("?", name)[:128]


class AuthzDoor:
    """The check handler, with what it needs resolved once at start."""

    def __init__(self, runtime: Runtime, secret: Secret | None) -> None:
        settings = runtime.settings
        self.runtime = runtime
        self.secret = secret
        self.dialect = settings.authz_dialect
        self.prefix = settings.authz_path_prefix
        self.key_header = settings.authz_key_header
        self._gateway_names = (GATEWAY_HEADERS - {LIGHTSTEP_KEY}) | {self.key_header.lower()}
        self.max_age = settings.authz_max_age
        self.deny_max_age = settings.authz_deny_max_age
        self.signals = signal_paths(settings.paths)

    def _gateway_ok(self, request: web.Request) -> bool:
        if self.secret is None:
            return True
        presented = request.headers.getall(SECRET_HEADER, ())
        if len(presented) != 1:
            return False
        # A header can carry any bytes (aiohttp keeps them as surrogates): compare bytes.
        given = presented[0].encode("utf-8", "surrogateescape")
        return hmac.compare_digest(given, self.secret.reveal().encode())

    async def check(self, request: web.Request) -> web.StreamResponse:
        runtime = self.runtime
        content_type = request.headers.get("Content-Type")
        if not self._gateway_ok(request):
            return self._deny(self._refuse(NO_SIGNAL, "authz-gateway-unauthenticated"), content_type)
        original = original_request(request, self.dialect, self.prefix)
        if original is None:
            return self._deny(self._refuse(NO_SIGNAL, "authz-no-original-request"), content_type)
        path, _, query_string = original.target.partition("?")
        signal = self.signals.get(path)
        if signal is None:
            return self._deny(self._refuse(NO_SIGNAL, "authz-unknown-path"), content_type)
        if original.method != "POST":
            return self._deny(self._refuse(signal, "authz-method-not-allowed"), content_type)
        query = MultiDict(parse_qsl(query_string, keep_blank_values=True))
        decided = await admit(runtime, request.headers, query, signal=signal, transport="authz", mode="authz")
        if isinstance(decided, Refused):
            return self._deny(decided, content_type)
        if decided.account.stamp:
            # The gateway sends the client's body as it came, forged identity attributes and
            # all: a stamping account is served only where the stamp is applied, by the proxy.
            decided.record("denied", STAMP_NEEDS_PROXY)
            return self._deny(Refused(403, STAMP_NEEDS_PROXY), content_type)
        return self._allow(decided)

    def _refuse(self, signal: str, reason: str) -> Refused:
        return refuse(self.runtime, signal=signal, transport="authz", reason=reason, status=403, mode="authz")

    def _allow(self, admitted: Admitted) -> web.Response:
        forwarder = self.runtime.forwarder
        try:
            if forwarder is None:
                raise ConfigError("runtime not started")
            route = forwarder.route(admitted.account, admitted.signal)
        except (ConfigError, BodyError):  # loaded without secrets, or a signal its backend takes not
            admitted.record("denied", "account-without-key")
            return self._deny(Refused(403, "account-without-key"), None)
        remaining = admitted.identity.exp - self.runtime.clock()
        # A signed ``exp`` of Infinity or NaN (JSON allows neither, Python's parser both) is not cacheable.
        seconds = max(0, min(self.max_age, math.floor(remaining))) if math.isfinite(remaining) else 0
        rule = admitted.decision.rule
        quotas = self.runtime.gate.quotas
        if quotas is not None and rule is not None and quotas.covers(rule.name):
            seconds = 0  # a quota counts every request: a cached allow would go uncounted
        # The account's whole credential header set, by the backend's own names (Lightstep's
        # key under TRACEGATE_AUTHZ_KEY_HEADER, as before profiles).
        credentials = {self.key_header if name == LIGHTSTEP_KEY else name: value for name, value in route.reveal()}
        headers = {
            **_cache_headers(seconds),
            **credentials,
            "x-tracegate-account": _header_safe(admitted.account.name),
            "x-tracegate-rule": _header_safe(rule.name if rule is not None else ""),
            # Envoy removes these after setting the allowed headers: every credential name
            # this account does not set (a client's copy, its token among them), never its own.
            "x-envoy-auth-headers-to-remove": ",".join(sorted(self._gateway_names - {n.lower() for n in credentials})),
        }
        admitted.record("allowed", "authorized")
        return web.Response(status=200, headers=headers)

    def _deny(self, refused: Refused, content_type: str | None) -> web.Response:
        response = refusal(refused.status, content_type, retry_after=refused.retry_after)
        if refused.status in (429, 503):  # retryable: never cached past its Retry-After
            response.headers["X-Accel-Expires"] = "0"
            response.headers["Cache-Control"] = "no-store"
        else:
            for name, value in _cache_headers(self.deny_max_age).items():
                response.headers[name] = value
        return response


def resolve_secret(runtime: Runtime) -> Secret | None:
    ref = runtime.settings.authz_secret
    if ref is None:
        return None
    try:
        return resolve(ref, runtime.environ)
    except SecretUnavailable as exc:
        raise ConfigError(f"TRACEGATE_AUTHZ_SECRET: {exc}") from None


def build_authz_app(runtime: Runtime) -> web.Application:
    """The authorization listener's app: every path and method is a check (Envoy sends the
    original ones); nothing else is served on it."""
    door = AuthzDoor(runtime, resolve_secret(runtime))
    app = web.Application(client_max_size=1024, middlewares=[guard(runtime.metrics)])
    app.router.add_route("*", "/{tail:.*}", door.check)
    return app
