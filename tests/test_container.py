"""The container: a pinned base, dependencies in a layer that a code change does not
rebuild, nothing secret or stale in the image, a non-root user, and a health check that
starts on the standard library alone.

No container engine runs here, so the Dockerfile and ``.dockerignore`` are read as Docker
reads them (continuation lines, stages, ``ARG`` substitution in ``FROM``; ``.dockerignore``'s
Go-style patterns with ``**`` and parent-directory matching), and each check is also shown a
broken Dockerfile so that it is seen to fail. The health check runs as the HEALTHCHECK runs
it, ``python -m proxy.run.healthcheck``, against real servers on loopback, in an interpreter
that has the standard library and the module's three files and nothing else (``-S``: no
site-packages).
"""

from __future__ import annotations

import http.server
import json
import posixpath
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.dev.standins import free_port
from proxy.run import healthcheck
from proxy.settings.config import OPTIONS
from proxy.settings.values import host_port

ROOT = Path(__file__).parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
DOCKERIGNORE = (ROOT / ".dockerignore").read_text()
HEALTHCHECK_COMMAND = ["python", "-m", "proxy.run.healthcheck"]


# --- the Dockerfile, read as Docker reads it -------------------------------------------


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def instructions(text: str) -> list[Instruction]:
    """One per instruction, continuation lines joined; comment lines dropped, also inside
    a continuation, as Docker drops them."""
    found: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        found.append(Instruction(start, keyword.upper(), args.strip()))
        pending = ""
    return found


def stages(text: str) -> tuple[dict[str, str], list[list[Instruction]]]:
    """The global ``ARG`` defaults (before the first ``FROM``) and the stages, each starting
    with its ``FROM``."""
    global_args: dict[str, str] = {}
    found: list[list[Instruction]] = []
    for ins in instructions(text):
        if ins.keyword == "FROM":
            found.append([ins])
        elif found:
            found[-1].append(ins)
        elif ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            global_args[name] = default
    return global_args, found


def base_image(from_args: str, global_args: dict[str, str]) -> str:
    image = next(w for w in from_args.split() if not w.startswith("--"))
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args.get(m.group(1) or m.group(2), ""), image)


def env_names(ins: Instruction) -> list[str]:
    """The names an ``ENV``, ``ARG`` or ``LABEL`` sets (``K=V …`` or the old ``K V``)."""
    words = shlex.split(ins.args)
    if ins.keyword != "ARG" and words and "=" not in words[0]:
        return [words[0]]
    return [w.partition("=")[0] for w in words]


def pin_problems(text: str) -> list[str]:
    global_args, found = stages(text)
    names: set[str] = set()
    problems = []
    for stage in found:
        words = stage[0].args.split()
        image = base_image(stage[0].args, global_args)
        if image not in names and not re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", image):
            problems.append(f"line {stage[0].line}: FROM {image} is not python:3.11-slim pinned by digest")
        if len(words) >= 3 and words[-2].upper() == "AS":
            names.add(words[-1])
    return problems


def _index(stage: list[Instruction], keyword: str, pattern: str) -> int:
    """The position of the first instruction of that keyword whose arguments match."""
    return next((i for i, ins in enumerate(stage) if ins.keyword == keyword and re.search(pattern, ins.args)), -1)


def layer_problems(text: str) -> list[str]:
    """The dependency list leaves the build stage before the code enters it, and the final
    stage installs it before the code: a change under proxy/ then reuses the layer."""
    _, found = stages(text)
    if len(found) < 2:
        return ["expected a build stage and a runtime stage"]
    build, final = found[0], found[-1]
    steps = {
        "COPY pyproject.toml alone": _index(build, "COPY", r"^pyproject\.toml\s+\S+$"),
        "RUN that writes requirements.txt from it": _index(build, "RUN", r"tomllib.*>\s*requirements\.txt"),
        "COPY of proxy/": _index(build, "COPY", r"^proxy\s"),
    }
    problems = [f"build stage: no {what}" for what, at in steps.items() if at < 0]
    if not problems and list(steps.values()) != sorted(steps.values()):
        problems.append(f"build stage: expected this order: {', '.join(steps)}")
    final_steps = {
        "COPY of requirements.txt": _index(final, "COPY", r"--from=\S+\s+\S*requirements\.txt\s"),
        "RUN pip install -r": _index(final, "RUN", r"pip install\b.*\s-r\s"),
        "COPY of the tracegate wheel": _index(final, "COPY", r"--from=\S+\s+/wheels\s"),
        "RUN pip install --no-deps": _index(final, "RUN", r"pip install\b.*--no-deps"),
    }
    problems += [f"runtime stage: no {what}" for what, at in final_steps.items() if at < 0]
    if all(at >= 0 for at in final_steps.values()) and list(final_steps.values()) != sorted(final_steps.values()):
        problems.append(f"runtime stage: expected this order: {', '.join(final_steps)}")
    return problems


SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|PRIVATE|CREDENTIAL|API_?KEY|ACCESS_?KEY", re.I)
SECRET_VALUE = re.compile(r"ls-key-|Bearer\s|-----BEGIN|glpat-|ghp_|AKIA[0-9A-Z]{16}")
SECRET_FILE = re.compile(r"(^|/)(\.env|\.netrc|\.pypirc|id_rsa|id_ed25519|\.tracegate-dev)$|\.(pem|key|p12)$")


def secret_problems(text: str) -> list[str]:
    problems = []
    for ins in instructions(text):
        if ins.keyword in ("ENV", "ARG", "LABEL"):
            problems += [f"line {ins.line}: {ins.keyword} {n}" for n in env_names(ins) if SECRET_NAME.search(n)]
        if SECRET_VALUE.search(ins.args):
            problems.append(f"line {ins.line}: a credential-shaped value in {ins.keyword}")
        if ins.keyword in ("COPY", "ADD"):
            sources = [w for w in shlex.split(ins.args) if not w.startswith("--")][:-1]
            problems += [f"line {ins.line}: {ins.keyword} {s}" for s in sources if SECRET_FILE.search(s.rstrip("/"))]
    return problems


def user_problems(text: str) -> list[str]:
    _, found = stages(text)
    users = [ins.args for ins in found[-1] if ins.keyword == "USER"]
    if not users:
        return ["the runtime stage sets no USER: the container would run as root"]
    user = users[-1].partition(":")[0]
    if not user.isdigit() or int(user) == 0:  # numeric, so that runAsNonRoot can verify it
        return [f"USER {users[-1]}: expected a numeric uid other than 0"]
    return []


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|s|m|h)", duration))


def healthcheck_problems(text: str) -> list[str]:
    _, found = stages(text)
    checks = [ins.args for ins in found[-1] if ins.keyword == "HEALTHCHECK"]
    if not checks:
        return ["the runtime stage has no HEALTHCHECK"]
    options, _, command = checks[-1].partition("CMD ")
    problems = []
    try:
        if json.loads(command) != HEALTHCHECK_COMMAND:
            problems.append(f"HEALTHCHECK runs {command}, not {HEALTHCHECK_COMMAND}")
    except ValueError:
        problems.append(f"HEALTHCHECK CMD is not in exec form: {command}")
    timeout = re.search(r"--timeout=(\S+)", options)
    if not timeout or _seconds(timeout.group(1)) <= healthcheck.TIMEOUT:
        problems.append(f"HEALTHCHECK --timeout must exceed the probe's own {healthcheck.TIMEOUT} s")
    return problems


def _broken(old: str, new: str) -> str:
    text = DOCKERFILE.replace(old, new)
    assert text != DOCKERFILE, f"the Dockerfile no longer has {old!r}: update the test"
    return text


def test_the_base_image_is_pinned_by_digest() -> None:
    assert pin_problems(DOCKERFILE) == []
    assert "docker buildx imagetools inspect python:3.11-slim" in DOCKERFILE  # how to move the pin
    unpinned = re.sub(r"@sha256:[0-9a-f]{64}", "", DOCKERFILE)
    assert unpinned != DOCKERFILE and pin_problems(unpinned)
    assert pin_problems(_broken("FROM ${PYTHON_IMAGE}\n", "FROM python:3.11-slim\n"))


def test_dependencies_are_installed_in_a_layer_before_the_code() -> None:
    assert layer_problems(DOCKERFILE) == []
    assert layer_problems(_broken("COPY pyproject.toml ./", "COPY pyproject.toml README.md ./"))
    assert layer_problems(_broken("COPY pyproject.toml ./\n", "COPY pyproject.toml ./\nCOPY proxy ./proxy\n"))
    assert layer_problems(_broken("pip install --no-cache-dir -r", "pip install --no-cache-dir ."))


def test_no_secret_is_baked_into_the_image() -> None:
    assert secret_problems(DOCKERFILE) == []
    assert secret_problems(_broken("PYTHONUNBUFFERED=1", "PYTHONUNBUFFERED=1 LIGHTSTEP_ACCESS_TOKEN=abc"))
    assert secret_problems(_broken("COPY proxy ./proxy", "COPY .env proxy ./proxy"))
    assert secret_problems(_broken("USER 10001", "ARG GITLAB_TOKEN\nUSER 10001"))


