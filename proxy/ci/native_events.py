"""Native deployment events in the outbox: stored as facts, sent as the vendor's own request.

A webhook entry with ``markers: [otlp, native]`` stores, beside its OTLP marker, one outbox event
per service for the vendor's deployment API (Honeycomb Markers, Grafana annotations, Datadog DORA
deployments, New Relic change tracking, Dynatrace deployment events: proxy/backends/native.py).
Each has a key of its own, ``native:<marker key>:<service>``, and a body digest of its own, so
the outbox dedupes, leases, retries and delivers it exactly as a marker (SQLite or PostgreSQL),
and neither event's fate decides the other's.

Security: the row holds the service account's *name* and the event's facts
(:class:`~proxy.backends.native.MarkerEvent` as JSON) — never a URL, a header or a token. The
sender builds the request when it sends (:func:`proxy.backends.native.native_request`), from the
account as loaded then, so a rotated ``marker_token`` applies to events already stored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, fields

from proxy.backends.native import MarkerEvent
from proxy.ci.marker import Marker
from proxy.ci.outbox import Added
from proxy.ci.store import OutboxStore

PREFIX = "native:"
_FIELDS = frozenset(f.name for f in fields(MarkerEvent))
_REQUIRED = ("service", "version", "time_unix_nano", "event_id")
_INTS = ("time_unix_nano", "started_unix_nano")


def is_native(key: str) -> bool:
    """Whether an outbox event is a native deployment event (else an OTLP export)."""
    return key.startswith(PREFIX)


def event_of(marker: Marker, service: str, key: str, time_unix_nano: int) -> MarkerEvent:
    """The vendor-neutral facts of ``marker`` for one service. ``key`` is the marker's outbox
    key: stable across redeliveries, it becomes the vendor's idempotency id where one exists
    (Datadog's deployment id, New Relic's groupId)."""
    return MarkerEvent(
        service=service,
        version=marker.revision,
        time_unix_nano=time_unix_nano,
        event_id=key,
        ref=marker.ref_name or None,
        environment=marker.environment or None,
        url=marker.compare_url or None,
        repository_url=marker.repository_url or None,
    )


def encode(event: MarkerEvent) -> bytes:
    return json.dumps(asdict(event), separators=(",", ":"), ensure_ascii=False).encode()


def decode(payload: bytes) -> MarkerEvent:
    """A stored event's facts. Raises ValueError for a row this version did not write."""
    data = json.loads(payload)
    if not isinstance(data, dict) or set(data) - _FIELDS or any(k not in data for k in _REQUIRED):
        raise ValueError("not a native deployment event")
    for name, value in data.items():
        kind = int if name in _INTS else str
        if type(value) is not kind and not (value is None and name not in _REQUIRED):
            raise ValueError(f"native deployment event: {name} is not a {kind.__name__}")
    return MarkerEvent(**data)


async def store_native(
    outbox: OutboxStore,
    marker: Marker,
    services: Sequence[str],
    *,
    key: str,
    digest: str,
    source: str,
    account: str,
    time_unix_nano: int,
) -> list[Added]:
    """Store one native event per service, durably (before the door answers 202). ``key`` and
    ``digest`` are the marker's: a redelivery, or the same body again within the dedupe window,
    is recognised per service as the marker is. Returns each service's outcome, in order."""
    outcomes: list[Added] = []
    for service in services:
        outcomes.append(
            await outbox.add(
                key=f"{PREFIX}{key}:{service}",
                body_digest=hashlib.sha256(f"native\0{service}\0{digest}".encode()).hexdigest(),
                source=source,
                service_account=account,
                payload=encode(event_of(marker, service, key, time_unix_nano)),
            )
        )
    return outcomes
