"""The typed policy model that the loader builds and the evaluator reads. Immutable."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from proxy.backends.native import NativeSpec
from proxy.backends.profiles import Backend, BackendSpec
from proxy.policy.matchers import Matcher
from proxy.secrets import Secret, SecretRef

Signal = Literal["traces", "metrics", "logs"]
SIGNALS: tuple[Signal, ...] = ("traces", "metrics", "logs")

#: Algorithms an issuer may pin. Symmetric ones and ``none`` are never allowed (RFC 8725).
ALLOWED_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384")


@dataclass(frozen=True)
class Where:
    """The file and line a policy element was written at, for messages and explain."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Issuer:
    name: str
    issuer: str
    audiences: tuple[str, ...]
    jwks_uri: str | None
    algorithms: tuple[str, ...]
    where: Where


#: The STS endpoint an ``aws`` issuer allows when it names none: the global one.
DEFAULT_STS_ENDPOINTS = ("https://sts.amazonaws.com",)
#: A SigV4 signature is good for 15 minutes (AWS refuses older ones), so no longer here.
MAX_AWS_MAX_AGE = 900


@dataclass(frozen=True)
class AwsIssuer:
    """An issuer of ``kind: aws``: callers present a presigned ``sts:GetCallerIdentity``
    request (proxy/identity/aws.py) and STS says who signed it. ``issuer`` and ``audiences``
    mirror an OIDC issuer's, so that the identity's ``iss``/``aud`` claims and ``explain``
    read alike: ``iss`` is ``aws:<name>``, the one audience is ``server_id``."""

    name: str
    #: ``aws:<name>``: the ``iss`` claim of its identities (never a URL, so never an OIDC issuer's).
    issuer: str
    #: ``(server_id,)``.
    audiences: tuple[str, ...]
    #: The value of ``X-Tracegate-Server-ID`` the request must be signed with.
    server_id: str
    #: Origins (``https://host[:port]``, normalised) the signed request may name.
    sts_endpoints: tuple[str, ...]
    #: Seconds after its ``X-Amz-Date`` that a signed request is accepted (and cached).
    max_age: int
    where: Where


def endpoint_origin(url: str) -> str:
    """``scheme://host[:port]`` of a URL, as an ``aws`` issuer's ``sts_endpoints`` hold it and
    as a signed request's URL is compared with them: the host lowercased, the scheme's
    default port left out. Raises ValueError for a URL without a host or with a bad port."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    if not host or parts.scheme not in ("https", "http"):
        raise ValueError("not an http(s) URL with a host")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != (443 if parts.scheme == "https" else 80):
        netloc += f":{port}"
    return f"{parts.scheme}://{netloc}"


@dataclass(frozen=True)
class Limits:
    """``limits:`` of a service account or a rule: what one process admits (enforced by
    proxy/gate/quota.py, written as proxy/policy/limits.py reads it). Rates are per second,
    a burst is its bucket's size (defaults: one second's worth), bytes are the request body
    as sent (compressed if it was), and ``daily_bytes`` is spent per UTC day. None: not
    limited. Compared without ``where``: a reload keeps the state of a limit that only moved."""

    requests_per_second: float | None = None
    requests_burst: int | None = None
    bytes_per_second: float | None = None
    bytes_burst: int | None = None
    daily_bytes: int | None = None
    where: Where = field(default=Where("", 0), compare=False)


@dataclass(frozen=True)
class ServiceAccount:
    name: str
    #: The ``access_token`` reference (None for a backend that takes no single key: ``otlp``).
    access_token_ref: SecretRef | None
    signals: frozenset[Signal]
    upstream: str | None
    where: Where
    # None where secrets were not resolved (``tracegate check`` / ``explain``).
    access_token: Secret | None = field(default=None, repr=False, compare=False)
    #: Resource attributes set from verified claims: (attribute, claims, first present
    #: wins). Empty: the body is forwarded byte for byte (see proxy/upstream/stamp.py).
    stamp: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: OTLP/gRPC clients of this account: the gRPC upstream (None: TRACEGATE_GRPC_UPSTREAM),
    #: or ``upstream_protocol: http`` to send their protobuf to the OTLP/HTTP upstream instead.
    grpc_upstream: str | None = None
    upstream_protocol: Literal["grpc", "http"] = "grpc"
    #: The backend profile as written (``backend:`` and its options, secret references);
    #: None: Lightstep with ``access_token``, as before profiles.
    backend: BackendSpec | None = field(default=None, compare=False)
    #: Its resolved credential parts (None where secrets were not resolved).
    credentials: Mapping[str, Secret] | None = field(default=None, repr=False, compare=False)
    #: Where each signal goes, with which headers: built by the runtime from ``backend``,
    #: ``credentials`` and the settings' defaults (None: not built; the forwarder builds
    #: Lightstep's from ``access_token``).
    routes: Backend | None = field(default=None, repr=False, compare=False)
    #: Its native deployment-event settings (``marker_token``, ``stack_url``, …: see
    #: proxy/backends/native.py); None for a backend without a native API.
    native: NativeSpec | None = field(default=None, compare=False)
    #: The resolved ``marker_token`` (None: none written, or secrets not resolved).
    native_token: Secret | None = field(default=None, repr=False, compare=False)
    #: Its quotas, per tracegate process (None: none).
    limits: Limits | None = None


def credential_refs(account: ServiceAccount) -> list[SecretRef]:
    """Every secret reference an account's backend reads (watched for rotation)."""
    if account.backend is not None:
        refs = [ref for ref in account.backend.credentials.values() if isinstance(ref, SecretRef)]
    else:
        refs = [account.access_token_ref] if account.access_token_ref is not None else []
    if account.native is not None and account.native.token is not None:
        refs.append(account.native.token)
    return refs


