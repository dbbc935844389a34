"""Random, hostile requests against every endpoint of the ingest listener: whatever
arrives, the answer is a deliberate status (never 500), nothing reaches the upstream
without a valid token, and nothing is logged as an unhandled error (the suite-wide check
in conftest fails the test if it is). Seeded, so a failure replays."""

from __future__ import annotations

import io
import json
import random
from typing import Any

import aiohttp

from proxy.dev.standins import Sink, StandInIssuer
from tests import gitea_payloads as g
from tests.conftest import Tracegate, environ, policy_yaml
from tests.test_hardening import GLOB_SECRET, GLOB_WEBHOOKS

PATHS = ("/v1/traces", "/v1/metrics", "/v1/logs", "/v1/deployments", "/webhooks/gitea", "/nowhere")
CONTENT_TYPES = (
    "application/json",
    "application/x-protobuf",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "text/plain; charset=klingon",
    "application/json; charset=utf-16",
    "",
)


def _body(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 4096))
    if kind == 1:
        return b"&".join(b"f%d=%d" % (i, i) for i in range(rng.randrange(1, 200)))
    if kind == 2:
        return b"payload=" + json.dumps(g.push()).encode()
    if kind == 3:
        return json.dumps([1] * rng.randrange(100)).encode()
    if kind == 4:
        return b"[" * rng.randrange(1, 50_000)
    if kind == 5:
        payload: Any = g.push(repo="payments/" + "x" * rng.randrange(300))
        payload["repository"][rng.choice(["html_url", "name", "owner", "full_name"])] = rng.choice(
            [None, 7, [], {}, "payments/api", "https://evil.example/x", "\x00\n"]
        )
        return json.dumps(payload).encode()
    if kind == 6:
        return b'{"service": ' + rng.choice([b"[]", b"{}", b"NaN", b"1e999", b'"payments-api"']) + b"}"
    return "ü\u2028\ud7ff".encode() * rng.randrange(10)


def _headers(rng: random.Random, issuer: StandInIssuer, body: bytes) -> dict[str, str]:
    headers = {"Content-Type": rng.choice(CONTENT_TYPES)}
    if rng.random() < 0.5:
        headers.update(g.gitea_headers("push", body, rng.choice([GLOB_SECRET, "wrong", None])))
        if rng.random() < 0.3:
            headers.pop(rng.choice(list(headers)))
    credential = rng.randrange(6)
    if credential == 1:
        headers["Authorization"] = "Bearer " + issuer.mint(project_path="payments/api", sha="a" * 40)
    elif credential == 2:
        headers["Authorization"] = rng.choice(["Basic x", "Bearer", "Bearer a.b.c", "Bearer " + "x." * 3000])
    elif credential == 3:
        headers["lightstep-access-token"] = rng.choice(["not-a-jwt", issuer.mint(exp=None, project_path="p/q")])
    elif credential == 4:
        headers["Authorization"] = "Bearer " + issuer.mint(iat="yesterday", project_path="payments/api")
    return headers


async def test_random_requests_never_get_a_500(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    tg: Tracegate = await start_tracegate(
        policy_yaml(issuer.url, GLOB_WEBHOOKS), env={**environ(), "GLOB_SECRET": GLOB_SECRET}
    )
    await tg.keys_ready()
    rng = random.Random(8)
    statuses: dict[int, int] = {}
    for _ in range(400):
        body = _body(rng)
        path = rng.choice(PATHS)
        query = rng.choice(["", "?token=a.b.c", "?x=%ff%00", "?" + "a=b&" * 50])
        headers = _headers(rng, issuer, body)
        async with client.post(tg.url + path + query, data=io.BytesIO(body), headers=headers) as resp:
            await resp.read()
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            assert resp.status < 500 or resp.status in (502, 503, 504), (path, headers, body[:200])
    assert tg.metric("tracegate_unhandled_errors_total") == 0
    assert len(statuses) >= 5, statuses  # the generator reached many different answers, not one path
