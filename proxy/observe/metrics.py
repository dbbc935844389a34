"""Prometheus metrics, on a registry of their own per process (no global registry).

Label values are names from the policy, signals, statuses and reason codes only: never a
claim value, a token or a key, so cardinality stays bounded by the policy's size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        #: With several workers (:mod:`proxy.observe.multiproc`): render every worker's samples, merged.
        #: Each gauge's ``multiprocess_mode`` says how (it is ignored with one worker).
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "tracegate_requests",
            "Ingest and authorization requests by outcome and door (transport: http, grpc, authz).",
            ("signal", "service_account", "decision", "reason", "transport"),
            registry=r,
        )
        self.request_bytes = Counter(
            "tracegate_request_bytes", "Request body bytes received from clients.", ("signal",), registry=r
        )
        self.upstream_responses = Counter(
            "tracegate_upstream_responses", "Upstream answers by status (or error).", ("signal", "status"), registry=r
        )
        self.upstream_latency = Histogram(
            "tracegate_upstream_duration_seconds",
            "Time from sending upstream to its answer.",
            ("signal",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.jwks_fetches = Counter(
            "tracegate_jwks_fetches", "JWKS fetches by issuer and result.", ("issuer", "result"), registry=r
        )
        self.policy_loads = Counter("tracegate_policy_loads", "Policy loads by result.", ("result",), registry=r)
        self.policy_loaded = Gauge(
            "tracegate_policy_loaded",
            "1 if the last policy load succeeded, 0 if the old policy is serving.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.policy_last_load = Gauge(
            "tracegate_policy_last_load_timestamp_seconds",
            "Unix time of the last successful policy load.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.tls_reloads = Counter(
            "tracegate_tls_reloads", "TLS certificate reloads (SIGHUP) by result.", ("result",), registry=r
        )
        self.protocol_errors = Counter(
            "tracegate_protocol_errors",
            "Requests refused before routing: malformed HTTP, HTTP/2 on the HTTP port.",
            ("kind",),
            registry=r,
        )
        self.unhandled_errors = Counter(
            "tracegate_unhandled_errors", "Exceptions no handler expected (a bug: each is logged).", registry=r
        )
        self.token_cache = Counter("tracegate_token_cache", "Verified-token cache lookups.", ("result",), registry=r)
        # Outbox (deployment markers).
        self.outbox_depth = Gauge(
            "tracegate_outbox_depth", "Events waiting in the outbox.", registry=r, multiprocess_mode="livemax"
        )
        self.outbox_oldest_age = Gauge(
            "tracegate_outbox_oldest_pending_seconds",
            "Age of the oldest pending outbox event.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.outbox_deliveries = Counter(
            "tracegate_outbox_deliveries", "Outbox delivery attempts by result.", ("result",), registry=r
        )
        self.webhooks = Counter(
            "tracegate_webhooks",
            "Webhook and deployment requests by outcome.",
            ("source", "decision", "reason"),
            registry=r,
        )

        #: Bound children by metric, then label tuple (one dict per metric: no key tuple
        #: of the metric and its labels to build and hash per lookup).
        self._children: dict[Any, dict[tuple[str, ...], Any]] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per label set: the label validation
        in ``labels()`` showed in the per-request profile. Label sets are bounded by the
        policy (names, signals, reasons), so this map is too."""
        try:
            return self._children[metric][labels]
        except KeyError:
            found = self._children.setdefault(metric, {})[labels] = metric.labels(*labels)
            return found

    def count_request(self, signal: str, account: str, decision: str, reason: str, transport: str = "http") -> None:
        self.child(self.requests, signal, account, decision, reason, transport).inc()

    def render(self) -> bytes:
        if self.multiprocess_dir is not None:
            from proxy.observe.multiproc import render

            return render(self.multiprocess_dir)
        return generate_latest(self.registry)