def test_the_image_runs_as_a_numeric_non_root_user() -> None:
    assert user_problems(DOCKERFILE) == []
    assert "--uid 10001" in DOCKERFILE  # the user it names exists in the image
    assert user_problems(_broken("USER 10001", "USER root"))
    assert user_problems(_broken("USER 10001", "USER tracegate"))
    assert user_problems(_broken("USER 10001\n", ""))


def test_the_healthcheck_runs_the_module_and_gives_up_before_docker_does() -> None:
    assert healthcheck_problems(DOCKERFILE) == []
    assert healthcheck_problems(_broken('"proxy.run.healthcheck"', '"proxy.healthcheck"'))
    assert healthcheck_problems(_broken("--timeout=3s", "--timeout=2s"))


# --- .dockerignore, matched as Docker matches it ------------------------------------------


def _pattern(pattern: str) -> re.Pattern[str]:
    """moby/patternmatcher's translation: ``**/`` any run of directories (none too), ``**``
    at the end anything, ``*`` and ``?`` within one path element, ``[…]`` a class."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 3 if pattern.startswith("**/", i) else 2
            out += ".*" if i >= len(pattern) else "(?:.*/)?"
            continue
        char = pattern[i]
        if char == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
        i += 1
    return re.compile(out)


def ignored(path: str, text: str = DOCKERIGNORE) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out: the last pattern that
    matches the path or one of its parent directories decides; ``!`` re-includes."""
    parents = [path.split("/")[:n] for n in range(1, path.count("/") + 2)]
    result = False
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = _pattern(posixpath.normpath(line.lstrip("!").strip()).lstrip("/"))
        if any(pattern.fullmatch("/".join(p)) for p in parents):
            result = not negated
    return result


LEFT_OUT = [
    ".git/HEAD",
    ".venv/bin/python",
    "proxy/__pycache__/cli.cpython-311.pyc",
    "proxy/run/__pycache__/healthcheck.cpython-311.pyc",
    "tests/__pycache__/conftest.cpython-311-pytest-8.3.3.pyc",
    ".pytest_cache/v/cache/nodeids",
    "proxy/.pytest_cache/README.md",
    ".mypy_cache/3.11/proxy/cli.data.json",
    ".ruff_cache/0.5.0/123",
    ".hypothesis/examples/ab/cd",
    "tracegate.egg-info/PKG-INFO",
    "bench/results/speed-2026-11-22.md",
    ".tracegate-dev/token",
    "data/outbox.sqlite3",
]


def test_dockerignore_keeps_caches_and_local_state_out_and_the_sources_in() -> None:
    assert [p for p in LEFT_OUT if not ignored(p)] == []
    sources = ["pyproject.toml", "README.md", "Dockerfile"] + [
        p.relative_to(ROOT).as_posix() for p in (ROOT / "proxy").rglob("*.py") if "__pycache__" not in p.parts
    ]
    assert len(sources) > 40 and [p for p in sources if ignored(p)] == []
    # the matcher itself, on Docker's documented cases
    assert ignored("a/b/__pycache__/x.pyc", "**/__pycache__") and ignored("__pycache__/x", "**/__pycache__")
    assert not ignored("proxy/data.py", "data") and ignored("data/x", "/data/")
    assert ignored("a/b.egg-info/PKG-INFO", "**/*.egg-info") and not ignored("a/b.egg-info", "*.egg-info")
    assert not ignored("a.md", "*.md\n!a.md")


# --- the health check, run as the HEALTHCHECK runs it ---------------------------------------


@dataclass
class Admin:
    """A stand-in admin listener on loopback: answers ``status`` and records the paths asked."""

    status: int = 200
    paths: list[str] = field(default_factory=list)
    port: int = 0


