"""The shipped systemd unit, rendered for this machine, passes systemd's own checks and starts
tracegate as written.

There is no systemd to start it here, so the unit is *rendered*: ``ExecStart``'s program
becomes this checkout's ``tracegate``, ``%E`` and ``%S`` (``/etc``, ``/var/lib``) a temporary
directory, the ``EnvironmentFile`` the shipped example with the key filled in, and the
listeners loopback on free ports (tests never bind 4317, 4318 or 9464). ``systemd-analyze
verify`` and ``systemd-analyze security --offline`` judge the rendered file; then the
process runs with exactly the environment the unit gives it (its ``Environment=`` lines and
the environment file, as systemd parses them), is reloaded by the ``ExecReload`` command and
stopped with the ``KillSignal`` within ``TimeoutStopSec``.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from proxy.dev.standins import free_port
from proxy.settings.config import OPTIONS
from tests.system import require_program

ROOT = Path(__file__).parent.parent
UNIT = ROOT / "deploy" / "systemd" / "tracegate.service"
ENV_FILE = ROOT / "deploy" / "systemd" / "tracegate.env"
DEFAULTS = {option.env: option.default for option in OPTIONS}
#: The exposure score `systemd-analyze security` may give the unit at most ("OK" is below 3).
EXPOSURE = 2.0


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every directive, in order, repeats kept (as systemd reads
    them: later ``Environment=`` lines add, ``SystemCallFilter=`` lines combine)."""
    found, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def service(key: str) -> list[str]:
    return [v for s, k, v in directives(UNIT.read_text()) if s == "Service" and k == key]


def one(key: str) -> str:
    values = service(key)
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def env_file_lines(text: str) -> list[tuple[bool, str, str]]:
    """(commented, name, value) of each ``NAME=value`` line, commented or not."""
    lines = []
    for raw in text.splitlines():
        match = re.fullmatch(r"(#?)([A-Z][A-Z0-9_]*)=(.*)", raw.strip())
        if match:
            lines.append((bool(match.group(1)), match.group(2), match.group(3)))
    return lines


def test_the_unit_is_sandboxed_and_stops_reloads_and_restarts_as_tracegate_needs() -> None:
    sandbox = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "", "UMask": "0077",
        "RestrictNamespaces": "yes", "RestrictSUIDSGID": "yes", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectControlGroups": "yes", "LockPersonality": "yes",
        "SystemCallArchitectures": "native", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }  # fmt: skip
    assert {key: one(key) for key in sandbox} == sandbox
    assert one("User") not in ("", "root", "0")
    assert service("SystemCallFilter") == ["@system-service", "~@privileged @resources"]
    assert one("EnvironmentFile") == "/etc/tracegate/tracegate.env"  # required: a missing one fails the start
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"  # SIGHUP: policy, secret files, TLS
    assert one("KillSignal") == "SIGTERM"  # drains
    assert int(one("TimeoutStopSec")) > float(DEFAULTS["TRACEGATE_DRAIN_SECONDS"])
    assert one("RestartPreventExitStatus") == "2"  # tracegate's start-up errors
    environment = dict(value.split("=", 1) for value in service("Environment"))
    assert environment == {"TRACEGATE_POLICIES": "%E/tracegate/policies", "TRACEGATE_DATA_DIR": "%S/tracegate"}
    assert one("StateDirectory") == one("ConfigurationDirectory") == "tracegate"


def test_the_environment_file_names_real_settings_with_their_defaults() -> None:
    lines = env_file_lines(ENV_FILE.read_text())
    settings = [(commented, name, value) for commented, name, value in lines if name.startswith("TRACEGATE_")]
    assert len(settings) >= 8
    for commented, name, value in settings:
        assert name in DEFAULTS, f"{name} is not a tracegate setting"
        assert commented, f"{name}: the example sets nothing but the keys"
        if DEFAULTS[name]:
            assert value == DEFAULTS[name], f"{name}: the file says {value}, the default is {DEFAULTS[name]}"
    assert [(c, n, v) for c, n, v in lines if not n.startswith("TRACEGATE_")] == [(False, "LIGHTSTEP_ACCESS_TOKEN", "")]


