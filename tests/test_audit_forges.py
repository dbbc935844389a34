"""An audit line for every forge (issue 21, item 2): the identity fields of a decision's
audit line come from the issuer's forge — GitLab, GitHub Actions, Forgejo Actions or a
generic OIDC issuer — whatever the claim is called there, through one running tracegate
with a stand-in issuer per forge minting tokens of that forge's claim shape."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from proxy.dev.standins import StandInIssuer, forgejo_claims, github_claims, gitlab_claims
from proxy.identity.forges import FACT_CLAIMS, audit_identity, forge_of
from proxy.observe.audit import AUDITED_CLAIMS
from tests.conftest import Tracegate, environ
from tests.test_stamp import _spans

DOCS = Path(__file__).parent.parent / "docs" / "audit.md"
OKTA_CLIENT = "0oa8f3kq2zXyTm9Ab5d7"


def policy(gitlab: str, github: str, forgejo: str, okta: str) -> str:
    return f"""\
issuers:
  gitlab: {{issuer: {gitlab}, audiences: [tracegate]}}
  github: {{issuer: {github}, audiences: [tracegate]}}
  forgejo: {{issuer: {forgejo}, audiences: [tracegate]}}
  okta: {{issuer: {okta}, audiences: ["api://tracegate"]}}
service_accounts:
  ci:
    access_token: {{env: LS_TOKEN_PAYMENTS}}
rules:
  - {{name: gitlab-forks, issuer: gitlab, effect: deny, when: {{project_path: "*/forks/*"}}}}
  - {{name: gitlab-payments, issuer: gitlab, when: {{project_id: 4242}}, service_account: ci}}
  - {{name: github-no-prt, issuer: github, effect: deny, when: {{event_name: pull_request_target}}}}
  - {{name: github-api, issuer: github, when: {{repository_id: 424242}}, service_account: ci}}
  - {{name: forgejo-gateway, issuer: forgejo, when: {{repository_id: 315}}, service_account: ci}}
  - {{name: okta-farm, issuer: okta, when: {{cid: {OKTA_CLIENT}}}, service_account: ci}}
"""


def okta_claims(issuer: str, **overrides: Any) -> dict[str, Any]:
    """An Okta client-credentials access token's claims: no CI facts at all."""
    now = int(time.time())
    claims = {
        "ver": 1,
        "jti": "AT.x1",
        "iss": issuer,
        "aud": "api://tracegate",
        "iat": now,
        "exp": now + 300,
        "cid": OKTA_CLIENT,
        "scp": ["tracegate.ingest"],
        "sub": OKTA_CLIENT,
    }
    claims.update(overrides)
    return claims


class Forges:
    def __init__(self, gitlab: StandInIssuer, github: StandInIssuer, forgejo: StandInIssuer, okta: StandInIssuer):
        self.gitlab, self.github, self.forgejo, self.okta = gitlab, github, forgejo, okta


@pytest.fixture
async def forges() -> AsyncIterator[Forges]:
    servers = (
        StandInIssuer(),  # GitLab: the instance's origin
        StandInIssuer(),  # GitHub: https://token.actions.githubusercontent.com is an origin too
        StandInIssuer(path="/api/actions"),  # Forgejo: <instance>/api/actions
        StandInIssuer(path="/oauth2/default", metadata="oauth"),  # Okta: no openid-configuration
    )
    for server in servers:
        await server.start()
    yield Forges(*servers)
    for server in servers:
        await server.stop()


@pytest.fixture
async def tg(start_tracegate: Callable[..., Any], forges: Forges) -> Tracegate:
    text = policy(forges.gitlab.url, forges.github.url, forges.forgejo.url, forges.okta.url)
    started: Tracegate = await start_tracegate(text, env=environ())
    await started.keys_ready()
    return started


async def export(client: aiohttp.ClientSession, tg: Tracegate, token: str) -> int:
    body = encode_spans(_spans()).SerializeToString()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-protobuf"}
    async with client.post(tg.url + "/v1/traces", data=body, headers=headers) as resp:
        await resp.read()
        return resp.status


def identity_of(line: dict[str, Any]) -> dict[str, Any]:
    return {name: line[name] for name in AUDITED_CLAIMS}


def expected(claims: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**fields, "sub": claims["sub"], "jti": claims["jti"]}


