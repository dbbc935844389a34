"""Two comparisons that each need one interleaved run to mean anything on a shared machine:

* ``baseline`` (``--baseline DIR``): contender d0 is tracegate started from another source tree
  (a ``git worktree add /tmp/baseline <commit>``): the same argv, environment, sink and tokens
  as d, with ``PYTHONPATH`` and the working directory set to that tree. c, d0 and d at 1 KB,
  20 KB and 1 MB protobuf, round by round, alternating order. The d of this section is a
  process of its own reading d0's policy directory, so that only the source tree differs.
* ``profiles``: d's own process with one token whose account is Lightstep (the default
  profile) and one whose account is ``backend: grafana-cloud`` with ``upstream:`` the same
  sink, so only the profile differs: the ``Basic`` header composed from two secrets and the
  ``/otlp/v1/traces`` path. The sink answers that path only with the expected header (401
  otherwise), and a preflight proves each token reaches its own location before the runs.

Policy: the Grafana account lives in its own file (``profiles.yaml``) because a tree from before
backend profiles refuses ``backend:``; d0 (and the baseline section's d) read a directory with
``bench.yaml`` alone.
"""

from __future__ import annotations

import base64
import os
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Grafana Cloud's stack (instance) id is a number and no secret; the token is shaped like an
#: access-policy token (``glc_`` and base64 JSON), so the composed header has a real length.
GRAFANA_INSTANCE = 123456
GRAFANA_TOKEN = "glc_" + base64.b64encode(
    b'{"o":"654321","n":"stack-123456-otlp-bench","k":"0a1b2c3d4e5f60718293a4b5c6d7e8f9","m":{"r":"prod-eu-west-2"}}'
).decode("ascii")
GRAFANA_ENV = {"GRAFANA_TOKEN_BENCH": GRAFANA_TOKEN}
GRAFANA_PROJECT_ID = "6161"
#: The sink's answer to Grafana's path carries this media type, so the preflight can tell
#: that a request reached that location and not ``/``.
GRAFANA_MARK = "application/x-protobuf; bench=grafana"

PROFILES_POLICY = """\
service_accounts:
  bench-grafana:
    backend: grafana-cloud
    upstream: {sink}
    instance_id: {instance}
    access_token: {{env: GRAFANA_TOKEN_BENCH}}
rules:
  - name: grafana
    issuer: gitlab
    when: {{project_id: {project}}}
    service_account: bench-grafana
"""


def grafana_basic() -> str:
    return "Basic " + base64.b64encode(f"{GRAFANA_INSTANCE}:{GRAFANA_TOKEN}".encode()).decode("ascii")


def sink_locations() -> str:
    """nginx locations for the sink: Grafana's exact path, checked; any other /otlp/ path 404."""
    return f"""
        location = /otlp/v1/traces {{ default_type "{GRAFANA_MARK}";
          if ($http_authorization != "{grafana_basic()}") {{ return 401; }}
          return 200 ""; }}
        location /otlp/ {{ return 404; }}"""


def write_policies(work: Path, bench_policy: str, sink_url: str) -> Path:
    """``policies/`` (bench.yaml + profiles.yaml) for every contender; ``policies-baseline/``
    (bench.yaml only) for d0. Returns the latter."""
    (work / "policies" / "profiles.yaml").write_text(
        PROFILES_POLICY.format(sink=sink_url, instance=GRAFANA_INSTANCE, project=GRAFANA_PROJECT_ID)
    )
    baseline = work / "policies-baseline"
    baseline.mkdir()
    (baseline / "bench.yaml").write_text(bench_policy)
    return baseline


def source_env(tree: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(tree)}


def check_source_tree(python: str, tree: Path) -> str:
    """The tree's ``proxy`` package as the interpreter imports it with d0's environment and
    working directory (the editable install of this checkout must not win); raises otherwise."""
    if not (tree / "proxy" / "cli.py").is_file():
        raise SystemExit(f"--baseline {tree}: no proxy/cli.py there; give a tracegate source tree")
    found = subprocess.run(  # noqa: S603 - our own fixed argv
        [python, "-c", "import proxy.cli, proxy; print(proxy.__file__)"],
        cwd=tree,
        env={**os.environ, **source_env(tree)},
        capture_output=True,
        text=True,
        check=False,
    )
    where = Path(found.stdout.strip() or "?").resolve()
    if found.returncode != 0 or not where.is_relative_to(tree.resolve()):
        raise SystemExit(f"--baseline {tree}: imports proxy from {where} {found.stderr[-400:]}")
    return str(where.parent)


