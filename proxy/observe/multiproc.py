"""One metrics endpoint for a pod of several workers (``--workers N``).

prometheus-client's multiprocess mode: every worker writes its samples to memory-mapped files
in one directory, and whichever worker answers ``/metrics`` reads and merges them all —
counters and histograms summed, each gauge merged as :mod:`proxy.observe.metrics` declares (the
outbox depth is the same database seen by every worker: its maximum, not its sum). All
workers share the admin port (SO_REUSEPORT), so a scrape of ADMIN_PORT sees the whole pod.

The library chooses the value store from ``PROMETHEUS_MULTIPROC_DIR`` in the process
environment, once, when it is imported; tracegate imports it before it knows how many
workers it will fork, so :func:`enable` sets both (the variable for the file paths, the value
class for metrics created from then on) in the parent before forking. Nothing happens with
one worker. The parent removes a dead worker's live gauges and, at exit, the directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, multiprocess, values

ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable(environ: MutableMapping[str, str]) -> tuple[Path, bool]:
    """Turn multiprocess mode on for this process and its children. Uses ``environ``'s
    directory if it names one, else makes one; returns it and whether we made it."""
    given = environ.get(ENV)
    directory = Path(given) if given else Path(tempfile.mkdtemp(prefix="tracegate-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):  # a previous run's samples would be counted again
        stale.unlink()
    environ[ENV] = str(directory)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    return directory, not given


def render(directory: Path) -> bytes:
    """Every worker's samples, merged."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def worker_exited(directory: Path, pid: int) -> None:
    multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


def cleanup(directory: Path, made: bool) -> None:
    if made:
        shutil.rmtree(directory, ignore_errors=True)
    os.environ.pop(ENV, None)
