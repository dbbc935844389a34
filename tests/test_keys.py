"""Issuer keys: start without the issuer, garbage documents, foreign jwks_uri, several
issuers, caching of verified tokens."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from proxy.dev.standins import StandInIssuer
from proxy.identity.keys import MAX_DOCUMENT_BYTES, cache_seconds
from tests.conftest import DOCS_KEY, PAYMENTS_KEY, Sink, policy_yaml


async def post(client: aiohttp.ClientSession, url: str, token: str) -> aiohttp.ClientResponse:
    async with client.post(url + "/v1/traces", data=b"", headers={"Authorization": f"Bearer {token}"}) as resp:
        await resp.read()
        return resp


async def test_starts_and_serves_with_issuer_down_then_keys_arrive(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    issuer.available = False
    tg = await start_tracegate(policy_yaml(issuer.url), jwks_min_refetch="0.05")
    async with client.get(tg.admin_url + "/readyz") as resp:
        assert resp.status == 503  # no issuer has keys: every token would get 503
        assert await resp.json() == {
            "ready": False,
            "reason": "waiting-for-issuer-keys",
            "listeners": {"http": True},
            "issuers_without_keys": ["gitlab"],
        }
    resp = await post(client, tg.url, issuer.mint())
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "5"
    assert sink.received == []
    issuer.available = True
    await asyncio.sleep(0.1)
    resp = await post(client, tg.url, issuer.mint())
    assert resp.status == 200
    assert tg.metric("tracegate_jwks_fetches_total", issuer="gitlab", result="http-error") >= 1
    async with client.get(tg.admin_url + "/readyz") as resp:
        assert (resp.status, (await resp.json())["ready"]) == (200, True)


async def test_readiness_waits_for_keys_only_for_the_start_up_grace(
    start_tracegate: Any, issuer: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    issuer.available = False
    tg = await start_tracegate(policy_yaml(issuer.url), ready_grace="0.3")
    async with client.get(tg.admin_url + "/readyz") as resp:
        assert resp.status == 503
    await asyncio.sleep(0.4)
    async with client.get(tg.admin_url + "/readyz") as resp:
        # Past the grace: ready, so that webhooks are served through the issuer's outage,
        # and the body still says which issuer has no keys.
        assert resp.status == 200
        assert (await resp.json())["issuers_without_keys"] == ["gitlab"]


async def test_garbage_empty_and_huge_jwks_keep_the_last_good_keys(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    tg = await start_tracegate(policy_yaml(issuer.url), jwks_min_refetch="0.01")
    await tg.keys_ready()
    good = issuer.mint()
    for body, result in (
        (b"<html>oops</html>", "bad-document"),
        (json.dumps({"keys": []}).encode(), "empty"),
        (json.dumps({"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}).encode(), "empty"),
        (b"{" + b'"a":1,' * (MAX_DOCUMENT_BYTES // 6 + 10) + b'"keys": []}', "too-large"),
    ):
        issuer.jwks_body = body
        await asyncio.sleep(0.02)
        # An unknown kid forces a refetch, which fails; the old keys stay in use.
        assert (await post(client, tg.url, issuer.mint(headers={"kid": "rotated?"}))).status == 401
        assert tg.metric("tracegate_jwks_fetches_total", issuer="gitlab", result=result) >= 1
        assert (await post(client, tg.url, good)).status == 200


async def test_discovery_pointing_jwks_uri_at_another_host_is_refused(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    other = StandInIssuer()
    await other.start()
    try:
        issuer.jwks_uri_override = other.url + "/oauth/discovery/keys"
        tg = await start_tracegate(policy_yaml(issuer.url))
        for _ in range(50):
            if tg.metric("tracegate_jwks_fetches_total", issuer="gitlab", result="discovery-foreign-jwks-uri"):
                break
            await asyncio.sleep(0.02)
        assert tg.metric("tracegate_jwks_fetches_total", issuer="gitlab", result="discovery-foreign-jwks-uri") >= 1
        assert other.jwks_fetches == 0
        assert (await post(client, tg.url, issuer.mint())).status == 503
    finally:
        await other.stop()


async def test_explicit_jwks_uri_is_trusted_as_configured(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    policy = policy_yaml(issuer.url).replace(
        "algorithms: [RS256, ES256]", f"algorithms: [RS256, ES256]\n    jwks_uri: {issuer.url}/oauth/discovery/keys"
    )
    tg = await start_tracegate(policy)
    await tg.keys_ready()
    assert issuer.discovery_fetches == 0
    assert (await post(client, tg.url, issuer.mint())).status == 200


async def test_two_issuers_side_by_side(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    second = StandInIssuer()
    await second.start()
    try:
        extra = f"""
  gitlab-com:
    issuer: {second.url}
    audiences: [https://tracegate.example.com]
"""
        policy = policy_yaml(issuer.url).replace("service_accounts:", extra.lstrip("\n") + "service_accounts:", 1)
        policy = (
            policy.replace("issuers:\n", "issuers:\n", 1)
            + """\
  - name: docs-from-com
    issuer: gitlab-com
    when: {project_path: "docs/site"}
    service_account: docs-ci
"""
        )
        tg = await start_tracegate(policy)
        await tg.keys_ready()
        assert (await post(client, tg.url, issuer.mint())).status == 200
        com = second.mint(project_path="docs/site", aud="https://tracegate.example.com")
        assert (await post(client, tg.url, com)).status == 200
        # A token from one issuer, signed by the other's key, fails.
        forged = second.mint(iss=issuer.url)
        assert (await post(client, tg.url, forged)).status == 401
        keys = [r.headers["lightstep-access-token"] for r in sink.received]
        assert keys == [PAYMENTS_KEY, DOCS_KEY]
    finally:
        await second.stop()


async def test_verified_token_is_cached_until_exp(
    tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    token = issuer.mint()
    for _ in range(5):
        assert (await post(client, tracegate.url, token)).status == 200
    assert tracegate.metric("tracegate_token_cache_total", result="miss") == 1
    assert tracegate.metric("tracegate_token_cache_total", result="hit") == 4


def test_cache_control_is_bounded() -> None:
    assert cache_seconds(None) == 300
    assert cache_seconds("max-age=5") == 60
    assert cache_seconds("public, max-age=3600") == 3600
    assert cache_seconds("max-age=99999999") == 86400
    assert cache_seconds("no-store") == 60
