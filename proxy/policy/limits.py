"""``limits:`` on a service account or a rule: quotas per tracegate process (enforced by
:mod:`proxy.gate.quota`).

``requests_per_second`` / ``requests_burst`` and ``bytes_per_second`` / ``bytes_burst`` are
two token buckets: the rate refills, the burst is how much may be spent at once (default:
one second's worth). ``daily_bytes`` is a budget per UTC day. Sizes are a whole number of
bytes or a string with a unit: ``512KiB``, ``4 MiB``, ``50GB`` (KB/MB/GB/TB are powers of
1000, KiB/MiB/GiB/TiB of 1024). Every value must be positive and finite.
"""

from __future__ import annotations

import math
import re
from typing import Any

from proxy.policy.checker import Checker
from proxy.policy.model import Limits, Rule, ServiceAccount
from proxy.policy.source import LDict

LIMIT_KEYS = ("requests_per_second", "requests_burst", "bytes_per_second", "bytes_burst", "daily_bytes")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40})
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_HELP = "a whole number of bytes or a size such as 512KiB, 4MiB, 50GB"


def _number(value: Any) -> float | None:
    """A positive finite number (YAML int or float; a boolean is not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def _size(value: Any) -> int | None:
    """A positive byte count: an integer, or a number with a unit (rounded down)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value > 0 else None
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        return None
    size = int(float(match[1]) * _UNITS[(match[2] or "").upper()])
    return size if size > 0 else None


def parse_limits(check: Checker, value: Any, line: int, what: str) -> Limits | None:
    """``limits:`` as written under ``what`` (a service account or a rule) at ``line``."""
    where = f"{what}.limits"
    if not isinstance(value, LDict) or not value:
        check.add(line, f"{where} must be a mapping of one or more of {', '.join(LIMIT_KEYS)}")
        return None
    problems = len(check.problems)
    check.keys(value, LIMIT_KEYS, (), where, line)
    rps = _number(value["requests_per_second"]) if "requests_per_second" in value else None
    if "requests_per_second" in value and rps is None:
        check.add(value.line_of("requests_per_second"), f"{where}.requests_per_second must be a positive number")
    burst = value.get("requests_burst")
    if "requests_burst" in value and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
        check.add(value.line_of("requests_burst"), f"{where}.requests_burst must be a whole number of requests, ≥ 1")
    sizes: dict[str, int | None] = {}
    for key in ("bytes_per_second", "bytes_burst", "daily_bytes"):
        if key in value:
            sizes[key] = _size(value[key])
            if sizes[key] is None:
                check.add(value.line_of(key), f"{where}.{key} must be positive: {_SIZE_HELP}")
    for burst_key, rate_key in (("requests_burst", "requests_per_second"), ("bytes_burst", "bytes_per_second")):
        if burst_key in value and rate_key not in value:
            check.add(value.line_of(burst_key), f"{where}.{burst_key} needs {rate_key}: a burst refills at that rate")
    if len(check.problems) > problems:
        return None
    bps = sizes.get("bytes_per_second")
    return Limits(
        requests_per_second=rps,
        requests_burst=(burst or max(1, math.ceil(rps))) if rps is not None else None,
        bytes_per_second=float(bps) if bps is not None else None,
        bytes_burst=(sizes.get("bytes_burst") or bps) if bps is not None else None,
        daily_bytes=sizes.get("daily_bytes"),
        where=check.where(line),
    )


def show_size(size: float) -> str:
    """``size`` bytes in the largest binary unit it is a whole multiple of (4 MiB, 1500 B)."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{int(size // factor)} {unit}"
    return f"{size:g} B"


def describe(limits: Limits) -> str:
    """One line: ``10 requests/s (burst 20), 1 MiB/s (burst 4 MiB), 50 GiB per UTC day``."""
    parts = []
    if limits.requests_per_second is not None:
        parts.append(f"{limits.requests_per_second:g} requests/s (burst {limits.requests_burst})")
    if limits.bytes_per_second is not None and limits.bytes_burst is not None:
        parts.append(f"{show_size(limits.bytes_per_second)}/s (burst {show_size(limits.bytes_burst)})")
    if limits.daily_bytes is not None:
        parts.append(f"{show_size(limits.daily_bytes)} per UTC day")
    return ", ".join(parts)


def limit_lines(account: ServiceAccount, rule: Rule | None) -> list[str]:
    """What ``tracegate explain`` says about the quotas an admitted request is charged to."""
    found = [(f"service account {account.name!r}", account.limits)]
    if rule is not None:
        found.append((f"rule {rule.name!r}", rule.limits))
    lines = [f"limits of {who} at {limits.where}: {describe(limits)}" for who, limits in found if limits is not None]
    if lines:
        lines.append(
            "(shared by the fleet on a PostgreSQL outbox; else each process admits up to these, "
            "N replicas × W workers N × W times; over: 429)"
        )
    return lines