@dataclass(frozen=True)
class Rule:
    name: str
    issuer: str
    effect: Literal["allow", "deny"]
    when: tuple[tuple[str, Matcher], ...]
    service_account: str | None
    services: tuple[str, ...]
    where: Where
    #: Quotas shared by every identity this rule admits, per process (None: none).
    limits: Limits | None = None


#: A webhook entry's markers when it names none: a span through the account's OTLP route.
DEFAULT_MARKERS: frozenset[str] = frozenset({"otlp"})


@dataclass(frozen=True)
class DoraSettings:
    """``dora:`` of a webhook entry (docs/delivery-metrics.md): the environments whose
    deployments count, how long after a deployment a failed deployment, a rollback or a revert
    still marks it a failed change (``failure_window``, seconds), and how long a point waits
    for deliveries that arrive late or out of order before it is computed (``settle``, seconds)."""

    environments: Matcher = field(default_factory=lambda: Matcher(("*",)))
    failure_window: float = 86400.0
    settle: float = 300.0


@dataclass(frozen=True)
class WebhookSource:
    """A repository whose signed webhooks may become deployment markers or CI traces
    (see webhooks). GitLab entries match by ``project_ids`` and/or ``repository`` (the
    project's path); CI spans carry ``service_name`` as their resource's service.name."""

    name: str
    source: Literal["gitea", "forgejo", "gitlab", "github"]
    repository: Matcher
    secret_refs: tuple[SecretRef, ...]
    events: frozenset[str]
    refs: Matcher
    service_account: str
    services: tuple[str, ...]
    where: Where
    secrets: tuple[Secret, ...] = field(default=(), repr=False, compare=False)
    project_ids: frozenset[str] = frozenset()
    service_name: str = ""
    #: The forge's base URL (``instance:``, normalised) the entry pins: it keys the trace
    #: and bounds the links, whatever host the sender names. None: the sender's.
    instance: str | None = None
    #: What its markers become: ``otlp`` (a span, the default) and/or ``native`` (the
    #: backend's own deployment-event API), and the line ``markers:`` is written at.
    markers: frozenset[str] = DEFAULT_MARKERS
    #: Whose ids its CI spans carry (``trace_ids:``, :mod:`proxy.ci.trace_ids`): tracegate's
    #: derivation or the OpenTelemetry Collector's.
    trace_ids: str = "tracegate"
    markers_line: int = 0
    #: Delivery metrics it sends (``metrics:``): ``cicd`` (semantic-convention pipeline
    #: metrics), ``dora`` (the four keys, per ``dora:``); none by default.
    metrics: frozenset[str] = frozenset()
    dora: DoraSettings = field(default_factory=DoraSettings)


@dataclass(frozen=True)
class Policy:
    issuers: dict[str, Issuer]
    service_accounts: dict[str, ServiceAccount]
    rules: tuple[Rule, ...]
    webhooks: tuple[WebhookSource, ...] = ()
    files: tuple[str, ...] = ()
    #: Issuers of ``kind: aws``, apart from ``issuers`` (whose entries each get a JWKS key
    #: source): names are unique across both.
    aws_issuers: dict[str, AwsIssuer] = field(default_factory=dict)

    def knows_issuer(self, name: str) -> bool:
        return name in self.issuers or name in self.aws_issuers

    def issuer_by_url(self, url: str) -> Issuer | AwsIssuer | None:
        found: list[Issuer | AwsIssuer] = [*self.issuers.values(), *self.aws_issuers.values()]
        return next((issuer for issuer in found if issuer.issuer == url), None)
