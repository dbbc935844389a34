"""System programs some tests need (nginx, PostgreSQL, h2load): found on PATH or in their
Debian location, installed with apt-get when missing and we are root, else the test is
skipped with the reason — except under CI (``CI=true``), where a missing program fails the
run instead of silently skipping what CI exists to prove."""

from __future__ import annotations

import functools
import glob
import os
import shutil
import subprocess

import pytest


@functools.cache
def _apt_updated() -> bool:
    result = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False, timeout=600)
    return result.returncode == 0


def _find(program: str, extra_globs: tuple[str, ...]) -> str | None:
    found = shutil.which(program)
    if found:
        return found
    for pattern in extra_globs:
        matches = sorted(glob.glob(pattern))
        if matches:
            return matches[-1]
    return None


def require_program(program: str, apt_package: str, *extra_globs: str) -> str:
    """The path of ``program``; installs ``apt_package`` if needed and possible."""
    found = _find(program, extra_globs)
    if found:
        return found
    problem = f"{program} is not installed"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if _apt_updated():
            result = subprocess.run(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", apt_package],
                capture_output=True,
                check=False,
                env=env,
                timeout=900,
            )
            found = _find(program, extra_globs)
            if found:
                return found
            problem = f"apt-get install {apt_package} failed: {result.stderr.decode(errors='replace')[-300:]}"
        else:
            problem = "apt-get update failed"
    else:
        problem += f" (install Debian's {apt_package} as root)"
    if os.environ.get("CI") == "true":
        pytest.fail(problem, pytrace=False)
    pytest.skip(problem)
