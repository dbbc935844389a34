"""``--workers auto`` (affinity mask and cgroup quota) and the periodic ``gc.freeze()``."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest

from proxy.run.gcfreeze import freeze_periodically
from proxy.settings.config import Settings
from proxy.settings.cpus import MAX_AUTO, quota_cpus, usable_cpus, workers


@pytest.mark.parametrize(
    ("text", "expected"),
    [("max 100000", None), ("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1), ("", None), ("x y", None)],
)
def test_cgroup_quota(text: str, expected: int | None) -> None:
    assert quota_cpus(text) == expected


def test_usable_cpus_is_the_smaller_of_affinity_and_quota(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    eight = lambda _pid: set(range(8))  # noqa: E731
    cpu_max.write_text("300000 100000\n")
    assert usable_cpus(eight, cpu_max) == 3
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(eight, cpu_max) == 8
    assert usable_cpus(lambda _pid: {0, 1}, cpu_max) == 2
    assert usable_cpus(eight, tmp_path / "absent") == 8  # no cgroup v2: the mask alone


def test_workers_setting() -> None:
    assert workers("3") == 3
    assert workers(" AUTO ") == min(usable_cpus(), MAX_AUTO) >= 1
    with pytest.raises(ValueError):
        workers("0")
    assert Settings.load({"workers": "auto"}, {}).workers == workers("auto")
    assert Settings.load({}, {}).workers == 1  # outside the image and the chart: one process


async def test_freeze_periodically_freezes_and_thaws() -> None:
    gc.unfreeze()
    task = asyncio.get_running_loop().create_task(freeze_periodically(0.01, thaw_every=3))
    try:
        await asyncio.sleep(0.025)
        assert gc.get_freeze_count() > 0
        await asyncio.sleep(0.05)
        assert gc.get_freeze_count() > 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gc.unfreeze()
