"""``--workers N``: one admin port per pod whose ``/metrics`` sums every worker's samples,
whichever worker the scrape lands on (prometheus-client's multiprocess mode)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.dev.standins import Sink, StandInIssuer
from tests.conftest import PAYMENTS_KEY, policy_yaml
from tests.test_process import spawn


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


async def scrape(admin: str) -> str:
    async with aiohttp.ClientSession() as client, client.get(admin + "/metrics") as resp:  # a new connection
        assert resp.status == 200
        return await resp.text()


async def test_two_workers_one_metrics_endpoint_summing_both(tmp_path: Path, issuer: StandInIssuer, sink: Sink) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "main.yaml").write_text(policy_yaml(issuer.url))
    env = {
        "LS_TOKEN_PAYMENTS": PAYMENTS_KEY,
        "LS_TOKEN_DOCS": "ls-key-docs",
        "TRACEGATE_WORKERS": "2",
        "TRACEGATE_UPSTREAM_PATH_TRACES": "/v1/traces",
        "TRACEGATE_DATA_DIR": str(tmp_path / "data"),
    }
    process, url, admin = await spawn(policies, env, sink.url)
    try:
        # Each worker fetches the issuer's keys once at start: the pod's sum is 2 on any scrape.
        deadline = time.monotonic() + 10
        while True:
            fetched = samples(await scrape(admin), "tracegate_jwks_fetches_total")
            if fetched.get((("issuer", "gitlab"), ("result", "ok"))) == 2:
                break
            assert time.monotonic() < deadline, fetched
            await asyncio.sleep(0.1)
        token = issuer.mint()
        for _ in range(20):
            async with (
                aiohttp.ClientSession() as client,  # new connections: the kernel spreads them
                client.post(url + "/v1/traces", data=b"x", headers={"Authorization": f"Bearer {token}"}) as resp,
            ):
                assert resp.status == 200
        for _ in range(8):  # whichever worker answers the scrape, it reports the whole pod
            text = await scrape(admin)
            allowed = sum(
                v
                for labels, v in samples(text, "tracegate_requests_total").items()
                if ("decision", "allowed") in labels
            )
            assert allowed == 20
            assert samples(text, "tracegate_jwks_fetches_total")[(("issuer", "gitlab"), ("result", "ok"))] == 2
            assert samples(text, "tracegate_policy_loaded") == {(): 1.0}  # merged, not one per worker
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
    assert process.returncode == 0
    assert len(sink.received) == 20
