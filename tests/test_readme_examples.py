"""The examples of the README and of the documentation pages (``docs/*.md``), run for real,
so that neither can drift from the code.

How to mark an example: put a second word after the fence's language (the info string).
GitHub and the site (superfences' ``relaxed_headers``) still highlight by the first word;
the second says how this test checks it.
Unmarked fences are illustrations and are not checked; an unknown second word fails
(a typo must not silently skip an example).

``console run``
    Lines starting with ``$ `` are commands, each run with bash from the repository root,
    the venv's ``bin`` first on PATH (so ``tracegate`` is this checkout). The lines up to
    the next ``$ `` are its expected stdout, compared exactly (trailing blanks ignored).
    The command must exit 0, or N if the line ends with ``# exit N``.
``sh run``
    The block runs as one bash script (``set -euo pipefail``) from the repository root,
    the venv first on PATH; it must exit 0.
``sh live``
    Like ``sh run``, against a real tracegate the test starts (the suite's usual policy
    from ``tests/conftest.py``: issuer ``gitlab`` = a stand-in issuer, accounts
    ``payments-ci``/``docs-ci``, rule ``payments-protected`` with services, plus a Gitea
    webhook entry for ``payments/api``), with these variables set: ``TRACEGATE_URL``,
    ``TRACEGATE_ID_TOKEN`` (a GitLab-shaped token for ``payments/api`` on protected
    ``main``, environment ``production``), ``GITEA_HOOK_PAYMENTS`` (the entry's secret).
``yaml policy``
    A complete policy file: loaded alone through the real loader, as ``tracegate check``
    does (secret references checked for form, not read); it must load with no problem.
``yaml policy-fragment``
    Part of a policy: every issuer or service account it names but does not define is
    added as a stub, then it loads as above.
``yaml gitlab-ci``
    A ``.gitlab-ci.yml`` excerpt: it must parse as YAML, and every ``script`` line that
    runs ``curl`` runs as in ``sh live`` (GitLab sets ``TRACEGATE_ID_TOKEN`` from
    ``id_tokens``) and must exit 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.dev.standins import StandInIssuer
from proxy.policy import load_policy
from tests.conftest import policy_yaml
from tests.system import require_program

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
#: Where examples live: the README (the front door) and every page of the site.
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
MARKS = ("console run", "sh run", "sh live", "yaml policy", "yaml policy-fragment", "yaml gitlab-ci")
_FENCE = re.compile(r"^(`{3,}|~{3,})([^`]*)$")
GITEA_SECRET = "readme-hook-secret-0123456789"
LIVE_WEBHOOK = """\
webhooks:
  - name: readme-payments-api
    source: gitea
    repository: "payments/api"
    secret: [{env: GITEA_HOOK_PAYMENTS}]
    events: [push, tag, release]
    refs: ["refs/heads/main", "refs/tags/v*"]
    service_account: payments-ci
    services: [payments-api, payments-worker]
"""


@dataclass(frozen=True)
class Example:
    source: str
    line: int
    info: str
    text: str

    @property
    def mark(self) -> str:
        return " ".join(self.info.split()[:2])

    def __str__(self) -> str:
        return f"{self.source}:{self.line}"


def fences(text: str, source: str = "README.md") -> list[Example]:
    """Every fenced block (CommonMark: a run of 3+ backticks or tildes, closed by a run of
    the same character at least as long)."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, body, j = opening.group(1), [], i + 1
        while j < len(lines) and not (
            lines[j].startswith(fence[0] * len(fence)) and not lines[j].strip().strip(fence[0])
        ):
            body.append(lines[j])
            j += 1
        found.append(Example(source, i + 1, opening.group(2).strip(), "\n".join(body) + "\n"))
        i = j + 1
    return found


EXAMPLES = [e for doc in DOCUMENTS for e in fences(doc.read_text(), doc.relative_to(ROOT).as_posix())]


def marked(mark: str) -> list[Example]:
    return [e for e in EXAMPLES if e.mark == mark]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **(extra or {})}


