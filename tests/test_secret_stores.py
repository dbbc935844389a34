"""Access keys kept in AWS Secrets Manager and Vault (KV v2): read at start, followed as they
rotate (new requests carry the new key within one refresh interval, none fails meanwhile), kept
through a store outage (a metric and a log line say how stale), and a start without them is one
clear line. AWS is moto's server on loopback, driven by boto3; Vault is a stand-in serving
Vault's documented KV v2 and login API, driven by hvac."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
from aiohttp import web
from moto.server import ThreadedMotoServer

from proxy.cli import main
from proxy.dev.standins import Sink, StandInIssuer, free_port
from proxy.errors import ConfigError, PolicyLoadError
from proxy.policy import load_policy
from proxy.secrets import SecretRef, SecretUnavailable, resolve
from proxy.settings.secret_stores import SecretStores
from tests.conftest import Tracegate, environ, policy_yaml

INTERVAL = 0.3  # TRACEGATE_SECRET_REFRESH_SECONDS in these tests
#: How long after a rotation a new request may still carry the old key: one interval, plus the
#: read and the reload, with room for two busy cores.
FOLLOWED_WITHIN = INTERVAL + 0.6
TOKEN = "ls_token"  # the JSON field / KV field holding the key


def aws_policy(issuer_url: str, name: str) -> str:
    return policy_yaml(issuer_url).replace("{env: LS_TOKEN_PAYMENTS}", f"{{aws_secret: {name}, key: {TOKEN}}}")


def vault_policy(issuer_url: str) -> str:
    written = f"{{vault: ci/payments, key: {TOKEN}, mount: kv}}"
    return policy_yaml(issuer_url).replace("{env: LS_TOKEN_PAYMENTS}", written)


# --- the stand-ins -------------------------------------------------------------------------


class Moto:
    """moto's server on loopback: the AWS API, in this process, for boto3 and tracegate alike."""

    def __init__(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._server.stop()
            self.running = False


@pytest.fixture
def moto() -> Iterator[Moto]:
    server = Moto()
    yield server
    server.stop()


def aws_env(endpoint: str) -> dict[str, str]:
    return {
        **environ(),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": endpoint,
        "TRACEGATE_SECRET_REFRESH_SECONDS": str(INTERVAL),
        "TRACEGATE_SECRET_STORE_TIMEOUT": "2",
    }


def secretsmanager(endpoint: str) -> Any:
    return boto3.client(
        "secretsmanager",
        region_name="eu-west-1",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


class VaultStandIn:
    """Vault's HTTP API as documented, as much as tracegate reads: KV v2's
    ``GET /v1/{mount}/data/{path}`` (X-Vault-Token) answering ``{"data": {"data": …,
    "metadata": …}}``, and the Kubernetes and AppRole logins (``POST /v1/auth/{mount}/login``)
    answering ``{"auth": {"client_token": …}}``. ``sealed``: every call answers 503."""

    def __init__(self) -> None:
        self.kv: dict[tuple[str, str], dict[str, Any]] = {}
        self.versions: dict[tuple[str, str], int] = {}
        self.tokens: set[str] = {"root-token-for-tests"}
        self.logins: list[dict[str, Any]] = []
        self.kubernetes = ("tracegate", "k8s-sa-jwt")  # role, the jwt it accepts
        self.approle = ("role-id-123", "secret-id-456")
        self.sealed = False
        self.reads = 0
        app = web.Application()
        app.router.add_get("/v1/{mount}/data/{path:.+}", self._read)
        app.router.add_post("/v1/auth/{method}/login", self._login)
        self._runner = web.AppRunner(app)
        self.url = ""

    async def start(self) -> None:
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        await self._runner.cleanup()

    def put(self, mount: str, path: str, data: dict[str, Any]) -> None:
        self.kv[(mount, path)] = data
        self.versions[(mount, path)] = self.versions.get((mount, path), 0) + 1

    async def _read(self, request: web.Request) -> web.Response:
        if self.sealed:
            return web.json_response({"errors": ["Vault is sealed"]}, status=503)
        if request.headers.get("X-Vault-Token") not in self.tokens:
            return web.json_response({"errors": ["permission denied"]}, status=403)
        where = (request.match_info["mount"], request.match_info["path"])
        if where not in self.kv:
            return web.json_response({"errors": []}, status=404)
        self.reads += 1
        metadata = {"created_time": "2026-12-01T00:00:00Z", "deletion_time": "", "destroyed": False}
        body = {"data": {"data": self.kv[where], "metadata": {**metadata, "version": self.versions[where]}}}
        return web.json_response({"request_id": "r", "lease_id": "", "renewable": False, **body})

    async def _login(self, request: web.Request) -> web.Response:
        sent = await request.json()
        self.logins.append({"method": request.match_info["method"], **sent})
        method = request.match_info["method"]
        ok = (method == "kubernetes" and (sent.get("role"), sent.get("jwt")) == self.kubernetes) or (
            method == "approle" and (sent.get("role_id"), sent.get("secret_id")) == self.approle
        )
        if not ok:
            return web.json_response({"errors": ["permission denied"]}, status=403)
        token = "hvs." + secrets.token_hex(8)
        self.tokens.add(token)
        return web.json_response({"auth": {"client_token": token, "lease_duration": 3600, "renewable": True}})


@pytest.fixture
async def vault() -> AsyncIterator[VaultStandIn]:
    server = VaultStandIn()
    await server.start()
    yield server
    await server.stop()


def vault_env(vault: VaultStandIn, **more: str) -> dict[str, str]:
    env = {**environ(), "VAULT_ADDR": vault.url, "TRACEGATE_SECRET_REFRESH_SECONDS": str(INTERVAL)}
    return {**env, "VAULT_TOKEN": "root-token-for-tests", **more}


async def export(client: aiohttp.ClientSession, tg: Tracegate, token: str, body: bytes = b"x") -> int:
    headers = {"Authorization": f"Bearer {token}"}
    async with client.post(tg.url + "/v1/traces", data=body, headers=headers) as resp:
        return resp.status


async def key_becomes(client: aiohttp.ClientSession, tg: Tracegate, sink: Sink, token: str, key: str) -> float:
    """Export until the sink sees ``key``; how long that took."""
    start = time.monotonic()
    while True:
        assert await export(client, tg, token) == 200
        if sink.received[-1].headers["lightstep-access-token"] == key:
            return time.monotonic() - start
        assert time.monotonic() - start < FOLLOWED_WITHIN, "the rotated key was not followed within the interval"
        await asyncio.sleep(0.02)


# --- references ------------------------------------------------------------------------------


def test_store_references_are_checked_when_loaded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``check`` and ``explain`` read store references (without reaching a store); a malformed one
    is a problem with file:line and what is allowed."""
    arn = "arn:aws:secretsmanager:eu-central-1:123456789012:secret:tracegate/docs-AbCdEf"
    policy = policy_yaml("https://gitlab.example.com").replace(
        "{env: LS_TOKEN_PAYMENTS}", "{aws_secret: tracegate/payments, key: ls_token, region: us-east-2}"
    )
    (tmp_path / "p.yaml").write_text(policy.replace("{env: LS_TOKEN_DOCS}", f"{{aws_secret: '{arn}'}}"))
    loaded = load_policy(tmp_path, environ={}, resolve_secrets=False)
    payments, docs = loaded.service_accounts["payments-ci"], loaded.service_accounts["docs-ci"]
    assert payments.access_token_ref == SecretRef("aws_secret", "tracegate/payments", "ls_token", "us-east-2")
    assert docs.access_token_ref == SecretRef("aws_secret", arn, None, "eu-central-1")  # the ARN's region
    assert main(["check", str(tmp_path)], environ={}) == 0
    claims = tmp_path / "claims.json"
    claims_of_docs = {"iss": "https://gitlab.example.com", "aud": "tracegate", "project_path": "docs/site"}
    claims.write_text(json.dumps(claims_of_docs))
    assert main(["explain", str(tmp_path), "--claims", str(claims)], environ={}) == 0
    assert f"key from {{aws_secret: {arn}, region: eu-central-1}}" in capsys.readouterr().out

    vault = "{vault: ci/lightstep, key: token, mount: kv-ci}"
    (tmp_path / "p.yaml").write_text(policy.replace("{env: LS_TOKEN_DOCS}", vault))
    docs = load_policy(tmp_path, environ={}, resolve_secrets=False).service_accounts["docs-ci"]
    assert docs.access_token_ref == SecretRef("vault", "ci/lightstep", "token", mount="kv-ci")
    assert str(docs.access_token_ref) == vault

    for written, problem in [
        ("{vault: ci/lightstep}", "{vault: …} needs key: FIELD"),
        ("{vault: ci/../sys/raw, key: token}", "{vault: …}'s path must be segments"),
        ("{aws_secret: tracegate/docs, version: 2}", "unknown key 'version' in {aws_secret: …}; allowed: key, region"),
        ("{aws_secret: tracegate/docs, region: Mars}", "region 'Mars' is not an AWS region name"),
        (f"{{aws_secret: '{arn}', region: us-east-1}}", "contradicts the ARN's region eu-central-1"),
        ("{aws_secret: 'arn:aws:s3:::bucket'}", "must be a Secrets Manager ARN"),
        ("{aws_secret: tracegate/docs, key: ''}", "{aws_secret: …}'s key must be a non-empty string"),
        ("{env: LS_TOKEN_DOCS, key: x}", "must be exactly one of {env: NAME} or {file: /path}"),
    ]:
        (tmp_path / "p.yaml").write_text(policy.replace("{env: LS_TOKEN_DOCS}", written))
        with pytest.raises(PolicyLoadError) as info:
            load_policy(tmp_path, environ={}, resolve_secrets=False)
        assert "p.yaml:10: service account 'docs-ci'.access_token must be exactly one of" in str(info.value)
        assert problem in str(info.value), written

    with pytest.raises(SecretUnavailable, match="kept in a secret store"):  # only a running tracegate reads one
        resolve(SecretRef("vault", "ci/x", "token"), {})


def test_store_settings_are_checked_and_refreshes_come_early_not_late() -> None:
    with pytest.raises(ConfigError, match=r"TRACEGATE_VAULT_AUTH='ldap': expected one of token, kubernetes, approle"):
        SecretStores({"TRACEGATE_VAULT_AUTH": "ldap"})
    with pytest.raises(ConfigError, match="TRACEGATE_VAULT_AUTH=approle needs TRACEGATE_VAULT_SECRET_ID"):
        SecretStores({"TRACEGATE_VAULT_AUTH": "approle", "TRACEGATE_VAULT_ROLE": "r"})
    with pytest.raises(ConfigError, match="TRACEGATE_SECRET_REFRESH_SECONDS='-1': must be 0 or more"):
        SecretStores({"TRACEGATE_SECRET_REFRESH_SECONDS": "-1"})
    stores = SecretStores({"TRACEGATE_SECRET_REFRESH_SECONDS": "60"})
    delays = [stores.next_delay() for _ in range(500)]
    assert 54 <= min(delays) < 55.5 and 59 < max(delays) <= 60  # jittered, within one interval
    assert SecretStores({}).settings.refresh == 300


# --- AWS Secrets Manager (moto) ----------------------------------------------------------------


async def test_aws_secret_is_followed_as_it_rotates_and_kept_through_an_outage(
    start_tracegate: Any,
    issuer: StandInIssuer,
    sink: Sink,
    moto: Moto,
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = f"tracegate/payments-{secrets.token_hex(4)}"
    first, second = "ls-aws-key-" + secrets.token_hex(8), "ls-aws-key-" + secrets.token_hex(8)
    store = secretsmanager(moto.url)
    store.create_secret(Name=name, SecretString=json.dumps({TOKEN: first, "note": "other fields are ignored"}))
    tg: Tracegate = await start_tracegate(aws_policy(issuer.url, name), env=aws_env(moto.url))
    await tg.keys_ready()
    token = issuer.mint(project_path="payments/api", ref_protected="true")
    async with aiohttp.ClientSession() as client:
        assert await export(client, tg, token) == 200
        assert sink.received[-1].headers["lightstep-access-token"] == first

        store.put_secret_value(SecretId=name, SecretString=json.dumps({TOKEN: second}))  # rotated
        await key_becomes(client, tg, sink, token, second)
        assert tg.metric("tracegate_secret_reads_total", kind="aws_secret", result="changed") == 1
        assert not any(first in r.getMessage() for r in caplog.records)

        moto.stop()  # the store is down: the last good key keeps serving
        caplog.clear()
        await asyncio.sleep(4 * INTERVAL + 1)
        for _ in range(3):
            assert await export(client, tg, token) == 200
            assert sink.received[-1].headers["lightstep-access-token"] == second
        age = tg.metric("tracegate_secret_age_seconds", kind="aws_secret", service_account="payments-ci")
        assert age > 2 * INTERVAL
        assert tg.metric("tracegate_secret_reads_total", kind="aws_secret", result="failed") >= 1
        stale = [r.getMessage() for r in caplog.records if "keeps serving" in r.getMessage()]
        assert stale and stale[-1].startswith(
            f"{{aws_secret: {name}, key: {TOKEN}}} could not be read from AWS Secrets Manager "
            "(EndpointConnectionError); its last good value, read "
        )
        async with client.get(tg.admin_url + "/metrics") as resp:
            scraped = await resp.text()
    assert "tracegate_secret_age_seconds{" in scraped
    for private in (name, first, second):  # no secret name as a label, no value anywhere
        assert private not in scraped
    assert not any(second in r.getMessage() for r in caplog.records)


async def test_a_start_without_the_aws_secret_is_one_clear_line(tmp_path: Path, issuer: StandInIssuer) -> None:
    """Nothing listens where the store should be: ``tracegate serve`` exits 2 with one line that
    names the reference and the cause."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(aws_policy(issuer.url, "tracegate/payments"))
    env = {**os.environ, **aws_env(f"http://127.0.0.1:{free_port()}"), "TRACEGATE_DATA_DIR": str(tmp_path / "d")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--policies",
        str(policies),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert len(lines) == 1, err.decode()
    assert lines[0].startswith(f"tracegate: TRACEGATE_POLICIES={policies}: the policy did not load, 1 problem(s): ")
    assert (
        f"p.yaml:8: service account 'payments-ci'.access_token: {{aws_secret: tracegate/payments, key: {TOKEN}}} "
        "could not be read from AWS Secrets Manager (EndpointConnectionError)"
    ) in lines[0]


# --- Vault (KV v2 stand-in, through hvac) ------------------------------------------------------


async def test_vault_rotation_under_load_fails_no_request_and_drops_the_old_key(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, vault: VaultStandIn
) -> None:
    """Eight exporters send without pause while the key rotates: every export succeeds, and
    none sent after the interval carries the old key."""
    old, new = "ls-vault-old-" + secrets.token_hex(6), "ls-vault-new-" + secrets.token_hex(6)
    vault.put("kv", "ci/payments", {TOKEN: old, "other": "x"})
    tg: Tracegate = await start_tracegate(vault_policy(issuer.url), env=vault_env(vault))
    await tg.keys_ready()
    token = issuer.mint(project_path="payments/api", ref_protected="true")
    sent: dict[bytes, float] = {}  # body -> when it was sent
    statuses: list[int] = []
    stop = asyncio.Event()

    async def exporter(n: int, client: aiohttp.ClientSession) -> None:
        k = 0
        while not stop.is_set():
            body = f"{n}-{k}".encode()
            k += 1
            sent[body] = time.monotonic()
            statuses.append(await export(client, tg, token, body))

    async with aiohttp.ClientSession() as client:
        workers = [asyncio.create_task(exporter(n, client)) for n in range(8)]
        await asyncio.sleep(0.5)
        vault.put("kv", "ci/payments", {TOKEN: new, "other": "x"})
        rotated = time.monotonic()
        await asyncio.sleep(FOLLOWED_WITHIN + 0.7)
        stop.set()
        await asyncio.gather(*workers)
    assert statuses and set(statuses) == {200}
    keys = {r.body: r.headers["lightstep-access-token"] for r in sink.received}
    assert len(keys) == len(statuses)
    late = [body for body, at in sent.items() if at > rotated + FOLLOWED_WITHIN]
    assert len(late) > 20
    assert {keys[body] for body in late} == {new}
    assert {keys[body] for body, at in sent.items() if at < rotated} == {old}


async def test_vault_outage_keeps_the_last_key_and_a_start_without_it_fails(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, vault: VaultStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    key = "ls-vault-" + secrets.token_hex(8)
    with pytest.raises(PolicyLoadError) as info:  # nothing at kv/ci/payments yet
        await start_tracegate(vault_policy(issuer.url), env=vault_env(vault))
    assert (
        "service account 'payments-ci'.access_token: {vault: ci/payments, key: ls_token, mount: kv} could not be "
        "read from Vault (no such secret (or its version is deleted)); set it or fix the reference"
    ) in str(info.value)

    vault.put("kv", "ci/payments", {TOKEN: key})
    tg: Tracegate = await start_tracegate(vault_policy(issuer.url), env=vault_env(vault))
    await tg.keys_ready()
    token = issuer.mint(project_path="payments/api", ref_protected="true")
    vault.sealed = True
    caplog.set_level(logging.WARNING)
    await asyncio.sleep(3 * INTERVAL + 0.3)
    async with aiohttp.ClientSession() as client:
        assert await export(client, tg, token) == 200
    assert sink.received[-1].headers["lightstep-access-token"] == key
    assert tg.metric("tracegate_secret_age_seconds", kind="vault", service_account="payments-ci") > 2 * INTERVAL
    stale = [r.getMessage() for r in caplog.records if "keeps serving" in r.getMessage()]
    assert stale[-1].startswith(
        "{vault: ci/payments, key: ls_token, mount: kv} could not be read from Vault (VaultDown); its last good value"
    )

    assert await tg.runtime.reload()  # a reload in the outage keeps the last good value too
    vault.sealed = False
    await asyncio.sleep(2 * INTERVAL + 0.3)
    assert tg.metric("tracegate_secret_age_seconds", kind="vault", service_account="payments-ci") < 2 * INTERVAL


@pytest.mark.parametrize("method", ["kubernetes", "approle"])
async def test_vault_login_by_kubernetes_or_approle_and_again_when_refused(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, vault: VaultStandIn, tmp_path: Path, method: str
) -> None:
    """The pod's service-account token (or an AppRole) buys a Vault token; a token Vault
    stops honouring (expired, revoked) is replaced by a new login, and rotation goes on."""
    jwt, secret_id = tmp_path / "sa-token", tmp_path / "secret-id"
    jwt.write_text(vault.kubernetes[1])
    secret_id.write_text(vault.approle[1] + "\n")
    settings = {
        "kubernetes": {"TRACEGATE_VAULT_ROLE": vault.kubernetes[0], "TRACEGATE_VAULT_KUBERNETES_TOKEN": str(jwt)},
        "approle": {"TRACEGATE_VAULT_ROLE": vault.approle[0], "TRACEGATE_VAULT_SECRET_ID": f"file:{secret_id}"},
    }[method]
    env = vault_env(vault, TRACEGATE_VAULT_AUTH=method, **settings)
    del env["VAULT_TOKEN"]
    first, second = "ls-vault-" + secrets.token_hex(8), "ls-vault-" + secrets.token_hex(8)
    vault.put("kv", "ci/payments", {TOKEN: first})
    tg: Tracegate = await start_tracegate(vault_policy(issuer.url), env=env)
    await tg.keys_ready()
    assert [login["method"] for login in vault.logins] == [method]
    token = issuer.mint(project_path="payments/api", ref_protected="true")
    async with aiohttp.ClientSession() as client:
        assert await export(client, tg, token) == 200
        assert sink.received[-1].headers["lightstep-access-token"] == first
        vault.tokens = {"root-token-for-tests"}  # every login's token revoked
        vault.put("kv", "ci/payments", {TOKEN: second})
        await key_becomes(client, tg, sink, token, second)
    assert [login["method"] for login in vault.logins] == [method, method]
