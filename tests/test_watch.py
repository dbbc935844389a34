"""Files that change on disk the way Kubernetes changes a mounted Secret or ConfigMap (new
hidden directory, ``..data`` symlink swapped in one rename) are reloaded with no signal and
no restart: the next request uses the new key; a broken update keeps the old policy."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp

from proxy.dev.standins import Sink, StandInIssuer
from tests.conftest import DOCS_KEY, Tracegate, environ, policy_yaml

NEW_DOCS_KEY = "ls-key-docs-rotated-00112233"


class Mounted:
    """A directory as the kubelet keeps a volume: ``..<version>/`` holds the files,
    ``..data`` points at the current version, each visible name links through ``..data``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.version = 0

    def publish(self, files: dict[str, str]) -> None:
        self.version += 1
        fresh = self.root / f"..2026_11_22_{self.version:02d}"
        fresh.mkdir()
        for name, text in files.items():
            (fresh / name).write_text(text)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        os.symlink(fresh.name, self.root / "..data_tmp")
        os.rename(self.root / "..data_tmp", self.root / "..data")  # the atomic swap
        for name in files:
            if not (self.root / name).is_symlink():
                os.symlink(f"..data/{name}", self.root / name)
        if old is not None:
            for stale in (self.root / old).iterdir():
                stale.unlink()
            (self.root / old).rmdir()


async def send(client: aiohttp.ClientSession, tg: Tracegate, token: str) -> int:
    async with client.post(tg.url + "/v1/traces", data=b"x", headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status


async def until(tg: Tracegate, name: str, value: float, timeout: float = 10.0, **labels: str) -> None:
    deadline = time.monotonic() + timeout
    while tg.metric(name, **labels) < value:
        assert time.monotonic() < deadline, f"{name}{labels} never reached {value}"
        await asyncio.sleep(0.05)


async def test_rotated_secret_and_policy_swaps_reload_without_a_signal(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, tmp_path: Path
) -> None:
    secrets = Mounted(tmp_path / "secrets")
    secrets.publish({"docs-key": DOCS_KEY + "\n"})
    policies = Mounted(tmp_path / "policies-mount")
    good = policy_yaml(issuer.url).replace("{env: LS_TOKEN_DOCS}", f"{{file: {secrets.root / 'docs-key'}}}")
    policies.publish({"main.yaml": good})
    tg: Tracegate = await start_tracegate(good, env=environ(), policies=str(policies.root), watch_interval="0.1")
    await tg.keys_ready()
    token = issuer.mint(project_path="docs/site")
    async with aiohttp.ClientSession() as client:
        assert await send(client, tg, token) == 200
        assert sink.received[-1].headers["lightstep-access-token"] == DOCS_KEY

        secrets.publish({"docs-key": NEW_DOCS_KEY + "\n"})  # the Secret is rotated
        await until(tg, "tracegate_policy_loads_total", 2, result="ok")
        assert await send(client, tg, token) == 200
        assert sink.received[-1].headers["lightstep-access-token"] == NEW_DOCS_KEY

        policies.publish({"main.yaml": good + "\nrules: [\n"})  # a broken ConfigMap update
        await until(tg, "tracegate_policy_loads_total", 1, result="failed")
        assert tg.metric("tracegate_policy_loaded") == 0
        assert await send(client, tg, token) == 200  # the last good policy keeps serving
        assert sink.received[-1].headers["lightstep-access-token"] == NEW_DOCS_KEY
        await asyncio.sleep(0.5)  # not retried while the files stay as they are
        assert tg.metric("tracegate_policy_loads_total", result="failed") == 1

        policies.publish({"main.yaml": good.replace('["docs/site", "docs/handbook"]', '["docs/handbook"]')})
        await until(tg, "tracegate_policy_loads_total", 3, result="ok")
        assert await send(client, tg, token) == 403

        policies.publish({"main.yaml": good})  # a change that SIGHUP reloads first: read once, not twice
        assert await tg.runtime.reload()
        await asyncio.sleep(0.5)
        assert await send(client, tg, token) == 200
    assert tg.metric("tracegate_policy_loads_total", result="ok") == 4


def self_signed(common_name: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, PEM."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


async def served_certificate_name(url: str) -> str:
    import ssl

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    host, port = url.removeprefix("https://").split(":")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we only read which certificate is served
    _, writer = await asyncio.open_connection(host, int(port), ssl=context)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        await writer.wait_closed()
    return str(x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


async def test_a_rotated_tls_secret_is_served_to_new_connections(
    start_tracegate: Any, issuer: StandInIssuer, tmp_path: Path
) -> None:
    tls = Mounted(tmp_path / "tls")
    cert, key = self_signed("first")
    tls.publish({"tls.crt": cert, "tls.key": key})
    tg: Tracegate = await start_tracegate(
        policy_yaml(issuer.url),
        tls_cert=str(tls.root / "tls.crt"),
        tls_key=str(tls.root / "tls.key"),
        watch_interval="0.1",
    )
    url = tg.url.replace("http://", "https://")
    assert await served_certificate_name(url) == "first"
    cert, key = self_signed("second")
    tls.publish({"tls.crt": cert, "tls.key": key})  # cert-manager renews the Secret
    await until(tg, "tracegate_tls_reloads_total", 1, result="ok")
    assert await served_certificate_name(url) == "second"
