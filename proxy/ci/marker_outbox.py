"""Deployment markers into the outbox: the OTLP span and/or the backends' native events.

Shared by every door that draws markers (Gitea and Forgejo, GitHub, a CI job's deployment
call). Each is stored durably before the door answers 202; a store that cannot commit
raises :class:`~proxy.errors.OutboxUnavailable`, which the doors answer 503.
"""

from __future__ import annotations

from proxy.ci.marker import Marker, otlp_json
from proxy.ci.native_events import store_native
from proxy.ci.outbox import Added
from proxy.ci.store import OutboxStore
from proxy.policy.model import DEFAULT_MARKERS


async def store_marker(
    outbox: OutboxStore,
    *,
    key: str,
    digest: str,
    source: str,
    account: str,
    marker: Marker,
    services: tuple[str, ...],
    time_unix_nano: int,
    markers: frozenset[str] = DEFAULT_MARKERS,
) -> Added:
    """Put the marker in the outbox: its OTLP export and/or one native deployment event per
    service (``markers``). ``stored`` when any of them is new — a half-stored earlier attempt
    (503) completes on the redelivery — else the first outcome (``duplicate-delivery`` or
    ``duplicate-body``)."""
    outcomes: list[Added] = []
    if "otlp" in markers:
        payload = otlp_json(marker, services, key, time_unix_nano)
        outcomes.append(
            await outbox.add(key=key, body_digest=digest, source=source, service_account=account, payload=payload)
        )
    if "native" in markers:
        when = time_unix_nano
        outcomes += await store_native(
            outbox, marker, services, key=key, digest=digest, source=source, account=account, time_unix_nano=when
        )
    return "stored" if "stored" in outcomes else outcomes[0]
