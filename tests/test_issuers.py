"""GitHub Actions, Forgejo Actions and a generic OIDC issuer, first class: the example
policies in examples/issuers/, served by stand-in issuers at those issuers' paths with
tokens shaped like theirs, matched by id-based rules."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from proxy.dev.standins import Sink, StandInIssuer, forgejo_claims, github_claims, gitlab_claims
from proxy.identity.forges import ci_facts
from proxy.identity.keys import discovery_urls
from proxy.policy.stamps import DEFAULT_STAMP
from proxy.upstream.stamp import stamp_values
from tests.conftest import DOCS_KEY, PAYMENTS_KEY, Tracegate, environ
from tests.test_stamp import _spans, assert_stamped

EXAMPLES = Path(__file__).parent.parent / "examples" / "issuers"


async def start_example(start_tracegate: Callable[..., Any], name: str, real_issuer: str, stand_in: str) -> Tracegate:
    policy = (EXAMPLES / name).read_text()
    assert real_issuer in policy
    env = {**environ(), "LS_TOKEN_PLATFORM": DOCS_KEY}
    tg: Tracegate = await start_tracegate(
        policy.replace(real_issuer, stand_in), env=env, outbox_retry_base="0.05", outbox_retry_max="0.4"
    )
    await tg.keys_ready()
    return tg


async def post_spans(client: aiohttp.ClientSession, tg: Tracegate, token: str) -> tuple[int, bytes]:
    raw = encode_spans(_spans()).SerializeToString()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-protobuf"}
    async with client.post(tg.url + "/v1/traces", data=raw, headers=headers) as resp:
        await resp.read()
        return resp.status, raw


@pytest.fixture
async def github() -> AsyncIterator[StandInIssuer]:
    server = StandInIssuer()  # GitHub's issuer is an origin: https://token.actions.githubusercontent.com
    await server.start()
    yield server
    await server.stop()


async def test_github_actions_tokens_bind_on_ids_and_are_stamped(
    start_tracegate: Callable[..., Any], github: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    tg = await start_example(
        start_tracegate, "github-actions.yaml", "https://token.actions.githubusercontent.com", github.url
    )
    claims = github_claims(github.url)
    status, raw = await post_spans(client, tg, github.mint(claims))
    assert status == 200
    (got,) = sink.received
    assert got.headers["lightstep-access-token"] == PAYMENTS_KEY
    stamp = stamp_values(DEFAULT_STAMP, claims)
    values = dict(stamp)
    assert values["cicd.pipeline.run.id"] == "22259804324"
    assert values["vcs.repository.name"] == "payments-org/api"
    assert values["tracegate.repository.id"] == "424242"
    assert values["cicd.pipeline.task.run.id"] == "90000001"
    assert_stamped(ExportTraceServiceRequest.FromString(got.body), ExportTraceServiceRequest.FromString(raw), stamp)

    # Renamed, same ids: still the same repository. Same name, other ids (re-used): not.
    renamed = github_claims(
        github.url, repository="payments-org/api-v2", sub="repo:payments-org/api-v2:ref:refs/heads/main"
    )
    assert (await post_spans(client, tg, github.mint(renamed)))[0] == 200
    reused = github_claims(
        github.url, repository_id="999", repository_owner_id="31337", sub="repo:x:ref:refs/heads/main"
    )
    assert (await post_spans(client, tg, github.mint(reused)))[0] == 403
    # The immutable sub rule: environment production, owner id 2020, any repository of it.
    by_sub = github_claims(
        github.url,
        repository_id="5",
        ref="refs/heads/dev",
        sub="repo:payments-org@2020/worker@5:environment:production",
    )
    assert (await post_spans(client, tg, github.mint(by_sub)))[0] == 200
    denied = github_claims(github.url, event_name="pull_request_target")
    assert (await post_spans(client, tg, github.mint(denied)))[0] == 403
    assert [a["rule"] for a in tg.audit()][-5:] == [
        "github-payments-api-main",
        "github-payments-api-main",
        None,
        "github-payments-by-immutable-sub",
        "github-no-pull-request-target",
    ]


async def test_github_actions_deployment_marker(
    start_tracegate: Callable[..., Any], github: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    tg = await start_example(
        start_tracegate, "github-actions.yaml", "https://token.actions.githubusercontent.com", github.url
    )
    token = github.mint(github_claims(github.url, sha="a" * 40))
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with client.post(tg.url + "/v1/deployments", data=b"", headers=headers) as resp:
        assert resp.status == 202
        assert (await resp.json())["services"] == ["payments-api"]
    deadline = time.monotonic() + 10
    while not sink.received and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    (got,) = sink.received
    span_doc = json.loads(got.body)["resourceSpans"][0]
    resource = {a["key"]: a["value"]["stringValue"] for a in span_doc["resource"]["attributes"]}
    attrs = {a["key"]: next(iter(a["value"].values())) for a in span_doc["scopeSpans"][0]["spans"][0]["attributes"]}
    assert resource["service.version"] == "a" * 40
    assert resource["deployment.environment.name"] == "production"
    assert attrs["vcs.provider.name"] == "github"
    assert attrs["vcs.repository.url.full"] == f"{github.url}/payments-org/api"  # the issuer's origin, as on GHES
    assert attrs["vcs.ref.head.name"] == "main"
    assert attrs["cicd.pipeline.run.id"] == "22259804324"
    assert attrs["tracegate.workflow_ref"] == "payments-org/api/.github/workflows/ci.yml@refs/heads/main"
    assert attrs["tracegate.job.id"] == "90000001"
    async with client.post(tg.url + "/v1/deployments", data=b"", headers=headers) as resp:
        assert (await resp.json())["reason"] == "duplicate-delivery"


async def test_forgejo_actions_issuer_under_api_actions(
    start_tracegate: Callable[..., Any], sink: Sink, client: aiohttp.ClientSession
) -> None:
    forgejo = StandInIssuer(path="/api/actions")
    await forgejo.start()
    try:
        assert forgejo.url.endswith("/api/actions")
        tg = await start_example(
            start_tracegate, "forgejo-actions.yaml", "https://code.example.org/api/actions", forgejo.url
        )
        claims = forgejo_claims(forgejo.url)
        status, raw = await post_spans(client, tg, forgejo.mint(claims))
        assert status == 200
        (got,) = sink.received
        assert got.headers["lightstep-access-token"] == DOCS_KEY
        stamp = tg.runtime.gate.policy.service_accounts["platform-forgejo"].stamp
        values = stamp_values(stamp, claims)
        assert dict(values)["cicd.pipeline.run.id"] == "3705365"
        assert_stamped(
            ExportTraceServiceRequest.FromString(got.body), ExportTraceServiceRequest.FromString(raw), values
        )
        other = forgejo_claims(forgejo.url, repository_id="316")
        assert (await post_spans(client, tg, forgejo.mint(other)))[0] == 403
        assert forgejo.discovery_fetches == 1

        token = forgejo.mint(forgejo_claims(forgejo.url, sha="b" * 40, ref="refs/tags/v1.2.0", ref_type="tag"))
        async with client.post(tg.url + "/v1/deployments", headers={"Authorization": f"Bearer {token}"}) as resp:
            assert (resp.status, (await resp.json())["services"]) == (202, ["platform-gateway"])
        deadline = time.monotonic() + 10
        while len(sink.received) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        marker = json.loads(sink.received[1].body)["resourceSpans"][0]
        attrs = {a["key"]: a["value"]["stringValue"] for a in marker["scopeSpans"][0]["spans"][0]["attributes"]}
        assert attrs["vcs.provider.name"] == "forgejo"
        assert attrs["vcs.repository.url.full"] == forgejo.url.removesuffix("/api/actions") + "/platform/gateway"
        assert (attrs["vcs.ref.head.name"], attrs["vcs.ref.head.type"]) == ("v1.2.0", "tag")
    finally:
        await forgejo.stop()


@pytest.mark.parametrize("metadata", ["oauth", "rfc8414"])
async def test_generic_issuer_without_openid_configuration(
    start_tracegate: Callable[..., Any], sink: Sink, client: aiohttp.ClientSession, metadata: str, tmp_path: Path
) -> None:
    okta = StandInIssuer(path="/oauth2/default", metadata=metadata)
    await okta.start()
    try:
        key_file = tmp_path / "ls-build-farm"
        key_file.write_text(PAYMENTS_KEY)
        policy = (EXAMPLES / "okta-client-credentials.yaml").read_text()
        policy = policy.replace("https://example.okta.com/oauth2/default", okta.url)
        tg: Tracegate = await start_tracegate(policy.replace("/run/secrets/ls-build-farm", str(key_file)))
        await tg.keys_ready()
        now = int(time.time())
        claims = {
            "ver": 1,
            "jti": "AT.x1",
            "iss": okta.url,
            "aud": "api://tracegate",
            "iat": now,
            "exp": now + 300,
            "cid": "0oa8f3kq2zXyTm9Ab5d7",
            "scp": ["tracegate.ingest"],
            "sub": "0oa8f3kq2zXyTm9Ab5d7",
        }
        status, raw = await post_spans(client, tg, okta.mint(claims))
        assert status == 200
        assert sink.received[0].body == raw  # not stamped: the account has no stamp
        assert sink.received[0].headers["lightstep-access-token"] == PAYMENTS_KEY
        status, _ = await post_spans(client, tg, okta.mint({**claims, "cid": "0oaSomeoneElse"}))
        assert status == 403
        headers = {"Authorization": f"Bearer {okta.mint(claims)}"}
        async with client.post(tg.url + "/v1/deployments", data=b"", headers=headers) as resp:
            assert resp.status == 403  # no rule lists services for it
    finally:
        await okta.stop()


def test_discovery_urls() -> None:
    assert discovery_urls("https://id.example.com/oauth2/default") == [
        "https://id.example.com/oauth2/default/.well-known/openid-configuration",
        "https://id.example.com/oauth2/default/.well-known/oauth-authorization-server",
        "https://id.example.com/.well-known/oauth-authorization-server/oauth2/default",
    ]
    assert len(discovery_urls("https://token.actions.githubusercontent.com")) == 2


def test_ci_facts_side_by_side() -> None:
    gh = ci_facts(
        "https://token.actions.githubusercontent.com", github_claims("https://token.actions.githubusercontent.com")
    )
    fj = ci_facts("https://codeberg.org/api/actions", forgejo_claims("https://codeberg.org/api/actions"))
    gl = ci_facts("https://gitlab.example.com", gitlab_claims("https://gitlab.example.com"))
    assert gh is not None and fj is not None and gl is not None
    assert (gh.provider, gh.repository_url, gh.ref_name, gh.run_id, gh.job_key) == (
        "github",
        "https://github.com/payments-org/api",
        "main",
        "22259804324",
        "90000001",
    )
    assert (fj.provider, fj.repository_url, fj.owner, fj.run_id) == (
        "forgejo",
        "https://codeberg.org/platform/gateway",
        "platform",
        "3705365",
    )
    assert fj.job_key.startswith("3705365-1-")  # no check_run_id: one marker per token
    assert (gl.provider, gl.repository_url, gl.ref_name, gl.run_id, gl.job_key) == (
        "gitlab",
        "https://gitlab.example.com/payments/api",
        "main",
        "99001",
        "880011",
    )
    assert ci_facts("https://id.example.com", {"sub": "svc", "cid": "x"}) is None


async def test_traceparent_for_github_actions_tokens(
    start_tracegate: Callable[..., Any], github: StandInIssuer, client: aiohttp.ClientSession
) -> None:
    from proxy.ci.pipeline import instance_of, pipeline_span_id, trace_id, traceparent

    tg = await start_example(
        start_tracegate, "github-actions.yaml", "https://token.actions.githubusercontent.com", github.url
    )
    web = instance_of(github.url)
    assert web is not None

    async def ask(claims: dict[str, Any], fmt: str = "traceparent") -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {github.mint(claims)}"}
        async with client.get(tg.url + f"/v1/traceparent?format={fmt}", headers=headers) as resp:
            return resp.status, (await resp.text()).strip()

    # The job named by check_run_id: its own span, in the run's trace.
    status, parent = await ask(github_claims(github.url))
    assert status == 200
    assert parent == traceparent(web, "424242", "22259804324", "90000001", "1")
    # Two jobs of the same run share the trace; a token without check_run_id gets the run's root.
    _, other = await ask(github_claims(github.url, check_run_id="90000002"))
    assert other.split("-")[1] == parent.split("-")[1] and other != parent
    _, root = await ask(github_claims(github.url, check_run_id=None))
    trace = trace_id(web, "424242", "22259804324")
    assert root == f"00-{trace}-{pipeline_span_id(web, '424242', '22259804324')}-01"
    # Another repository id (a re-used name): the example policy binds on ids, so it may not ask.
    status, _ = await ask(github_claims(github.url, repository_id="777"))
    assert status == 403
    status, resource = await ask(github_claims(github.url), "resource")
    assert "cicd.pipeline.run.id=22259804324" in resource and "cicd.pipeline.task.run.id=90000001" in resource
