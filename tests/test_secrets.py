"""Secrets never leak: a suite's worth of traffic — accepted, refused, denied, failing
upstream, webhooks good and bad, deployments, scrapes — through one tracegate, and not one
token, signature, webhook secret or access key in any log line, audit line, metric or
response (body or headers)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from proxy.dev.standins import Sink, StandInIssuer
from tests import gitea_payloads as g
from tests.conftest import SECRETS, policy_yaml
from tests.test_refusals import CASES
from tests.test_webhooks import FORGEJO_SECRET, NEW_SECRET, OLD_SECRET, WEBHOOKS, hook_env


async def test_no_secret_in_any_log_metric_or_response(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    tg = await start_tracegate(policy_yaml(issuer.url, WEBHOOKS), env=hook_env(), outbox_retry_base="0.05")
    await tg.keys_ready()
    seen: list[str] = []  # every response: status line, headers and body
    tokens: list[str] = []
    signatures: list[str] = []

    async def call(client: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> int:
        async with client.request(method, url, **kw) as resp:
            body = await resp.read()
            seen.append(f"{resp.status} {dict(resp.headers)} {body.decode('latin-1')}")
            return resp.status

    async with aiohttp.ClientSession() as client:
        for name, (build, _, _) in CASES.items():
            headers = build(issuer)
            pairs = list(headers.items()) if isinstance(headers, dict) else headers
            tokens += [value.split(" ")[-1] for _, value in pairs]
            url = tg.url + "/v1/" + ("metrics" if name == "signal-not-allowed" else "traces")
            if name == "token-in-query":
                query_token = issuer.mint(job_id="q")
                tokens.append(query_token)
                url += "?access_token=" + query_token
            for content_type in ("application/json", "application/x-protobuf"):
                await call(client, "POST", url, data=b"{}", headers=[*pairs, ("Content-Type", content_type)])
        good = issuer.mint()
        tokens.append(good)
        bearer = {"Authorization": f"Bearer {good}"}
        assert await call(client, "POST", tg.url + "/v1/traces", data=b"x", headers=bearer) == 200
        sink.status = 503
        await call(client, "POST", tg.url + "/v1/logs", data=b"x", headers={"lightstep-access-token": good})
        sink.status = 200
        for secret in (OLD_SECRET, NEW_SECRET, "wrong-secret", None):
            body = g.encode(g.push(after=f"{len(signatures) + 1:040x}"))
            headers = g.gitea_headers("push", body, secret)
            signatures += [headers["X-Gitea-Signature"]] if secret else []
            await call(client, "POST", tg.url + "/webhooks/gitea", data=body, headers=headers)
        forgejo = g.encode(g.push(repo="docs/site"))
        fheaders = g.gitea_headers("push", forgejo, FORGEJO_SECRET, source="Forgejo")
        signatures.append(fheaders["X-Forgejo-Signature"])
        await call(client, "POST", tg.url + "/webhooks/gitea", data=forgejo, headers=fheaders)
        deploy = issuer.mint(job_id="d1")
        tokens.append(deploy)
        await call(
            client,
            "POST",
            tg.url + "/v1/deployments",
            data=json.dumps({"service": "payments-api"}),
            headers={"Authorization": f"Bearer {deploy}"},
        )
        await call(client, "POST", tg.url + "/v1/deployments", data=b"{}", headers={"Authorization": "Bearer x.y.z"})
        for _ in range(50):
            if len(sink.received) >= 5:
                break
            await asyncio.sleep(0.05)
        for path in ("/metrics", "/healthz", "/readyz"):
            await call(client, "GET", tg.admin_url + path)
    await tg.runtime.reload()  # a reload logs too

    corpus = "\n".join([caplog.text, "".join(tg.audit_lines), tg.runtime.metrics.render().decode(), *seen])
    assert len(seen) > 60 and len(tg.audit_lines) > 60  # the traffic really happened
    forbidden = {*SECRETS, OLD_SECRET, NEW_SECRET, FORGEJO_SECRET, *signatures}
    for token in tokens:
        forbidden.add(token)
        parts = token.split(".")
        if len(parts) == 3 and len(parts[2]) > 16:
            forbidden.add(parts[2])  # the signature alone is also a secret-bearing fragment
    leaked = sorted(secret[:12] + "…" for secret in forbidden if secret and len(secret) > 8 and secret in corpus)
    assert leaked == []
