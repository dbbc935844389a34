"""Every bad credential, body or decision is refused, reaches nothing upstream, and leaves
no token or key in the logs. Each case asserts the status, the google.rpc.Status body in
the request's encoding, the reason code in the audit log, and an empty sink."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import time
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from google.rpc import status_pb2

from proxy.dev.standins import StandInIssuer, gitlab_claims
from tests.conftest import Sink, Tracegate, assert_no_secrets


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    return signing_input + "." + b64(signature)


def hs256_with_public_key(issuer: StandInIssuer) -> str:
    """The classic algorithm-confusion attack: HMAC keyed with the issuer's public key."""
    pem = issuer.rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": issuer.rsa_kid}
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(gitlab_claims(issuer.url)).encode())
    return signing_input + "." + b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())


def bad_signature(issuer: StandInIssuer) -> str:
    head, payload, sig = issuer.mint().split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["project_path"] = "payments/api-admin"
    return f"{head}.{b64(json.dumps(forged).encode())}.{sig}"


# name -> (headers builder, expected status, expected reason)
CASES: dict[str, tuple[Any, int, str]] = {
    "no-token": (lambda i: {}, 401, "missing-token"),
    "garbage": (lambda i: {"Authorization": "Bearer not-a-jwt"}, 401, "malformed-token"),
    "garbage-segments": (lambda i: {"Authorization": "Bearer aaa.bbb.ccc"}, 401, "malformed-token"),
    "basic-auth": (lambda i: {"Authorization": "Basic dXNlcjpwYXNz"}, 401, "unsupported-auth-scheme"),
    "alg-none": (
        lambda i: {"Authorization": "Bearer " + unsigned({"alg": "none", "kid": i.rsa_kid}, gitlab_claims(i.url))},
        401,
        "algorithm-not-allowed",
    ),
    "hs256-public-key": (
        lambda i: {"Authorization": "Bearer " + hs256_with_public_key(i)},
        401,
        "algorithm-not-allowed",
    ),
    "bad-signature": (lambda i: {"Authorization": "Bearer " + bad_signature(i)}, 401, "bad-signature"),
    "expired": (
        lambda i: {"Authorization": "Bearer " + i.mint(exp=int(time.time()) - 120, iat=int(time.time()) - 600)},
        401,
        "token-expired",
    ),
    "nbf-future": (
        lambda i: {"Authorization": "Bearer " + i.mint(nbf=int(time.time()) + 600)},
        401,
        "token-not-yet-valid",
    ),
    "iat-future": (
        lambda i: {"Authorization": "Bearer " + i.mint(iat=int(time.time()) + 600)},
        401,
        "token-issued-in-future",
    ),
    "wrong-iss": (
        lambda i: {"Authorization": "Bearer " + i.mint(iss="https://gitlab.evil.example")},
        401,
        "unknown-issuer",
    ),
    "iss-trailing-slash": (lambda i: {"Authorization": "Bearer " + i.mint(iss=i.url + "/")}, 401, "unknown-issuer"),
    "wrong-aud": (
        lambda i: {"Authorization": "Bearer " + i.mint(aud="https://other.example")},
        401,
        "audience-mismatch",
    ),
    "aud-list-without-ours": (
        lambda i: {"Authorization": "Bearer " + i.mint(aud=["a", "b"])},
        401,
        "audience-mismatch",
    ),
    "no-exp": (lambda i: {"Authorization": "Bearer " + i.mint(exp=None)}, 401, "missing-claim"),
    "unknown-kid": (lambda i: {"Authorization": "Bearer " + i.mint(headers={"kid": "nope"})}, 401, "unknown-kid"),
    "no-kid": (lambda i: {"Authorization": "Bearer " + i.mint(headers={"kid": None})}, 401, "missing-kid"),
    "es-token-rs-kid": (
        lambda i: {"Authorization": "Bearer " + i.mint(alg="ES256", headers={"kid": i.rsa_kid})},
        401,
        "key-algorithm-mismatch",
    ),
    "two-different-tokens": (
        lambda i: {"Authorization": "Bearer " + i.mint(), "lightstep-access-token": i.mint(job_id="2")},
        401,
        "conflicting-tokens",
    ),
    "two-authorization-headers": (
        lambda i: [("Authorization", "Bearer " + i.mint()), ("Authorization", "Bearer " + i.mint(job_id="3"))],
        401,
        "conflicting-tokens",
    ),
    "token-in-query": (lambda i: {"Authorization": "Bearer " + i.mint()}, 401, "token-in-query"),
    "deny-rule": (
        lambda i: {"Authorization": "Bearer " + i.mint(project_path="payments/forks/api")},
        403,
        "rule-denied",
    ),
    "no-rule": (lambda i: {"Authorization": "Bearer " + i.mint(project_path="marketing/site")}, 403, "no-rule-matched"),
    "unprotected-ref": (lambda i: {"Authorization": "Bearer " + i.mint(ref_protected="false")}, 403, "no-rule-matched"),
    "missing-claim-never-matches": (
        lambda i: {"Authorization": "Bearer " + i.mint(ref_protected=None)},
        403,
        "no-rule-matched",
    ),
    "signal-not-allowed": (
        lambda i: {"Authorization": "Bearer " + i.mint(project_path="docs/site")},
        403,
        "signal-not-allowed",
    ),
}