def _bash(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_mark_is_known_and_the_core_examples_are_marked() -> None:
    unknown = [f"{e}: {e.info!r}" for e in EXAMPLES if len(e.info.split()) > 1 and e.mark not in MARKS]
    assert not unknown, f"unknown example marks (known: {', '.join(MARKS)})"
    assert marked("console run") and marked("yaml policy")
    # The README keeps its policy example; the pages carry the rest.
    assert next(e.source for e in marked("yaml policy")) == "README.md"
    assert {e.source for e in EXAMPLES if e.mark in MARKS} - {"README.md"}


def console_steps(text: str) -> list[tuple[str, list[str]]]:
    steps: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps and steps[-1][0].endswith("\\"):
            steps[-1] = (steps[-1][0][:-1] + line, steps[-1][1])
        elif steps:
            steps[-1][1].append(line.rstrip())
        else:
            raise AssertionError(f"console example starts with output, not a '$ ' command: {line!r}")
    return steps


@pytest.mark.parametrize("example", marked("console run"), ids=str)
def test_console_examples_print_what_the_page_shows(example: Example) -> None:
    for command, expected in console_steps(example.text):
        want_exit = re.search(r"#\s*exit (\d+)\s*$", command)
        result = _bash(command, _env())
        while expected and not expected[-1]:
            expected.pop()
        assert [line.rstrip() for line in result.stdout.rstrip().splitlines()] == expected, (
            f"{example}: {command}\n{result.stderr}"
        )
        assert result.returncode == (int(want_exit.group(1)) if want_exit else 0), f"{example}: {command}"


@pytest.mark.parametrize("example", marked("sh run"), ids=str)
def test_shell_examples_run(example: Example) -> None:
    result = _bash(example.text, _env())
    assert result.returncode == 0, f"{example}:\n{result.stdout}\n{result.stderr}"


def _load(tmp_path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    load_policy(tmp_path, environ={}, resolve_secrets=False)  # raises with every problem


@pytest.mark.parametrize("example", marked("yaml policy"), ids=str)
def test_policy_examples_load(example: Example, tmp_path: Path) -> None:
    _load(tmp_path, {"policy.yaml": example.text})


def stubs_for(fragment: dict[str, Any]) -> dict[str, Any]:
    """Issuers and service accounts the fragment names but does not define."""
    entries = [*(fragment.get("rules") or []), *(fragment.get("webhooks") or [])]
    issuers = {e["issuer"] for e in entries if "issuer" in e} - set(fragment.get("issuers") or {})
    accounts = {e["service_account"] for e in entries if "service_account" in e}
    accounts -= set(fragment.get("service_accounts") or {})
    stub: dict[str, Any] = {}
    if issuers:
        stub["issuers"] = {n: {"issuer": f"https://{n}.stub.example", "audiences": ["tracegate"]} for n in issuers}
    if accounts:
        stub["service_accounts"] = {n: {"access_token": {"env": "STUB_KEY"}} for n in accounts}
    return stub


@pytest.mark.parametrize("example", marked("yaml policy-fragment"), ids=str)
def test_policy_fragments_load(example: Example, tmp_path: Path) -> None:
    fragment = yaml.safe_load(example.text)
    assert isinstance(fragment, dict), example
    stub = stubs_for(fragment)
    _load(tmp_path, {"00-stubs.yaml": yaml.safe_dump(stub) if stub else "{}\n", "10-fragment.yaml": example.text})


def ci_curl_lines(document: Any) -> list[str]:
    jobs = document.values() if isinstance(document, dict) else []
    return [
        line
        for job in jobs
        if isinstance(job, dict)
        for line in job.get("script", [])
        if isinstance(line, str) and re.match(r"\s*curl\s", line)
    ]


@pytest.fixture
async def live_env(start_tracegate: Any, issuer: StandInIssuer) -> dict[str, str]:
    require_program("openssl", "openssl")
    require_program("curl", "curl")
    tg = await start_tracegate(
        policy_yaml(issuer.url, LIVE_WEBHOOK),
        env={
            "LS_TOKEN_PAYMENTS": "ls-key-payments-0123456789abcdef",
            "LS_TOKEN_DOCS": "ls-key-docs-fedcba9876543210",
            "GITEA_HOOK_PAYMENTS": GITEA_SECRET,
        },
    )
    await tg.keys_ready()
    return _env({"TRACEGATE_URL": tg.url, "TRACEGATE_ID_TOKEN": issuer.mint(), "GITEA_HOOK_PAYMENTS": GITEA_SECRET})


async def _bash_async(script: str, env: dict[str, str]) -> tuple[int, str]:
    import asyncio

    process = await asyncio.create_subprocess_exec(
        "bash", "-c", "set -euo pipefail\n" + script, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode()


@pytest.mark.parametrize("example", marked("sh live"), ids=str)
async def test_live_examples_run_against_tracegate(example: Example, live_env: dict[str, str]) -> None:
    code, out = await _bash_async(example.text, live_env)
    assert code == 0, f"{example}:\n{out}"


@pytest.mark.parametrize("example", marked("yaml gitlab-ci"), ids=str)
async def test_gitlab_ci_examples_parse_and_their_curl_lines_run(example: Example, live_env: dict[str, str]) -> None:
    document = yaml.safe_load(example.text)
    assert isinstance(document, dict), example
    for line in ci_curl_lines(document):
        code, out = await _bash_async(line, live_env)
        assert code == 0, f"{example}: {line}\n{out}"
