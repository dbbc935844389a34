"""A deployment marker: the facts of one accepted event, and the OTLP span that carries them.

Lightstep draws a deployment marker when ``service.version`` changes on a service's
telemetry, so each marker is one span per service whose resource sets ``service.version``
to the commit SHA. Attributes follow the OpenTelemetry VCS semantic conventions
(``vcs.*``); what those do not cover goes under ``tracegate.*``.

The span is encoded as OTLP/JSON (which Lightstep's OTLP/HTTP endpoints accept). Trace and
span ids derive from the event's key, so a resend after a crash carries the same ids.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from proxy import __version__

SCOPE = "tracegate.deployments"
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")


def is_commit_sha(value: object) -> TypeGuard[str]:
    """A full SHA-1 (40) or SHA-256 (64) commit id in lower-case hex: a marker's version."""
    return isinstance(value, str) and _COMMIT_SHA.fullmatch(value) is not None


@dataclass(frozen=True)
class Marker:
    provider: str  # vcs.provider.name: gitea, forgejo, gitlab
    repository_url: str
    repository_name: str
    owner: str
    ref_name: str  # short: main, v1.2.0
    ref_type: str  # branch or tag
    revision: str  # the commit SHA; becomes service.version
    event: str  # push, tag, release, deployment
    delivery_id: str
    actor: str | None = None
    title: str | None = None
    compare_url: str | None = None
    environment: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def span_name(self) -> str:
        return f"deployment {self.repository_name}@{self.ref_name} ({self.event})"


def _attr(key: str, value: str) -> dict[str, Any]:
    return {"key": key, "value": {"stringValue": value}}


def _ids(key: str, service: str) -> tuple[str, str]:
    digest = hashlib.sha256(f"{key}\0{service}".encode()).hexdigest()
    return digest[:32], digest[32:48]


def otlp_json(marker: Marker, services: tuple[str, ...], key: str, time_unix_nano: int) -> bytes:
    """An ExportTraceServiceRequest (OTLP/JSON) with one span per service."""
    attributes = [
        _attr("vcs.provider.name", marker.provider),
        _attr("vcs.repository.url.full", marker.repository_url),
        _attr("vcs.repository.name", marker.repository_name),
        _attr("vcs.owner.name", marker.owner),
        _attr("vcs.ref.head.name", marker.ref_name),
        _attr("vcs.ref.head.revision", marker.revision),
        _attr("vcs.ref.head.type", marker.ref_type),
        _attr("tracegate.event", marker.event),
        _attr("tracegate.delivery_id", marker.delivery_id),
    ]
    optional = {
        "tracegate.actor.login": marker.actor,
        "tracegate.commit.title": marker.title,
        "tracegate.compare_url": marker.compare_url,
        "deployment.environment.name": marker.environment,
        **marker.extra,
    }
    attributes += [_attr(k, v) for k, v in optional.items() if v]
    resource_spans = []
    for service in services:
        trace_id, span_id = _ids(key, service)
        resource = [_attr("service.name", service), _attr("service.version", marker.revision)]
        if marker.environment:
            resource.append(_attr("deployment.environment.name", marker.environment))
        resource_spans.append(
            {
                "resource": {"attributes": resource},
                "scopeSpans": [
                    {
                        "scope": {"name": SCOPE, "version": __version__},
                        "spans": [
                            {
                                "traceId": trace_id,
                                "spanId": span_id,
                                "name": marker.span_name(),
                                "kind": 1,
                                "startTimeUnixNano": str(time_unix_nano),
                                "endTimeUnixNano": str(time_unix_nano + 1_000_000),
                                "attributes": attributes,
                            }
                        ],
                    }
                ],
            }
        )
    return json.dumps({"resourceSpans": resource_spans}, separators=(",", ":")).encode()
