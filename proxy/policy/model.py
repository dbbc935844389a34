"""The typed policy model that the loader builds and the evaluator reads. Immutable."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

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


#: A webhook entry's markers when it names none: a span through the account's OTLP route.
DEFAULT_MARKERS: frozenset[str] = frozenset({"otlp"})


@dataclass(frozen=True)
class WebhookSource:
    """A repository whose signed webhooks may become deployment markers or CI traces
    (see webhooks). GitLab entries match by ``project_ids`` and/or ``repository`` (the
    project's path); CI spans carry ``service_name`` as their resource's service.name."""

    name: str
    source: Literal["gitea", "forgejo", "gitlab"]
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
    markers_line: int = 0


@dataclass(frozen=True)
class Policy:
    issuers: dict[str, Issuer]
    service_accounts: dict[str, ServiceAccount]
    rules: tuple[Rule, ...]
    webhooks: tuple[WebhookSource, ...] = ()
    files: tuple[str, ...] = ()

    def issuer_by_url(self, url: str) -> Issuer | None:
        for issuer in self.issuers.values():
            if issuer.issuer == url:
                return issuer
        return None
