"""The ``docker run`` of docs/deploy-docker.md works as written with the starter policy and one variable.

No image can be built here, so the container's entry command (the Dockerfile's
ENTRYPOINT + CMD, ``tracegate serve``) runs as a process with the Dockerfile's ``ENV``,
translated: the policy volume becomes the host directory the page mounts, the data
volume a temp directory, and the listeners loopback on free ports (tests listen on
127.0.0.1 only). The variables are the ones the page passes with ``-e``. The starter's
issuer (gitlab.com) is unreachable from here: tracegate must start and serve anyway.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.dev.standins import Sink, free_port
from proxy.policy import load_policy

ROOT = Path(__file__).parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
DOCKER_DOC = (ROOT / "docs" / "deploy-docker.md").read_text()


def dockerfile_env() -> dict[str, str]:
    """Every ``ENV KEY=VALUE …`` of the final stage (continuation lines joined)."""
    text = DOCKERFILE.rsplit("\nFROM ", 1)[-1].replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for word in shlex.split(line[4:]):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def dockerfile_command() -> list[str]:
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", DOCKERFILE, re.M)
    cmd = re.search(r"^CMD (\[.*\])$", DOCKERFILE, re.M)
    assert entry and cmd
    return [*json.loads(entry.group(1)), *json.loads(cmd.group(1))]


def documented_docker_run() -> list[str]:
    block = DOCKER_DOC.split("```sh", 1)[1].split("```", 1)[0]
    line = next(c for c in block.replace("\\\n", " ").splitlines() if c.strip().startswith("docker run"))
    return shlex.split(line)


def test_documented_docker_run_mounts_the_starter_and_passes_exactly_the_variables_it_needs() -> None:
    words = documented_docker_run()
    volumes = [words[i + 1] for i, w in enumerate(words) if w == "-v"]
    variables = {words[i + 1] for i, w in enumerate(words) if w == "-e"}
    mounts = {target: source.replace("$PWD", str(ROOT)) for source, target, *_ in (v.split(":") for v in volumes)}
    assert mounts == {dockerfile_env()["TRACEGATE_POLICIES"]: str(ROOT / "policies")}
    policy = load_policy(ROOT / "policies", environ={}, resolve_secrets=False)
    needed = {str(a.access_token_ref.name) for a in policy.service_accounts.values()}
    assert variables == needed == {"LIGHTSTEP_ACCESS_TOKEN"}
    assert not policy.webhooks
    assert all(("project_id" in dict(r.when) or "namespace_id" in dict(r.when)) for r in policy.rules)


async def test_entry_command_with_the_image_environment_starts_and_refuses_forged_tokens(tmp_path: Path) -> None:
    sink = Sink()  # stands in for Lightstep, to show that nothing refused is forwarded
    await sink.start()
    image_env = dockerfile_env()
    admin_port, ingest_port = free_port(), free_port()
    translated = {
        **image_env,
        "TRACEGATE_POLICIES": str(ROOT / "policies"),
        "TRACEGATE_DATA_DIR": str(tmp_path / "var-lib-tracegate"),
        "TRACEGATE_LISTEN": f"127.0.0.1:{ingest_port}",
        "TRACEGATE_GRPC_LISTEN": f":{free_port()}",
        "TRACEGATE_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "TRACEGATE_UPSTREAM": sink.url,
    }
    (tmp_path / "var-lib-tracegate").mkdir()
    env = {"PATH": os.environ["PATH"], **translated, "LIGHTSTEP_ACCESS_TOKEN": "ls-starter-key-0123456789"}
    command = dockerfile_command()
    assert command == ["tracegate", "serve"]
    program = Path(sys.executable).parent / command[0]
    argv = [str(program), *command[1:]] if program.exists() else [sys.executable, "-m", "proxy", *command[1:]]
    out, err = (tmp_path / "stdout.log").open("wb"), (tmp_path / "stderr.log").open("wb")
    process = await asyncio.create_subprocess_exec(*argv, env=env, stdout=out, stderr=err, cwd=tmp_path)
    out.close()
    err.close()
    base, admin = f"http://127.0.0.1:{ingest_port}", f"http://127.0.0.1:{admin_port}"
    try:
        async with aiohttp.ClientSession() as client:
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

            now = int(time.time())
            claims = {
                "iss": "https://gitlab.com", "aud": "tracegate", "sub": "project_path:x/y:ref_type:branch:ref:main",
                "project_id": "12345678", "iat": now, "exp": now + 300,
            }  # fmt: skip
            attacker_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            forged = {
                "alg none": jwt.encode(claims, None, algorithm="none"),
                "HS256 with a guessed secret": jwt.encode(claims, "tracegate-secret-key-32-bytes-long!", "HS256"),
                "not a JWT": "starter-forgery",
            }
            for what, token in forged.items():
                async with client.post(
                    base + "/v1/traces", data=b"{}", headers={"Authorization": f"Bearer {token}"}
                ) as resp:
                    assert resp.status == 401, what
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer"), what
            async with client.post(base + "/v1/traces", data=b"{}") as resp:
                assert resp.status == 401
            # Signed by a key gitlab.com never published: 503 while its keys are unreachable
            # (here), 401 unknown-kid where they are reachable. Never forwarded either way.
            resigned = jwt.encode(claims, attacker_key, algorithm="RS256", headers={"kid": "attacker"})
            async with client.post(
                base + "/v1/traces", data=b"{}", headers={"Authorization": f"Bearer {resigned}"}
            ) as resp:
                assert resp.status in (401, 503)
        assert sink.received == []
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 30)
        await sink.stop()
    stderr = (tmp_path / "stderr.log").read_text()
    assert code == 0, stderr
    assert "Traceback" not in stderr
    audit = [json.loads(line) for line in (tmp_path / "stdout.log").read_text().splitlines()]
    assert [r["decision"] for r in audit] == ["refused"] * 5
    assert "ls-starter-key" not in stderr + (tmp_path / "stdout.log").read_text()
