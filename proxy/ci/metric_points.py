"""Delivery metrics as OTLP/JSON: each data point tracegate derives is one outbox event.

A point is one observation — a pipeline run's duration, a deployment, a change's lead time —
sent with **delta** temporality (``aggregationTemporality: 1``): a counter point carries the
increment (1), a histogram point one observation (``count: 1``, its ``sum``, one bucket), over
an interval of one millisecond at the moment tracegate stored it. A backend adds the points up;
redelivering an outbox event after a crash would add one twice (the outbox delivers at least
once, as it does for markers), but a redelivered *webhook* never makes a second event: every
event's key (:data:`PREFIX` + the source event's stable key) is stored once.

Cardinality is bounded by construction: attributes are the service (resource ``service.name``),
the environment and a result, and for the CI/CD conventions the pipeline's name, its run state
and ``error.type`` — never a commit SHA, a run id or a delivery id.

The export is stored as OTLP/JSON and re-encoded as protobuf at send time for a metrics route
that takes no JSON (:func:`proxy.ci.otlp_proto.metrics_to_protobuf`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from proxy import __version__

#: Outbox keys of metric exports start with this: the sender sends them on the metrics route.
PREFIX = "metrics:"
#: OTLP ``AggregationTemporality``.
DELTA = 1
#: Histogram bounds (seconds) for pipeline runs: a second to a day.
RUN_BOUNDS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)
#: Histogram bounds (seconds) for lead time and time to restore: a minute to half a year, with
#: DORA's benchmark edges (an hour, a day, a week, a month, six months) among them.
DORA_BOUNDS = (
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
    86400.0,
    172800.0,
    345600.0,
    604800.0,
    1209600.0,
    2592000.0,
    7776000.0,
    15552000.0,
)


def is_metrics(key: str) -> bool:
    """Whether an outbox event is a metrics export (else a trace export or a native event)."""
    return key.startswith(PREFIX)


@dataclass(frozen=True)
class Point:
    """One data point of one metric: a counter increment or one histogram observation."""

    name: str
    unit: str
    description: str
    kind: Literal["sum", "histogram"]
    value: float
    attributes: Mapping[str, str]
    bounds: tuple[float, ...] = ()


def counter(name: str, unit: str, description: str, attributes: Mapping[str, str], value: int = 1) -> Point:
    return Point(name, unit, description, "sum", float(value), attributes)


def observation(
    name: str, unit: str, description: str, attributes: Mapping[str, str], value: float, bounds: tuple[float, ...]
) -> Point:
    return Point(name, unit, description, "histogram", value, attributes, bounds)


def _attributes(values: Mapping[str, str]) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"stringValue": v}} for k, v in sorted(values.items()) if v]


def _metric(point: Point, start_ns: int, time_ns: int) -> dict[str, Any]:
    base: dict[str, Any] = {"name": point.name, "unit": point.unit, "description": point.description}
    times = {"startTimeUnixNano": str(start_ns), "timeUnixNano": str(time_ns)}
    attributes = _attributes(point.attributes)
    if point.kind == "sum":
        data: dict[str, Any] = {"attributes": attributes, **times, "asInt": str(int(point.value))}
        base["sum"] = {"aggregationTemporality": DELTA, "isMonotonic": True, "dataPoints": [data]}
        return base
    value = point.value if math.isfinite(point.value) else 0.0
    buckets = [0] * (len(point.bounds) + 1)
    buckets[sum(1 for bound in point.bounds if value > bound)] = 1  # OTLP buckets: (previous, bound]
    observed: dict[str, Any] = {
        "attributes": attributes,
        **times,
        "count": "1",
        "sum": value,
        "bucketCounts": [str(n) for n in buckets],
        "explicitBounds": list(point.bounds),
        "min": value,
        "max": value,
    }
    base["histogram"] = {"aggregationTemporality": DELTA, "dataPoints": [observed]}
    return base


def export(resources: Iterable[tuple[Mapping[str, str], Iterable[Point]]], scope: str, time_ns: int) -> bytes:
    """An ExportMetricsServiceRequest (OTLP/JSON): per resource (its attributes), its points,
    each over the millisecond starting at ``time_ns``."""
    resource_metrics = []
    for resource, points in resources:
        metrics = [_metric(p, time_ns, time_ns + 1_000_000) for p in points]
        if metrics:
            resource_metrics.append(
                {
                    "resource": {"attributes": _attributes(resource)},
                    "scopeMetrics": [{"scope": {"name": scope, "version": __version__}, "metrics": metrics}],
                }
            )
    return json.dumps({"resourceMetrics": resource_metrics}, separators=(",", ":")).encode()
