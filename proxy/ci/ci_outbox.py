"""CI spans into the outbox: one outbox event per span, keyed by the span's final event.

Each span is stored on its own (:meth:`CiSpan.outbox_key`), so a pipeline hook and the job
hooks of the same run, delivered in any order, by any number of replicas, any number of
times, store each pipeline and job span once per final event; the sender then delivers each
at least once and a resend carries the same ids. Every span is durably stored before the
door answers 202; if storing fails half-way the door answers 503, the forge redelivers, and
the spans already stored are recognised as duplicates. An entry with ``metrics: [cicd]`` also
stores each run's semantic-convention metrics (:mod:`.cicd_metrics`), keyed by the same event.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from proxy.ci.cicd_metrics import store_run_metrics
from proxy.ci.outbox import Added
from proxy.ci.pipeline import CiSpan, otlp_json
from proxy.ci.store import OutboxStore
from proxy.policy.model import WebhookSource


async def store_spans(outbox: OutboxStore, spans: Sequence[CiSpan], *, source: str, hook: WebhookSource) -> list[Added]:
    """Store each span as its own OTLP/JSON export under ``hook``'s service name and
    account. Returns each span's outcome, in order."""
    outcomes: list[Added] = []
    for span in spans:
        key = span.outbox_key(source)
        outcomes.append(
            await outbox.add(
                key=key,
                body_digest=hashlib.sha256(key.encode()).hexdigest(),
                source=source,
                service_account=hook.service_account,
                payload=otlp_json([span], hook.service_name, source),
            )
        )
        if "cicd" in hook.metrics:  # after the span: a 503 between them is redelivered, both stay once
            await store_run_metrics(outbox, span, source=source, hook=hook)
    return outcomes