@pytest.fixture
def admin() -> Iterator[Admin]:
    state = Admin()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.paths.append(self.path)
            self.send_response(state.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def stdlib_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the module and the two packages ``-m`` imports, nothing else."""
    where = tmp_path_factory.mktemp("healthcheck")
    for name in ("proxy/__init__.py", "proxy/run/__init__.py", "proxy/run/healthcheck.py"):
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, where / name)
    return where


def probe(where: Path, admin_listen: str | None) -> subprocess.CompletedProcess[str]:
    """``python -m proxy.run.healthcheck`` with no site-packages (-S) and no PYTHON* variables
    (-E): the standard library and the copied files are all it can import."""
    env = {} if admin_listen is None else {"TRACEGATE_ADMIN_LISTEN": admin_listen}
    return subprocess.run(
        [sys.executable, "-S", "-E", "-m", "proxy.run.healthcheck"],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


#: Runs the module as ``-m`` does (runpy, as ``__main__``) and prints what it added to
#: ``sys.modules``: what it imported, successfully, beyond the interpreter's own start-up.
RUN_AND_LIST = """
import json, runpy, sys
before = set(sys.modules)
try:
    runpy.run_module("proxy.run.healthcheck", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_the_healthcheck_imports_only_the_standard_library() -> None:
    """Apart from the two package ``__init__`` files that ``-m`` has to import on the way,
    every module the probe imports is standard library."""
    env = {"PATH": "/usr/bin:/bin", "TRACEGATE_ADMIN_LISTEN": f"127.0.0.1:{free_port()}"}
    process = subprocess.run(
        [sys.executable, "-c", RUN_AND_LIST], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    added = set(json.loads(process.stdout))
    assert {"proxy", "proxy.run", "http.client"} <= added, process.stderr  # it did run the probe
    outside = {m for m in added if m.partition(".")[0] not in sys.stdlib_module_names}
    assert outside == {"proxy", "proxy.run"}


@pytest.mark.parametrize(("status", "code"), [(200, 0), (503, 1), (500, 1), (404, 1), (204, 1), (302, 1)])
def test_the_healthcheck_is_healthy_only_on_a_200_from_healthz(
    stdlib_only: Path, admin: Admin, status: int, code: int
) -> None:
    admin.status = status
    result = probe(stdlib_only, f"127.0.0.1:{admin.port}")
    assert (result.returncode, result.stdout, result.stderr) == (code, "", "")
    assert admin.paths == ["/healthz"]


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "0.0.0.0:{port}", ":{port}", "[::]:{port}", "localhost:{port}"])
def test_the_healthcheck_follows_TRACEGATE_ADMIN_LISTEN(stdlib_only: Path, admin: Admin, form: str) -> None:
    """The image sets 0.0.0.0:9464: a wildcard is asked on loopback."""
    result = probe(stdlib_only, form.format(port=admin.port))
    assert (result.returncode, result.stderr) == (0, "")
    assert admin.paths == ["/healthz"]


@pytest.mark.parametrize("setting", ["127.0.0.1:{dead}", "nonsense", "127.0.0.1:99999", "127.0.0.1:"])
def test_the_healthcheck_fails_cleanly_on_a_dead_port_or_a_bad_setting(stdlib_only: Path, setting: str) -> None:
    result = probe(stdlib_only, setting.format(dead=free_port()))
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "")


def test_the_healthcheck_gives_up_after_two_seconds_on_a_listener_that_never_answers(stdlib_only: Path) -> None:
    with socket.socket() as mute:  # accepted by the kernel's backlog, never answered
        mute.bind(("127.0.0.1", 0))
        mute.listen(1)
        started = time.monotonic()
        result = probe(stdlib_only, f"127.0.0.1:{mute.getsockname()[1]}")
        elapsed = time.monotonic() - started
    assert (result.returncode, result.stderr) == (1, "")
    assert healthcheck.TIMEOUT <= elapsed < 2.9, elapsed  # inside the HEALTHCHECK's 3 s


@pytest.mark.parametrize(
    "value",
    [
        "127.0.0.1:9464",
        "0.0.0.0:9464",
        ":9464",
        "[::]:9464",
        "[::1]:9464",
        "::1:9464",
        "admin.internal:80",
        "host:0",
        "host:65535",
        "host:65536",
        "host:",
        "host:-1",
        "9464",
        "",
        "a:b",
    ],
)
def test_the_healthcheck_reads_the_setting_as_the_settings_do(value: str) -> None:
    """Its own parse (no import of proxy.settings) gives host_port's answers, wildcards asked
    on loopback, and the same default."""
    try:
        host, port = host_port(value)
    except ValueError:
        with pytest.raises(ValueError):
            healthcheck.admin_address({"TRACEGATE_ADMIN_LISTEN": value})
    else:
        expected = ("127.0.0.1" if host in ("0.0.0.0", "::") else host, port)
        assert healthcheck.admin_address({"TRACEGATE_ADMIN_LISTEN": value}) == expected
    default = next(o.default for o in OPTIONS if o.field == "admin_listen")
    assert default == healthcheck.DEFAULT
    assert healthcheck.healthz_url({}) == "http://127.0.0.1:9464/healthz"
    assert healthcheck.healthz_url({"TRACEGATE_ADMIN_LISTEN": "[::1]:1"}) == "http://[::1]:1/healthz"
