"""Signed Gitea/Forgejo webhooks and GitLab deployments become deployment-marker spans,
stored durably first, delivered exactly once through outages; bad input stores nothing."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import time
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest

from proxy.dev.standins import Sink, StandInIssuer
from tests import gitea_payloads as g
from tests.conftest import DOCS_KEY, PAYMENTS_KEY, Tracegate, assert_no_secrets, environ, policy_yaml

OLD_SECRET = "gitea-hook-secret-old-123"
NEW_SECRET = "gitea-hook-secret-new-456"
FORGEJO_SECRET = "forgejo-hook-secret-789"

WEBHOOKS = """
webhooks:
  - name: payments-api
    source: gitea
    repository: "payments/api"
    secret: [{env: GITEA_HOOK_OLD}, {env: GITEA_HOOK_NEW}]
    events: [push, tag, release]
    refs: ["refs/heads/main", "refs/tags/v*"]
    service_account: payments-ci
    services: [payments-api, payments-worker]
  - name: forgejo-docs
    source: forgejo
    repository: "docs/*"
    secret: [{env: FORGEJO_HOOK}]
    events: [push]
    service_account: docs-ci
    services: [docs-site]
"""


def hook_env() -> dict[str, str]:
    return {**environ(), "GITEA_HOOK_OLD": OLD_SECRET, "GITEA_HOOK_NEW": NEW_SECRET, "FORGEJO_HOOK": FORGEJO_SECRET}


@pytest.fixture
async def tg(start_tracegate: Any, issuer: StandInIssuer) -> Tracegate:
    tracegate: Tracegate = await start_tracegate(
        policy_yaml(issuer.url, WEBHOOKS),
        env=hook_env(),
        outbox_retry_base="0.05",
        outbox_retry_max="0.4",
    )
    await tracegate.keys_ready()
    return tracegate


async def deliver(
    client: aiohttp.ClientSession,
    tg: Tracegate,
    payload: dict[str, Any] | bytes,
    event: str = "push",
    secret: str | None = OLD_SECRET,
    **kw: Any,
) -> tuple[int, dict[str, Any]]:
    body = payload if isinstance(payload, bytes) else g.encode(payload)
    headers = g.gitea_headers(event, body, secret, **kw)
    async with client.post(
        tg.url + "/webhooks/gitea", data=body, headers={**headers, "Content-Type": "application/json"}
    ) as resp:
        return resp.status, await resp.json()


async def arrivals(sink: Sink, n: int, timeout: float = 10.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while len(sink.received) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # and nothing more arrives after
    return sink.received


def spans(received: Any) -> list[tuple[dict[str, str], dict[str, str]]]:
    """(resource attributes, span attributes) of every span in a received OTLP/JSON body."""
    out = []
    for rs in json.loads(received.body)["resourceSpans"]:
        resource = {a["key"]: a["value"]["stringValue"] for a in rs["resource"]["attributes"]}
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                out.append((resource, {a["key"]: a["value"]["stringValue"] for a in span["attributes"]}))
    return out


async def test_signed_push_becomes_one_marker_span_per_service(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    status, answer = await deliver(client, tg, g.push(), delivery="d-push-1")
    assert (status, answer["accepted"], answer["services"]) == (202, True, ["payments-api", "payments-worker"])
    [got] = await arrivals(sink, 1)
    assert got.path == "/v1/traces"
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers.getall("lightstep-access-token") == [PAYMENTS_KEY]
    marks = spans(got)
    assert [r["service.name"] for r, _ in marks] == ["payments-api", "payments-worker"]
    resource, attrs = marks[0]
    assert resource["service.version"] == g.AFTER
    assert attrs == {
        "vcs.provider.name": "gitea",
        "vcs.repository.url.full": "https://gitea.example.com/payments/api",
        "vcs.repository.name": "api",
        "vcs.owner.name": "payments",
        "vcs.ref.head.name": "main",
        "vcs.ref.head.revision": g.AFTER,
        "vcs.ref.head.type": "branch",
        "tracegate.event": "push",
        "tracegate.delivery_id": "d-push-1",
        "tracegate.actor.login": "alice",
        "tracegate.commit.title": "Fix rounding in invoice totals",
        "tracegate.compare_url": g.push()["compare_url"],
    }
    assert_no_secrets(caplog.text, OLD_SECRET, NEW_SECRET)
    assert OLD_SECRET not in caplog.text and g.sign(g.encode(g.push()), OLD_SECRET) not in caplog.text


async def test_every_listed_secret_verifies_and_hub_signature_alone_works(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    assert (await deliver(client, tg, g.push(after="a" * 40), secret=NEW_SECRET))[0] == 202
    body = g.encode(g.push(after="b" * 40))
    headers = {
        "X-Gitea-Event": "push",
        "X-Gitea-Delivery": "d-hub",
        "Content-Type": "application/json",
        "X-Hub-Signature-256": "sha256=" + g.sign(body, OLD_SECRET),
    }
    async with client.post(tg.url + "/webhooks/gitea", data=body, headers=headers) as resp:
        assert resp.status == 202
    received = await arrivals(sink, 2)
    assert sorted(spans(r)[0][0]["service.version"] for r in received) == ["a" * 40, "b" * 40]


async def test_form_encoded_delivery_is_verified_over_the_payload_field(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    payload = json.dumps(g.push()).encode()
    headers = g.gitea_headers("push", payload, OLD_SECRET)  # Gitea signs the JSON, not the form body
    async with client.post(
        tg.url + "/webhooks/gitea",
        data=urlencode({"payload": payload.decode()}),
        headers={**headers, "Content-Type": "application/x-www-form-urlencoded"},
    ) as resp:
        assert resp.status == 202
    assert spans((await arrivals(sink, 1))[0])[0][0]["service.version"] == g.AFTER


async def test_tag_and_release_markers(tg: Tracegate, sink: Sink, client: aiohttp.ClientSession) -> None:
    assert (await deliver(client, tg, g.create_tag(), event="create"))[0] == 202
    assert (await deliver(client, tg, g.release(), event="release"))[0] == 202
    received = await arrivals(sink, 2)
    by_event = {spans(r)[0][1]["tracegate.event"]: spans(r)[0] for r in received}
    assert by_event["tag"][0]["service.version"] == g.TAG_SHA
    assert by_event["tag"][1]["vcs.ref.head.type"] == "tag"
    assert by_event["tag"][1]["vcs.ref.head.name"] == "v1.4.0"
    assert by_event["release"][0]["service.version"] == g.RELEASE_SHA


async def test_forgejo_headers(tg: Tracegate, sink: Sink, client: aiohttp.ClientSession) -> None:
    status, _ = await deliver(client, tg, g.push(repo="docs/site"), secret=FORGEJO_SECRET, source="Forgejo")
    assert status == 202
    [got] = await arrivals(sink, 1)
    assert got.headers["lightstep-access-token"] == DOCS_KEY
    assert spans(got)[0][1]["vcs.provider.name"] == "forgejo"


@pytest.mark.parametrize(
    ("case", "status", "reason", "recorded"),
    [
        ("wrong-secret", 401, "bad-signature", "bad-signature"),
        ("empty-signature", 401, "missing-signature", "missing-signature"),
        ("sha1-only", 401, "missing-signature", "missing-signature"),
        ("bad-json", 400, "bad-json", "bad-json"),
        ("oversized", 413, "body-too-large", "body-too-large"),
        # Answered as a bad signature (no oracle for which repositories have entries);
        # the metric and the audit line keep the exact reason.
        ("unknown-repository", 401, "bad-signature", "unknown-repository"),
        ("gitea-secret-on-forgejo-entry", 401, "bad-signature", "bad-signature"),
    ],
)
async def test_refused_webhooks_store_nothing(
    case: str,
    status: int,
    reason: str,
    recorded: str,
    tg: Tracegate,
    sink: Sink,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    body, secret, source = g.encode(g.push()), OLD_SECRET, "Gitea"
    headers: dict[str, str] = {}
    if case == "wrong-secret":
        secret = "not-the-secret"
    elif case == "empty-signature":
        secret = None
    elif case == "sha1-only":
        secret = None
        headers = {"X-Hub-Signature": "sha1=" + hmac.new(OLD_SECRET.encode(), body, hashlib.sha1).hexdigest()}
    elif case == "bad-json":
        body = b'{"ref": "refs/heads/main", '
    elif case == "oversized":
        body = b'{"pad": "' + b"x" * (1 << 20) + b'"}'
    elif case == "unknown-repository":
        body = g.encode(g.push(repo="marketing/site"))
    elif case == "gitea-secret-on-forgejo-entry":
        body, source = g.encode(g.push(repo="docs/site")), "Forgejo"
    all_headers = {
        **g.gitea_headers("push", body, secret, source=source),
        **headers,
        "Content-Type": "application/json",
    }
    async with client.post(tg.url + "/webhooks/gitea", data=io.BytesIO(body), headers=all_headers) as resp:
        assert resp.status == status
        answer = await resp.json()
    assert answer == {"accepted": False, "reason": reason}
    await asyncio.sleep(0.2)
    assert sink.received == []
    assert tg.metric("tracegate_outbox_depth") == 0
    assert tg.metric("tracegate_webhooks_total", source=source.lower(), decision="refused", reason=recorded) == 1
    assert tg.audit()[-1]["reason"] == recorded
    assert OLD_SECRET not in caplog.text


async def test_an_unknown_repository_is_answered_exactly_like_a_bad_signature(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    """A sender without the secret cannot learn which repositories have an entry: the
    status, the headers that describe the body, and the body are the same."""
    answers = []
    for repo in ("payments/api", "marketing/site", "docs/site"):  # an entry, none, another source's entry
        body = g.encode(g.push(repo=repo))
        headers = {**g.gitea_headers("push", body, "not-the-secret"), "Content-Type": "application/json"}
        async with client.post(tg.url + "/webhooks/gitea", data=body, headers=headers) as resp:
            answers.append(
                (resp.status, resp.headers["Content-Type"], resp.headers["Content-Length"], await resp.read())
            )
    assert answers[0][0] == 401
    assert answers[1] == answers[0] and answers[2] == answers[0]
    recorded = [(a["reason"], a["repository"]) for a in tg.audit() if a["event"] == "webhook"]
    assert recorded == [
        ("bad-signature", "payments/api"),
        ("unknown-repository", "marketing/site"),
        ("unknown-repository", "docs/site"),
    ]
    assert tg.metric("tracegate_webhooks_total", source="gitea", decision="refused", reason="unknown-repository") == 2
    await asyncio.sleep(0.2)
    assert sink.received == []


@pytest.mark.parametrize(
    ("payload", "event", "reason"),
    [
        (g.push(ref="refs/heads/feature/x"), "push", "ref-not-listed"),
        (g.push(after="0" * 40), "push", "branch-deleted"),
        ({**g.create_tag(), "ref_type": "branch", "ref": "feature/x"}, "create", "event-not-listed"),
        (g.push(), "issues", "event-not-listed"),
        (g.release(action="updated"), "release", "release-action-not-published"),
        (g.create_tag(tag="nightly-3"), "create", "ref-not-listed"),
    ],
)
async def test_authentic_events_that_draw_no_marker_are_202_with_reason(
    payload: dict[str, Any], event: str, reason: str, tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    status, answer = await deliver(client, tg, payload, event=event)
    assert (status, answer) == (202, {"accepted": False, "reason": reason})
    await asyncio.sleep(0.2)
    assert sink.received == []


async def test_unlisted_event_type_on_configured_repository(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    tg = await start_tracegate(
        policy_yaml(issuer.url, WEBHOOKS.replace("events: [push, tag, release]", "events: [release]")), env=hook_env()
    )
    status, answer = await deliver(client, tg, g.push())
    assert (status, answer["reason"]) == (202, "event-not-listed")


async def test_replayed_delivery_id_and_identical_body_are_one_event(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    body = g.encode(g.push())
    first = await deliver(client, tg, body, delivery="d-1")
    replay = await deliver(client, tg, body, delivery="d-1")
    redelivery = await deliver(client, tg, body, delivery="d-2")  # Gitea's manual redelivery: new id, same body
    assert first == (202, {"accepted": True, "reason": "stored", "services": ["payments-api", "payments-worker"]})
    assert replay == (202, {"accepted": False, "reason": "duplicate-delivery", "duplicate": True})
    assert redelivery == (202, {"accepted": False, "reason": "duplicate-body", "duplicate": True})
    assert len(await arrivals(sink, 1)) == 1


async def test_upstream_down_then_back_each_event_arrives_exactly_once(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    port = sink.port
    await sink.stop()
    for i in range(5):
        status, _ = await deliver(client, tg, g.push(after=f"{i + 1:040x}"), delivery=f"down-{i}")
        assert status == 202
    await asyncio.sleep(0.5)  # several failed attempts
    assert tg.metric("tracegate_outbox_deliveries_total", result="retry") >= 5
    async with client.get(tg.admin_url + "/readyz") as resp:
        assert resp.status == 200  # the outbox absorbs the outage
    async with client.get(tg.admin_url + "/metrics") as resp:
        assert "tracegate_outbox_depth 5.0" in await resp.text()
    await sink.start(port)
    received = await arrivals(sink, 5)
    versions = sorted(spans(r)[0][0]["service.version"] for r in received)
    assert versions == [f"{i + 1:040x}" for i in range(5)]
    assert tg.metric("tracegate_outbox_deliveries_total", result="delivered") == 5


async def test_upstream_503_then_200_and_permanent_4xx(
    tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    sink.status, sink.retry_after = 503, "0"
    await deliver(client, tg, g.push(after="c" * 40))
    await arrivals(sink, 2, timeout=5)
    sink.status = 200
    received = await arrivals(sink, 3)
    assert sum(1 for r in received if spans(r)[0][0]["service.version"] == "c" * 40) >= 3
    assert tg.metric("tracegate_outbox_deliveries_total", result="delivered") == 1
    sink.received.clear()
    sink.status = 400
    await deliver(client, tg, g.push(after="d" * 40))
    await arrivals(sink, 1)
    await asyncio.sleep(0.5)
    assert len(sink.received) == 1  # refused permanently: not retried
    assert tg.metric("tracegate_outbox_deliveries_total", result="failed-permanently") == 1


# --- GitLab jobs -----------------------------------------------------------------------


async def post_deployment(
    client: aiohttp.ClientSession, tg: Tracegate, token: str, body: Any = None
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else b""
    async with client.post(
        tg.url + "/v1/deployments",
        data=data,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    ) as resp:
        return resp.status, await resp.json()


async def test_gitlab_deployment_marker_comes_from_claims(
    tg: Tracegate, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    token = issuer.mint(job_id="777", sha="e" * 40)
    status, answer = await post_deployment(
        client, tg, token, {"service": "payments-worker", "environment": "production"}
    )
    assert (status, answer["services"]) == (202, ["payments-worker"])
    [got] = await arrivals(sink, 1)
    [(resource, attrs)] = spans(got)
    assert resource == {
        "service.name": "payments-worker",
        "service.version": "e" * 40,
        "deployment.environment.name": "production",
    }
    assert attrs["vcs.provider.name"] == "gitlab"
    assert attrs["vcs.repository.url.full"] == f"{issuer.url}/payments/api"
    assert attrs["tracegate.job.id"] == "777"
    assert attrs["cicd.pipeline.run.id"] == "99001"
    assert got.headers["lightstep-access-token"] == PAYMENTS_KEY
    again = await post_deployment(client, tg, token, {"service": "payments-worker"})
    assert again == (202, {"accepted": False, "reason": "duplicate-delivery", "duplicate": True})


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"service": "payments-api", "sha": "f" * 40}, 400, "unknown-field"),
        ({"service": "billing-api"}, 403, "service-not-allowed"),
        ({"environment": "staging"}, 403, "environment-mismatch"),
        ([1, 2], 400, "unknown-field"),
    ],
)
async def test_gitlab_deployment_body_cannot_change_the_facts(
    body: Any,
    status: int,
    reason: str,
    tg: Tracegate,
    issuer: StandInIssuer,
    sink: Sink,
    client: aiohttp.ClientSession,
) -> None:
    result = await post_deployment(client, tg, issuer.mint(), body)
    assert result == (status, {"accepted": False, "reason": reason})
    await asyncio.sleep(0.2)
    assert sink.received == []


async def test_gitlab_deployment_refusals(
    tg: Tracegate, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    async with client.post(tg.url + "/v1/deployments", data=b"", headers={"Authorization": "Bearer x.y.z"}) as resp:
        assert resp.status == 401
    assert (await post_deployment(client, tg, issuer.mint(project_path="docs/site")))[
        0
    ] == 403  # rule lists no services
    assert (await post_deployment(client, tg, issuer.mint(project_path="x/forks/y")))[0] == 403
    token = issuer.mint()
    status, answer = await post_deployment(client, tg, token)
    assert (status, answer["services"]) == (202, ["payments-api", "payments-worker"])
    # One marker per service: the same job marking one of them again draws nothing new.
    assert (await post_deployment(client, tg, token, {"service": "payments-api"}))[1]["reason"] == "duplicate-delivery"
    received = await arrivals(sink, 2)
    assert sorted(spans(r)[0][0]["service.name"] for r in received) == ["payments-api", "payments-worker"]


async def test_marker_links_stay_on_the_forge_instance(
    start_tracegate: Any, issuer: StandInIssuer, sink: Sink, client: aiohttp.ClientSession
) -> None:
    """A marker's links name the instance the entry pins (instance:), else the one its
    html_url names: an html_url on another host (pinned) or a compare_url on another host
    (either way) is left out, the marker is drawn all the same."""
    pinned = WEBHOOKS.replace(
        'repository: "payments/api"', 'repository: "payments/api"\n    instance: https://gitea.example.com'
    )
    tg = await start_tracegate(policy_yaml(issuer.url, pinned), env=hook_env())
    moved = g.push(after="a" * 40)
    moved["repository"] = g.repository(host="https://evil.example")
    status, _ = await deliver(client, tg, moved)
    assert status == 202
    assert tg.audit()[-1]["sender_instance"] == "https://evil.example"
    foreign_compare = g.push(after="b" * 40, repo="docs/site")  # the unpinned forgejo entry
    foreign_compare["compare_url"] = "https://evil.example/docs/site/compare/1...2"
    status, _ = await deliver(client, tg, foreign_compare, secret=FORGEJO_SECRET, source="Forgejo")
    assert status == 202
    assert tg.audit()[-1]["sender_instance"] is None
    received = await arrivals(sink, 2)
    marks = {r["service.version"]: a for got in received for r, a in spans(got)}
    assert not marks["a" * 40]["vcs.repository.url.full"]  # written empty, as for a payload without html_url
    assert marks["a" * 40]["tracegate.compare_url"].startswith("https://gitea.example.com/")
    assert marks["b" * 40]["vcs.repository.url.full"] == "https://gitea.example.com/docs/site"
    assert "tracegate.compare_url" not in marks["b" * 40]
    assert not any("evil" in v for a in marks.values() for v in a.values())