def render(tmp_path: Path, env_file: Path) -> tuple[Path, dict[str, Path]]:
    program = Path(sys.executable).parent / "tracegate"
    places = {"%E": tmp_path / "etc", "%S": tmp_path / "var-lib"}
    text = UNIT.read_text().replace("/opt/tracegate/bin/tracegate", str(program))
    text = text.replace("EnvironmentFile=/etc/tracegate/tracegate.env", f"EnvironmentFile={env_file}")
    rendered = tmp_path / "tracegate.service"
    rendered.write_text(text)
    return rendered, places


def test_systemd_verifies_the_rendered_unit_and_rates_its_sandbox(tmp_path: Path) -> None:
    analyze = require_program("systemd-analyze", "systemd")
    env_file = tmp_path / "tracegate.env"
    shutil.copy(ENV_FILE, env_file)
    rendered, _ = render(tmp_path, env_file)
    verify = subprocess.run([analyze, "verify", str(rendered)], capture_output=True, text=True, timeout=60, check=False)
    assert (verify.returncode, verify.stderr.strip()) == (0, ""), verify.stdout + verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=true", f"--threshold={int(EXPOSURE * 10)}", "--no-pager", str(rendered)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    score = re.search(r"Overall exposure level for tracegate.service: ([0-9.]+)", security.stdout)
    assert score, security.stdout + security.stderr
    assert float(score.group(1)) <= EXPOSURE and security.returncode == 0, security.stdout[-2000:]


async def test_the_rendered_unit_starts_reloads_and_drains_tracegate(tmp_path: Path) -> None:
    env_file = tmp_path / "tracegate.env"
    env_file.write_text(
        ENV_FILE.read_text().replace("LIGHTSTEP_ACCESS_TOKEN=\n", "LIGHTSTEP_ACCESS_TOKEN=ls-vm-key-0123\n")
    )
    rendered, places = render(tmp_path, env_file)
    unit = [(key, value) for section, key, value in directives(rendered.read_text()) if section == "Service"]
    last = dict(unit)

    def expand(value: str) -> str:
        for specifier, path in places.items():
            value = value.replace(specifier, str(path))
        return value

    # As the install steps leave the machine: the starter policy, the state directory.
    shutil.copytree(ROOT / "policies", places["%E"] / "tracegate" / "policies")
    (places["%S"] / "tracegate").mkdir(parents=True, mode=0o700)
    env = {"PATH": "/usr/bin:/bin"}
    for key, value in unit:
        if key == "Environment":
            name, _, setting = value.partition("=")
            env[name] = expand(setting)
    for commented, name, value in env_file_lines(Path(last["EnvironmentFile"]).read_text()):
        if not commented:
            env[name] = value
    assert env["LIGHTSTEP_ACCESS_TOKEN"] == "ls-vm-key-0123"
    admin_port = free_port()
    env |= {  # the test's ports, on loopback
        "TRACEGATE_LISTEN": f"127.0.0.1:{free_port()}",
        "TRACEGATE_GRPC_LISTEN": f":{free_port()}",
        "TRACEGATE_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
    }
    argv = shlex.split(expand(last["ExecStart"]))
    assert argv[1:] == ["serve"]
    cwd = expand(last["WorkingDirectory"])
    err = (tmp_path / "stderr.log").open("wb")
    process = await asyncio.create_subprocess_exec(*argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
    err.close()
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        async with aiohttp.ClientSession() as client:

            async def loads() -> float:
                async with client.get(admin + "/metrics") as resp:
                    text = await resp.text()
                found = re.search(r'^tracegate_policy_loads_total\{result="ok"\} ([0-9.]+)$', text, re.M)
                return float(found.group(1)) if found else 0.0

            for _ in range(200):
                assert process.returncode is None, (tmp_path / "stderr.log").read_text()
                try:
                    async with client.get(admin + "/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("no /healthz")
            before = await loads()
            reload = shlex.split(last["ExecReload"].replace("$MAINPID", str(process.pid)))
            assert subprocess.run(reload, timeout=10, check=False).returncode == 0
            for _ in range(100):
                if await loads() > before:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("ExecReload did not reload the policy")
    finally:
        if process.returncode is None:
            process.send_signal(getattr(signal, last["KillSignal"]))
        code = await asyncio.wait_for(process.wait(), float(last["TimeoutStopSec"]))
    stderr = (tmp_path / "stderr.log").read_text()
    assert code == 0, stderr
    assert f"OTLP/HTTP {env['TRACEGATE_LISTEN']}" in stderr
    assert (places["%S"] / "tracegate" / "outbox.sqlite3").exists()  # the state directory holds the outbox
    assert "ls-vm-key-0123" not in stderr