@pytest.mark.parametrize("content_type", ["application/x-protobuf", "application/json"])
@pytest.mark.parametrize("case", sorted(CASES))
async def test_refused(
    case: str,
    content_type: str,
    tracegate: Tracegate,
    issuer: StandInIssuer,
    sink: Sink,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    build, status, reason = CASES[case]
    headers = build(issuer)
    pairs = list(headers.items()) if isinstance(headers, dict) else headers
    pairs.append(("Content-Type", content_type))
    signal = "metrics" if case == "signal-not-allowed" else "traces"
    url = tracegate.url + f"/v1/{signal}"
    if case == "token-in-query":
        url += "?access_token=" + issuer.mint(job_id="4")
    async with client.post(url, data=b"\x0a\x00", headers=pairs) as resp:
        assert resp.status == status
        body = await resp.read()
        assert resp.headers["Content-Type"] == content_type
        if status == 401:
            assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    if content_type == "application/json":
        answer = json.loads(body)
        assert answer["code"] == (16 if status == 401 else 7)
        message = answer["message"]
    else:
        decoded = status_pb2.Status.FromString(body)
        assert decoded.code == (16 if status == 401 else 7)
        message = decoded.message
    assert reason not in message  # the client gets a generic message; the reason is ours
    assert sink.received == []
    audit = tracegate.audit()
    assert audit[-1]["reason"] == reason
    decision = "refused" if status == 401 else "denied"
    assert (
        tracegate.metric(
            "tracegate_requests_total",
            signal=signal,
            service_account=audit[-1]["service_account"] or "",
            decision=decision,
            reason=reason,
            transport="http",
        )
        == 1
    )
    tokens = [v.split(" ")[-1] for _, v in pairs]
    assert_no_secrets(caplog.text + "".join(tracegate.audit_lines) + body.decode("latin-1"), *tokens)


async def test_oversized_body_declared_is_413_before_upstream(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    from tests.conftest import policy_yaml

    tg = await start_tracegate(policy_yaml(issuer.url), max_body="1000")
    await tg.keys_ready()
    async with client.post(
        tg.url + "/v1/traces", data=b"x" * 1001, headers={"Authorization": f"Bearer {issuer.mint()}"}
    ) as resp:
        assert resp.status == 413
        assert status_pb2.Status.FromString(await resp.read()).code == 8
    assert sink.received == []
    async with client.post(
        tg.url + "/v1/traces", data=b"x" * 1000, headers={"Authorization": f"Bearer {issuer.mint()}"}
    ) as resp:
        assert resp.status == 200


async def test_oversized_chunked_body_is_413_and_upstream_gets_no_complete_request(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    from tests.conftest import policy_yaml

    tg = await start_tracegate(policy_yaml(issuer.url), max_body="100000")

    async def body() -> Any:
        for _ in range(20):
            yield b"x" * 10000

    await tg.keys_ready()
    async with client.post(
        tg.url + "/v1/traces", data=body(), headers={"Authorization": f"Bearer {issuer.mint()}"}
    ) as resp:
        assert resp.status == 413
    assert sink.received == []


async def test_thousand_random_kids_cost_a_bounded_number_of_fetches(
    tracegate: Tracegate, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    before = issuer.jwks_fetches
    rng = random.Random(7)
    statuses = []
    for _ in range(1000):
        token = issuer.mint(headers={"kid": f"kid-{rng.getrandbits(64):x}"})
        async with client.post(
            tracegate.url + "/v1/traces", data=b"", headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            statuses.append(resp.status)
    assert set(statuses) == {401}
    # min refetch interval is 30 s by default: the first unknown kid may refetch, no more.
    assert issuer.jwks_fetches - before <= 1
    assert sink.received == []
    # A valid token still works afterwards: the last good keys stayed in use.
    async with client.post(
        tracegate.url + "/v1/traces", data=b"", headers={"Authorization": f"Bearer {issuer.mint()}"}
    ) as resp:
        assert resp.status == 200


async def test_key_rotation_is_picked_up_by_one_refetch(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    from tests.conftest import policy_yaml

    tg = await start_tracegate(policy_yaml(issuer.url), jwks_min_refetch="0.05")
    await tg.keys_ready()
    issuer.rotate()
    await asyncio.sleep(0.1)  # past the 50 ms refetch interval since the start-up fetch
    before = issuer.jwks_fetches
    async with client.post(
        tg.url + "/v1/traces", data=b"", headers={"Authorization": f"Bearer {issuer.mint()}"}
    ) as resp:
        assert resp.status == 200
    assert issuer.jwks_fetches - before == 1