def cases(forges: Forges) -> list[tuple[str, StandInIssuer, dict[str, Any], dict[str, Any]]]:
    gl = gitlab_claims(forges.gitlab.url)
    gh = github_claims(forges.github.url)
    fj = forgejo_claims(forges.forgejo.url)
    ok = okta_claims(forges.okta.url)
    return [
        (
            "gitlab",
            forges.gitlab,
            gl,
            expected(
                gl,
                forge="gitlab",
                project_path="payments/api",
                project_id="4242",
                namespace_id="72",
                pipeline_id="99001",
                job_id="880011",
                ref="main",
                user_login="alice",
                user_id="17",
            ),
        ),
        (
            "github",
            forges.github,
            gh,
            expected(
                gh,
                forge="github",
                project_path="payments-org/api",
                project_id="424242",
                namespace_id="2020",
                pipeline_id="22259804324",
                job_id="90000001",
                ref="refs/heads/main",
                user_login="alice",
                user_id="1001",
            ),
        ),
        (
            "forgejo",
            forges.forgejo,
            fj,
            expected(
                fj,
                forge="forgejo",
                project_path="platform/gateway",
                project_id="315",
                namespace_id="7",
                pipeline_id="3705365",
                job_id=None,  # Forgejo's tokens name no job: null because there is none
                ref="refs/heads/main",
                user_login="alice",
                user_id="12",
            ),
        ),
        (
            "oidc",
            forges.okta,
            ok,
            expected(
                ok,
                forge="oidc",
                project_path=None,
                project_id=None,
                namespace_id=None,
                pipeline_id=None,
                job_id=None,
                ref=None,
                user_login=OKTA_CLIENT,  # the client is who sends
                user_id=None,
            ),
        ),
    ]


async def test_every_forge_fills_the_audit_line_identity_fields(
    tg: Tracegate, forges: Forges, client: aiohttp.ClientSession
) -> None:
    for forge, issuer, claims, want in cases(forges):
        assert await export(client, tg, issuer.mint(claims)) == 200, forge
        line = tg.audit()[-1]
        name = "okta" if forge == "oidc" else forge  # the policy's name for the issuer
        assert (line["decision"], line["reason"], line["issuer"]) == ("allowed", "forwarded", name)
        assert identity_of(line) == want, forge


async def test_denied_and_other_doors_carry_the_same_fields(
    tg: Tracegate, forges: Forges, client: aiohttp.ClientSession
) -> None:
    # A deny rule's line says whose token it refused.
    denied = github_claims(forges.github.url, event_name="pull_request_target")
    assert await export(client, tg, forges.github.mint(denied)) == 403
    line = tg.audit()[-1]
    assert (line["decision"], line["reason"], line["rule"]) == ("denied", "rule-denied", "github-no-prt")
    assert (line["forge"], line["project_path"], line["pipeline_id"], line["job_id"], line["user_login"]) == (
        "github",
        "payments-org/api",
        "22259804324",
        "90000001",
        "alice",
    )
    # /v1/traceparent goes through the same admission: a Forgejo job's line names its run.
    headers = {"Authorization": f"Bearer {forges.forgejo.mint(forgejo_claims(forges.forgejo.url))}"}
    async with client.get(tg.url + "/v1/traceparent", headers=headers) as resp:
        assert resp.status == 200
    line = tg.audit()[-1]
    assert (line["event"], line["reason"], line["forge"]) == ("traceparent", "traceparent", "forgejo")
    assert (line["project_path"], line["project_id"], line["pipeline_id"]) == ("platform/gateway", "315", "3705365")
    # A request refused before it had an identity has none.
    async with client.post(tg.url + "/v1/traces", data=b"x") as resp:
        assert resp.status == 401
    assert set(identity_of(tg.audit()[-1]).values()) == {None}


def test_claims_of_the_wrong_type_are_named_not_dropped() -> None:
    """A verified claim that is not a scalar is audited by its type name (as GitLab's always
    were), never skipped for the next candidate claim."""
    claims = github_claims("https://ghes.example.com/_services/token", repository=["a", "b"], run_id=7, actor=None)
    fields = audit_identity(claims)
    assert fields["forge"] == "github"
    assert (fields["project_path"], fields["pipeline_id"], fields["user_login"]) == (["a", "b"], 7, None)
    assert forge_of("https://code.example.org/api/actions", claims) == "forgejo"
    assert forge_of("https://id.example.com", {"sub": "svc"}) == "oidc"


def test_docs_audit_md_lists_each_forges_claims_side_by_side() -> None:
    """docs/audit.md's table is the one in proxy/identity/forges.py, row for row."""
    rows: dict[str, list[str]] = {}
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = cells[1:]
    assert list(rows) == list(AUDITED_CLAIMS)
    for field, cells in rows.items():
        for forge, cell in zip(("gitlab", "github", "forgejo", "oidc"), cells, strict=True):
            shown = re.findall(r"`([^`]+)`", cell)
            if field == "forge":
                assert shown == [forge], (field, forge, cell)
            else:
                assert tuple(shown) == audit_claim_names(forge, field), (field, forge, cell)


def audit_claim_names(forge: str, field: str) -> tuple[str, ...]:
    from proxy.identity.forges import AUDIT_FACTS

    if field in ("sub", "jti"):
        return (field,)
    return FACT_CLAIMS[forge].get(dict(AUDIT_FACTS)[field], ())