async def preflight(url: str, body: bytes, lightstep: str, grafana: str) -> None:
    """One export per token: Lightstep's reaches ``/``, Grafana's its own checked location."""
    import aiohttp

    async with aiohttp.ClientSession() as client:
        for token, mark in ((lightstep, "application/x-protobuf"), (grafana, GRAFANA_MARK)):
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-protobuf"}
            async with client.post(url + "/v1/traces", data=body, headers=headers) as resp:
                got = resp.headers.get("Content-Type", "")
                if resp.status != 200 or got != mark:
                    raise RuntimeError(f"profiles preflight: {resp.status} {got!r}, expected 200 {mark!r}")


Case = Callable[..., Callable[[], Any]]


def baseline_cases(case: Case, c: tuple[Any, Any], d0: tuple[Any, Any], d: tuple[Any, Any]) -> dict[str, Any]:
    cases = {}
    for body in ("1KB", "20KB", "1MB"):
        cases[f"c {body}"] = case(*c, body)
        cases[f"d0 {body}"] = case(*d0, body)
        cases[f"d {body}"] = case(*d, body)
    return cases


def profile_cases(case: Case, d: tuple[Any, Any], grafana: Any) -> dict[str, Any]:
    return {"d 20KB": case(*d, "20KB"), "d grafana 20KB": case(d[0], grafana, "20KB")}


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f} %"


def paired(results: dict[str, Any], section: str, num: str, den: str, attr: str = "rps") -> str:
    """The median over rounds of num/den within each round (the two ran back to back, so drift
    in the machine's other load cancels better than in the ratio of medians), with its range."""
    rounds = results.get("rounds", {}).get(section, {})
    if num not in rounds or den not in rounds:
        return "—"
    ratios = sorted(getattr(a, attr) / getattr(b, attr) for a, b in zip(rounds[num], rounds[den], strict=True))
    return f"{statistics.median(ratios):.3f} [{ratios[0]:.2f}–{ratios[-1]:.2f}]"


def baseline_lines(results: dict[str, Any], source: str) -> list[str]:
    rows = results["baseline"]
    lines = [
        f"## Before and after: d0 (tracegate from {source}) against d (this tree), 32 connections",
        "",
        "Medians of the rounds; d/d0 is the ratio of medians, and the median of the per-round ratios "
        "[lowest–highest round].",
        "",
        "| payload | c req/s | d0 req/s | d req/s | d/d0 | d/d0 per round | d0/c | d/c | d0 CPU s/1k | d CPU s/1k "
        "| d/d0 CPU per round | d0 p99 ms | d p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for body in ("1KB", "20KB", "1MB"):
        c, d0, d = rows[f"c {body}"], rows[f"d0 {body}"], rows[f"d {body}"]
        lines.append(
            f"| {body} | {c.rps:,.0f} | {d0.rps:,.0f} | {d.rps:,.0f} | {d.rps / d0.rps:.3f} ({_pct(d.rps / d0.rps)}) "
            f"| {paired(results, 'baseline', f'd {body}', f'd0 {body}')} "
            f"| {d0.rps / c.rps:.2f} | {d.rps / c.rps:.2f} | {d0.cpu_per_1k:.3f} | {d.cpu_per_1k:.3f} "
            f"| {paired(results, 'baseline', f'd {body}', f'd0 {body}', 'cpu_per_1k')} | {d0.p99:.2f} | {d.p99:.2f} |"
        )
    return lines


def profiles_lines(results: dict[str, Any]) -> list[str]:
    rows = results["profiles"]
    d, g = rows["d 20KB"], rows["d grafana 20KB"]
    per_round = paired(results, "profiles", "d grafana 20KB", "d 20KB")
    cpu_per_round = paired(results, "profiles", "d grafana 20KB", "d 20KB", "cpu_per_1k")
    return [
        "## Backend profiles: Lightstep (d) against grafana-cloud, same process, 20 KB, 32 connections",
        "",
        "| account | req/s | p50 ms | p99 ms | CPU s / 1k req |",
        "|---|---:|---:|---:|---:|",
        f"| d lightstep | {d.rps:,.0f} | {d.p50:.2f} | {d.p99:.2f} | {d.cpu_per_1k:.3f} |",
        f"| d grafana-cloud | {g.rps:,.0f} | {g.p50:.2f} | {g.p99:.2f} | {g.cpu_per_1k:.3f} |",
        "",
        f"grafana/lightstep throughput: ratio of medians {g.rps / d.rps:.3f} ({_pct(g.rps / d.rps)}), "
        f"per round {per_round}; CPU per request: ratio of medians {g.cpu_per_1k / d.cpu_per_1k:.3f}, "
        f"per round {cpu_per_round}.",
    ]
