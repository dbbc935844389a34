"""How many CPUs this process may really use: for ``--workers auto``.

``os.cpu_count()`` is the machine's count; a container is usually given less. Two limits
apply, the smaller wins: the CPU affinity mask (``os.sched_getaffinity``: cpusets, Docker
``--cpuset-cpus``, ``taskset``) and the cgroup v2 CPU quota (``/sys/fs/cgroup/cpu.max``,
``"QUOTA PERIOD"`` or ``"max PERIOD"``: Kubernetes ``resources.limits.cpu``, Docker
``--cpus``), rounded up — a 1.5-CPU limit runs 2 workers, each throttled to its share.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
#: ``auto`` never starts more workers than this (each holds its own caches, ~70 MiB).
MAX_AUTO = 16


def quota_cpus(text: str) -> int | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line; None when unlimited or unreadable."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def usable_cpus(
    affinity: Callable[[int], set[int]] | None = None,
    cpu_max: Path = CPU_MAX,
) -> int:
    """min(CPUs in the affinity mask, the cgroup quota rounded up), at least 1."""
    get = affinity if affinity is not None else getattr(os, "sched_getaffinity", None)
    count = len(get(0)) if get is not None else (os.cpu_count() or 1)
    try:
        quota = quota_cpus(cpu_max.read_text())
    except OSError:
        quota = None
    return max(1, min(count, quota) if quota is not None else count)


def workers(value: str) -> int:
    """A ``TRACEGATE_WORKERS`` value: a positive integer, or ``auto`` (usable CPUs)."""
    text = value.strip().lower()
    if text == "auto":
        return min(usable_cpus(), MAX_AUTO)
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError("expected a positive integer (processes) or auto (one per usable CPU)")
    return int(text)
