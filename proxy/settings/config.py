"""Process settings, from command-line flags, then ``TRACEGATE_*`` variables, then defaults.

Read from an injected mapping (``environ=``), never from ``os.environ`` directly, so tests
and the demo build settings without touching the process environment. ``OPTIONS`` is the
one table of every setting; the settings table of docs/operations.md is written from it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError
from proxy.secrets import SecretRef
from proxy.settings import cpus
from proxy.settings.tls import TlsFiles
from proxy.settings.values import (
    bounded_int,
    dialect,
    grpc_target,
    header_name,
    host_port,
    listener_beside,
    names,
    non_negative,
    optional_host_port,
    optional_path,
    path,
    positive,
    secret_ref,
    url,
)

#: Lightstep's OTLP/HTTP paths, the default upstream's (TRACEGATE_UPSTREAM_PATH_*).
DEFAULT_PATHS: Mapping[str, str] = {
    "traces": "/traces/otlp/v0.9",
    "metrics": "/metrics/otlp/v0.9",
    "logs": "/logs/otlp/v0.9",
}


@dataclass(frozen=True)
class Option:
    field: str
    env: str
    default: str
    parse: Callable[[str], Any]
    help: str
    #: Also a ``tracegate serve --flag`` (the flag is the field with dashes).
    flag: bool = False

    @property
    def flag_name(self) -> str:
        return "--" + self.field.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("policies", "TRACEGATE_POLICIES", "./policies", Path, "Policy directory (all *.yaml below it).", flag=True),
    Option(
        "listen", "TRACEGATE_LISTEN", "0.0.0.0:4318", host_port, "Ingest listener (OTLP/HTTP, webhooks).", flag=True
    ),
    Option(
        "admin_listen",
        "TRACEGATE_ADMIN_LISTEN",
        "127.0.0.1:9464",
        host_port,
        "Admin listener: /metrics, /healthz, /readyz (keep it internal; the image sets 0.0.0.0).",
        flag=True,
    ),
    Option("tls_cert", "TRACEGATE_TLS_CERT", "", str, "PEM certificate chain: serve the ingest over TLS.", flag=True),
    Option("tls_key", "TRACEGATE_TLS_KEY", "", str, "PEM private key for TRACEGATE_TLS_CERT.", flag=True),
    Option(
        "tls_client_ca",
        "TRACEGATE_TLS_CLIENT_CA",
        "",
        str,
        "PEM CA bundle: require client certificates signed by it (mTLS).",
        flag=True,
    ),
    Option(
        "upstream", "TRACEGATE_UPSTREAM", "https://ingest.lightstep.com", url, "Default upstream base URL.", flag=True
    ),
    Option("path_traces", "TRACEGATE_UPSTREAM_PATH_TRACES", DEFAULT_PATHS["traces"], path, "Upstream path for traces."),
    Option(
        "path_metrics", "TRACEGATE_UPSTREAM_PATH_METRICS", DEFAULT_PATHS["metrics"], path, "Upstream path for metrics."
    ),
    Option("path_logs", "TRACEGATE_UPSTREAM_PATH_LOGS", DEFAULT_PATHS["logs"], path, "Upstream path for logs."),
    Option(
        "max_body",
        "TRACEGATE_MAX_BODY_BYTES",
        str(64 << 20),
        positive(int),
        "Largest ingest body, bytes; over it: 413.",
    ),
    Option(
        "upstream_timeout",
        "TRACEGATE_UPSTREAM_TIMEOUT",
        "30",
        positive(float),
        "Seconds for the whole upstream exchange; over it: 504.",
    ),
    Option("leeway", "TRACEGATE_LEEWAY_SECONDS", "60", float, "Clock leeway for exp/nbf/iat, seconds."),
    Option(
        "jwks_min_refetch",
        "TRACEGATE_JWKS_MIN_REFETCH_SECONDS",
        "30",
        positive(float),
        "At most one JWKS refetch per issuer per this many seconds on unknown kids.",
    ),
    Option(
        "token_cache_size",
        "TRACEGATE_TOKEN_CACHE_SIZE",
        "100000",
        positive(int),
        "Verified tokens kept (by digest) until their exp.",
    ),
    Option(
        "forward_headers",
        "TRACEGATE_FORWARD_HEADERS",
        "",
        names,
        "Extra client headers to forward upstream (comma list).",
    ),
    Option("data_dir", "TRACEGATE_DATA_DIR", "./data", Path, "Where the deployment-marker outbox lives."),
    Option(
        "outbox_path",
        "TRACEGATE_OUTBOX",
        "",
        str,
        "Outbox: SQLite file or sqlite:///PATH (default DATA_DIR/outbox.sqlite3); postgresql://… to share it.",
    ),
    Option(
        "webhook_max_body",
        "TRACEGATE_WEBHOOK_MAX_BODY_BYTES",
        str(1 << 20),
        positive(int),
        "Largest webhook body, bytes; over it: 413.",
    ),
    Option(
        "dedupe_window",
        "TRACEGATE_DEDUPE_WINDOW_SECONDS",
        "86400",
        positive(float),
        "Identical webhook bodies within this window are one event.",
    ),
    Option(
        "outbox_retry_base",
        "TRACEGATE_OUTBOX_RETRY_BASE_SECONDS",
        "1",
        positive(float),
        "First outbox retry delay; doubles per attempt, with jitter.",
    ),
    Option(
        "outbox_retry_max",
        "TRACEGATE_OUTBOX_RETRY_MAX_SECONDS",
        "300",
        positive(float),
        "Longest outbox retry delay, seconds.",
    ),
    Option(
        "drain_seconds",
        "TRACEGATE_DRAIN_SECONDS",
        "20",
        positive(float),
        "On SIGTERM, how long in-flight requests may finish.",
    ),
    Option(
        "idle_timeout",
        "TRACEGATE_IDLE_TIMEOUT",
        "75",
        positive(float),
        "Seconds a connection may sit without completing a request's headers; then closed.",
    ),
    Option(
        "body_timeout",
        "TRACEGATE_BODY_TIMEOUT",
        "30",
        positive(float),
        "Longest pause between two pieces of a request body, seconds; over it: 408.",
    ),
    Option(
        "workers",
        "TRACEGATE_WORKERS",
        "1",
        cpus.workers,
        "Processes sharing the ports (SO_REUSEPORT); /metrics on the admin port sums all workers. "
        "`auto`: the CPUs this process may use (affinity mask and cgroup quota, rounded up); "
        "the container image and the Helm chart default to `auto`.",
        flag=True,
    ),
    Option(
        "ready_grace",
        "TRACEGATE_READY_GRACE_SECONDS",
        "30",
        float,
        "After start, /readyz waits at most this long for the first issuer keys; then ready anyway.",
    ),
    Option(
        "authz_listen",
        "TRACEGATE_AUTHZ_LISTEN",
        "",
        optional_host_port,
        "Gateway authorization listener (HOST:PORT; off when empty). Its answers carry account keys: "
        "loopback or pod-local only.",
        flag=True,
    ),
    Option(
        "authz_dialect",
        "TRACEGATE_AUTHZ_DIALECT",
        "",
        dialect,
        "Which gateway asks: nginx (auth_request), envoy (HTTP ext_authz) or traefik (ForwardAuth).",
        flag=True,
    ),
    Option(
        "authz_path_prefix",
        "TRACEGATE_AUTHZ_PATH_PREFIX",
        "",
        optional_path,
        "envoy: the http_service path_prefix in front of the original path (empty: none).",
    ),
    Option(
        "authz_key_header",
        "TRACEGATE_AUTHZ_KEY_HEADER",
        "lightstep-access-token",
        header_name,
        "Answer header that carries the account's key to the gateway.",
    ),
    Option(
        "authz_max_age",
        "TRACEGATE_AUTHZ_MAX_AGE_SECONDS",
        "30",
        bounded_int(0, 300),
        "Longest a gateway may cache an allow (also never past the token's exp); bounds key rotation.",
    ),
    Option(
        "authz_deny_max_age",
        "TRACEGATE_AUTHZ_DENY_MAX_AGE_SECONDS",
        "5",
        bounded_int(0, 60),
        "How long a gateway may cache a refusal (401/403).",
    ),
    Option(
        "authz_secret",
        "TRACEGATE_AUTHZ_SECRET",
        "",
        secret_ref,
        "env:NAME or file:/path of a secret the gateway must send in X-Tracegate-Authz-Secret (empty: none).",
    ),
    Option(
        "grpc_listen",
        "TRACEGATE_GRPC_LISTEN",
        ":4317",
        listener_beside,
        "OTLP/gRPC listener (same TLS settings as the ingest): HOST:PORT, or :PORT on TRACEGATE_LISTEN's host; "
        "off disables it.",
        flag=True,
    ),
    Option(
        "grpc_upstream",
        "TRACEGATE_GRPC_UPSTREAM",
        "ingest.lightstep.com:443",
        grpc_target,
        "Default gRPC upstream: HOST:PORT or https://HOST[:PORT] (TLS), http://HOST:PORT (loopback only).",
    ),
    Option(
        "grpc_upstream_ca",
        "TRACEGATE_GRPC_UPSTREAM_CA",
        "",
        str,
        "PEM CA bundle that TLS gRPC upstreams' certificates are verified against, instead of grpcio's roots "
        "(a private CA; read at start).",
    ),
    Option(
        "outbox_pool_size",
        "TRACEGATE_OUTBOX_POOL_SIZE",
        "8",
        positive(int),
        "PostgreSQL outbox: most connections per process.",
    ),
    Option(
        "watch_interval",
        "TRACEGATE_WATCH_INTERVAL_SECONDS",
        "2",
        non_negative,
        "How often policy, secret and TLS files are checked for changes (reload like SIGHUP); 0: never.",
    ),
    Option(
        "gc_freeze_interval",
        "TRACEGATE_GC_FREEZE_INTERVAL",
        "10",
        non_negative,
        "Seconds between `gc.freeze()` calls that take long-lived objects (modules, the policy, key sets) "
        "out of Python's full garbage collections; 0: never (see proxy/run/gcfreeze.py).",
    ),
    Option("log_level", "TRACEGATE_LOG_LEVEL", "INFO", str.upper, "Log level."),
)


@dataclass(frozen=True)
class Settings:
    policies: Path
    listen: tuple[str, int]
    admin_listen: tuple[str, int]
    tls_cert: str
    tls_key: str
    tls_client_ca: str
    upstream: str
    path_traces: str
    path_metrics: str
    path_logs: str
    max_body: int
    upstream_timeout: float
    leeway: float
    jwks_min_refetch: float
    token_cache_size: int
    forward_headers: tuple[str, ...]
    data_dir: Path
    outbox_path: str = field(repr=False)  # a postgresql:// URL may hold a password
    webhook_max_body: int
    dedupe_window: float
    outbox_retry_base: float
    outbox_retry_max: float
    drain_seconds: float
    idle_timeout: float
    body_timeout: float
    workers: int
    ready_grace: float
    authz_listen: tuple[str, int] | None
    authz_dialect: str
    authz_path_prefix: str
    authz_key_header: str
    authz_max_age: int
    authz_deny_max_age: int
    authz_secret: SecretRef | None
    grpc_listen: tuple[str, int] | None
    grpc_upstream: str
    grpc_upstream_ca: str
    outbox_pool_size: int
    watch_interval: float
    gc_freeze_interval: float
    log_level: str

    @property
    def paths(self) -> dict[str, str]:
        return {"traces": self.path_traces, "metrics": self.path_metrics, "logs": self.path_logs}

    @property
    def tls(self) -> TlsFiles | None:
        """The listeners' TLS files, or None for plain HTTP."""
        if not self.tls_cert:
            return None
        return TlsFiles(
            Path(self.tls_cert), Path(self.tls_key), Path(self.tls_client_ca) if self.tls_client_ca else None
        )

    @classmethod
    def load(cls, flags: Mapping[str, str | None], environ: Mapping[str, str]) -> Settings:
        """``flags`` holds command-line values by field name (None where not given)."""
        values: dict[str, Any] = {}
        for opt in OPTIONS:
            raw = flags.get(opt.field)
            source = f"--{opt.field.replace('_', '-')}"
            if raw is None:
                raw, source = environ.get(opt.env), opt.env
            if raw is None:
                raw, source = opt.default, "default"
            try:
                values[opt.field] = opt.parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{source}={raw!r}: {exc}") from None
        if bool(values["tls_cert"]) != bool(values["tls_key"]):
            raise ConfigError("TRACEGATE_TLS_CERT and TRACEGATE_TLS_KEY must be set together (or neither)")
        scheme, sep, _ = values["outbox_path"].partition("://")
        if sep and scheme not in ("sqlite", "postgresql", "postgres"):
            raise ConfigError(  # the value itself may hold a password: name only its scheme
                f"TRACEGATE_OUTBOX: unknown scheme {scheme[:20]!r}; use a file path, sqlite:///PATH or postgresql://…"
            )
        grpc = values["grpc_listen"]
        if grpc is not None and not grpc[0]:  # :PORT: beside the ingest, never wider than it
            values["grpc_listen"] = (values["listen"][0], grpc[1])
        if values["tls_client_ca"] and not values["tls_cert"]:
            raise ConfigError("TRACEGATE_TLS_CLIENT_CA needs TRACEGATE_TLS_CERT and TRACEGATE_TLS_KEY (mTLS is TLS)")
        if values["authz_listen"] is not None and not values["authz_dialect"]:
            raise ConfigError(
                "TRACEGATE_AUTHZ_DIALECT must be set with TRACEGATE_AUTHZ_LISTEN: nginx, envoy or traefik "
                "(which gateway sends the checks decides where the original request is read from)"
            )
        return cls(**values)
