"""HTTP endpoints that become deployment markers: ``POST /webhooks/gitea`` (Gitea and
Forgejo, HMAC-signed) and ``POST /v1/deployments`` (a GitLab job with its ID token); it
registers every webhook door (GitLab's and GitHub's live in their own modules).

Both answer 202 only after the event is durably in the outbox; refusals store nothing. A
Gitea delivery for a repository no entry names is answered exactly as a wrong signature
(401 ``bad-signature``, after the same work): the sender does not learn which repositories
have entries, while the audit line and the metric say ``unknown-repository``.
When the outbox cannot commit (its database is down), they answer 503 with Retry-After,
which forges and GitLab jobs retry; never 202 without a commit.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDictProxy

from proxy import untrusted
from proxy.answers import refusal
from proxy.ci import actions, dora_facts
from proxy.ci.door import OUTBOX, OUTBOX_RETRY_AFTER, read_limited, refused_signature, sender_facts, signed_entry
from proxy.ci.dora_settle import Settler
from proxy.ci.gitea import Classified, classify, repository_name
from proxy.ci.github_routes import expect_github, handle_github
from proxy.ci.gitlab_routes import expect_gitlab, handle_gitlab
from proxy.ci.marker import Marker, is_commit_sha
from proxy.ci.marker_outbox import store_marker
from proxy.ci.outbox import Added
from proxy.ci.sender import Sender
from proxy.ci.signatures import presented_signatures
from proxy.ci.store import describe, open_outbox
from proxy.doors.ingest import RUNTIME, admit_http, expect_admitted
from proxy.doors.protocol import expect_refusal
from proxy.errors import BodyError, ConfigError, OutboxUnavailable
from proxy.gate.admission import Refused
from proxy.gate.runtime import Runtime
from proxy.identity.forges import ci_facts
from proxy.policy.model import DEFAULT_MARKERS
from proxy.policy.webhooks import markers_of, pinned_instance

MAX_DEPLOYMENT_BODY = 4096
#: More fields than this in a form-encoded delivery is not Gitea's form (it sends one).
MAX_FORM_FIELDS = 20
#: An event name or delivery id as Gitea and Forgejo send them (a word, a UUID, a number).
_HEADER_TOKEN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def _answer(status: int, **fields: Any) -> web.Response:
    return web.json_response(fields, status=status)


async def _store(
    request: web.Request,
    *,
    key: str,
    digest: str,
    source: str,
    account: str,
    marker: Marker,
    services: tuple[str, ...],
    markers: frozenset[str] = DEFAULT_MARKERS,
) -> Added:
    """Put the marker in the outbox, durably, before the caller answers 202 (:mod:`.marker_outbox`)."""
    return await store_marker(
        request.app[OUTBOX],
        key=key,
        digest=digest,
        source=source,
        account=account,
        marker=marker,
        services=services,
        time_unix_nano=time.time_ns(),
        markers=markers,
    )


def _gitea_source(headers: CIMultiDictProxy[str]) -> str:
    return "forgejo" if "X-Forgejo-Event" in headers else "gitea"


def _gitea_headers_refusal(headers: CIMultiDictProxy[str]) -> tuple[int, str, str, str | None] | None:
    """(status, decision, reason, header) for a delivery missing what every authentic one
    carries: the event and delivery headers, and a signature."""
    prefix = f"X-{_gitea_source(headers).capitalize()}"
    for name in (f"{prefix}-Event", f"{prefix}-Delivery"):
        value = headers.get(name)
        if not value:
            return 400, "refused", "missing-header", name
        if not _HEADER_TOKEN.fullmatch(value):  # it becomes part of the outbox's key
            return 400, "refused", "bad-header", name
    if not presented_signatures(headers):
        return 401, "refused", "missing-signature", None
    return None


async def _gitea_refuses(request: web.Request) -> bool:
    return _gitea_headers_refusal(request.headers) is not None


def webhook_limit(request: web.Request) -> int:
    return request.app[RUNTIME].settings.webhook_max_body


async def handle_gitea(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    source = _gitea_source(request.headers)
    event = request.headers.get(f"X-{source.capitalize()}-Event") or ""
    delivery = request.headers.get(f"X-{source.capitalize()}-Delivery") or ""

    def done(status: int, decision: str, reason: str, *, answered: str | None = None, **more: Any) -> web.Response:
        """Count, audit and answer; ``answered`` is the reason the sender is told when it
        must not learn the exact one (which the metric and the audit line keep)."""
        runtime.metrics.webhooks.labels(source, decision, reason).inc()
        runtime.audit(
            kind="webhook",
            decision=decision,
            reason=reason,
            source=source,
            webhook_event=event or None,
            delivery=delivery or None,
            repository=more.get("repository"),
            service_account=more.get("account"),
            sender_instance=more.get("sender_instance"),
        )
        return _answer(
            status,
            accepted=decision == "accepted",
            reason=answered or reason,
            **{k: v for k, v in more.items() if k in ("services", "duplicate", "header")},
        )

    missing = _gitea_headers_refusal(request.headers)
    if missing is not None:
        status, decision, reason, header = missing
        return done(status, decision, reason, **({"header": header} if header else {}))
    try:
        body = await read_limited(request, runtime.settings.webhook_max_body, runtime.settings.body_timeout)
    except BodyError as exc:
        return done(exc.status, "refused", exc.reason)
    signatures = presented_signatures(request.headers)
    signed = body
    if request.content_type == "application/x-www-form-urlencoded":
        try:
            form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=MAX_FORM_FIELDS)
        except ValueError:
            return done(400, "refused", "bad-form")
        if len(form.get("payload", [])) != 1:
            return done(400, "refused", "bad-form")
        signed = form["payload"][0].encode("utf-8")
    try:
        payload = untrusted.loads(signed)
    except (ValueError, RecursionError):
        return done(400, "refused", "bad-json")
    if not isinstance(payload, dict):
        return done(400, "refused", "bad-json")
    payload = actions.with_repository(payload)  # Forgejo's run/job events name it inside run
    repository = repository_name(payload)
    candidates = [
        hook
        for hook in runtime.gate.policy.webhooks
        if hook.source == source and repository is not None and hook.repository.match_text(repository)
    ]
    hook = signed_entry(candidates, signed, signatures)
    if isinstance(hook, str):
        return done(401, "refused", hook, repository=repository, **refused_signature(hook))
    pinned, facts = pinned_instance(hook), sender_facts(hook, payload, repository)
    if actions.listed_as(event) is not None:  # Actions runs become CI trace spans (proxy/ci/actions.py)
        status, decision, reason, more = await actions.receive(request.app[OUTBOX], hook, source, event, payload)
        return done(status, decision, reason, **more, **facts)
    classified = classify(source, event, delivery, payload, instance=pinned)
    if not isinstance(classified, Classified):
        if classified.reason == "repository-mismatch":
            return done(400, "refused", classified.reason, **facts)
        return done(202, "ignored", classified.reason, **facts)
    if classified.kind not in hook.events:
        return done(202, "ignored", "event-not-listed", **facts)
    if not hook.refs.match_text(classified.ref):
        return done(202, "ignored", "ref-not-listed", **facts)
    await dora_facts.record(request.app[OUTBOX], hook, event, payload)  # metrics: [dora] only; before the marker
    digest = hashlib.sha256(f"{source}\0{event}\0".encode() + signed).hexdigest()
    stored = await _store(
        request,
        key=f"{source}:{delivery}",
        digest=digest,
        source=source,
        account=hook.service_account,
        marker=classified.marker,
        services=hook.services,
        markers=markers_of(hook),
    )
    if stored != "stored":
        return done(202, "ignored", stored, duplicate=True, **facts)
    return done(202, "accepted", "stored", services=list(hook.services), **facts)


def _deployment_refused(request: web.Request, refused: Refused) -> web.StreamResponse:
    """A deployment's refusal: a credential problem in the OTLP form every door uses, a
    denial as the endpoint's JSON. Already audited and counted by the admission."""
    decision = "denied" if refused.status == 403 else "refused"
    request.app[RUNTIME].metrics.webhooks.labels("oidc", decision, refused.reason).inc()
    if refused.status == 403:
        return _answer(403, accepted=False, reason=refused.reason)
    return refusal(refused.status, request.headers.get("Content-Type"), retry_after=refused.retry_after)


async def handle_deployment(request: web.Request) -> web.StreamResponse:
    """A CI job (GitLab, GitHub Actions, Forgejo Actions) marks its deploy. Every fact
    comes from the verified token (proxy/identity/forges.py); the body may only narrow the services
    to those the matched rule lists, and say ``"result": "failure"`` (a failed deployment: no
    marker, only the DORA fact of an entry with ``metrics: [dora]``, :mod:`.dora_facts`). A
    marker is a trace span, so the token's account must be allowed to send traces."""
    runtime = request.app[RUNTIME]
    admitted = await admit_http(request, signal="traces", mode="deployment")
    if isinstance(admitted, Refused):
        return _deployment_refused(request, admitted)
    identity, rule = admitted.identity, admitted.decision.rule
    claims = identity.claims
    issuer = admitted.policy.issuers.get(identity.issuer)  # None: an AWS caller, no CI claims
    facts = ci_facts(issuer.issuer, claims) if issuer is not None else None
    source = facts.provider if facts is not None else "oidc"

    def done(status: int, decision_: str, reason: str, **more: Any) -> web.Response:
        runtime.metrics.webhooks.labels(source, decision_, reason).inc()
        admitted.record(decision_, reason)
        return _answer(status, accepted=decision_ == "accepted", reason=reason, **more)

    if rule is None:
        return done(403, "denied", "no-rule-matched")
    try:
        raw = await read_limited(request, MAX_DEPLOYMENT_BODY, runtime.settings.body_timeout)
        body = untrusted.loads(raw) if raw.strip() else {}
    except BodyError as exc:
        return done(exc.status, "refused", exc.reason)
    except (ValueError, RecursionError):
        return done(400, "refused", "bad-json")
    if not isinstance(body, dict) or set(body) - {"service", "environment", "result"}:
        return done(400, "refused", "unknown-field")
    result = body.get("result", "success")
    if result not in dora_facts.RESULTS:
        return done(400, "refused", "unknown-field")
    allowed = rule.services
    if not allowed:
        return done(403, "denied", "rule-lists-no-services")
    services = allowed
    if "service" in body:
        if body["service"] not in allowed:
            return done(403, "denied", "service-not-allowed")
        services = (body["service"],)
    environment = claims.get("environment")
    if "environment" in body and body["environment"] != environment:
        return done(403, "denied", "environment-mismatch")
    if facts is None:
        return done(400, "refused", "token-not-from-ci")
    sha = facts.revision
    if not is_commit_sha(sha):
        return done(400, "refused", "token-has-no-sha")
    marker = Marker(
        provider=facts.provider,
        repository_url=facts.repository_url,
        repository_name=facts.repository.rsplit("/", 1)[-1],
        owner=facts.owner,
        ref_name=facts.ref_name,
        ref_type=facts.ref_type,
        revision=sha,
        event="deployment",
        delivery_id=f"{facts.provider}-job-{facts.job_key}",
        actor=facts.actor,
        environment=facts.environment,
        extra=facts.extra,
    )
    # The DORA facts first (an entry with metrics: [dora] naming the job's repository), then the
    # markers: one outbox event per (job, service) each, so a retried call stores nothing new.
    counted = []
    job, hooks, now = f"{identity.issuer}:{facts.job_key}", admitted.policy.webhooks, time.time_ns()
    for service in services:
        if await dora_facts.record_job_deployment(
            request.app[OUTBOX], hooks, facts, claims, job=job, service=service, result=result, at_ns=now
        ):
            counted.append(service)
    if result != "success":  # a failed deployment draws no marker
        if counted:
            return done(202, "accepted", "stored", services=counted)
        return done(202, "ignored", "deployment-not-successful")
    # One outbox event per (job, service): a job that marks all its services and then one of
    # them again draws each marker once, and one that marks them one call at a time draws all.
    stored_services = []
    for service in services:
        key = f"{facts.provider}:{identity.issuer}:{facts.job_key}:{service}"
        stored = await _store(
            request,
            key=key,
            digest=hashlib.sha256(key.encode()).hexdigest(),
            source=facts.provider,
            account=admitted.account.name,
            marker=marker,
            services=(service,),
        )
        if stored == "stored":
            stored_services.append(service)
    if not stored_services:
        return done(202, "ignored", "duplicate-delivery", duplicate=True)
    return done(202, "accepted", "stored", services=stored_services)


@web.middleware
async def outbox_unavailable(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Any door that stores in the outbox: a store that cannot commit is a 503 with
    Retry-After (counted and audited), never a 500 and never a 202."""
    try:
        return await handler(request)
    except OutboxUnavailable as exc:
        runtime = request.app[RUNTIME]
        runtime.metrics.webhooks.labels("outbox", "unavailable", "outbox-unavailable").inc()
        runtime.audit(kind="webhook", decision="unavailable", reason="outbox-unavailable", error=exc.reason)
        return web.json_response(
            {"accepted": False, "reason": "outbox-unavailable"},
            status=503,
            headers={"Retry-After": str(OUTBOX_RETRY_AFTER)},
        )


def add_webhook_routes(app: web.Application, runtime: Runtime) -> None:
    settings = runtime.settings

    async def storage(_app: web.Application) -> AsyncIterator[None]:
        outbox = open_outbox(
            settings.outbox_path,
            settings.data_dir,
            clock=time.time,
            dedupe_window=settings.dedupe_window,
            pool_size=settings.outbox_pool_size,
        )
        where = describe(settings.outbox_path, settings.data_dir)
        try:
            await outbox.open()
        except OutboxUnavailable as exc:
            await outbox.close()
            raise ConfigError(
                f"TRACEGATE_OUTBOX={where}: cannot open the outbox ({exc.reason}); make TRACEGATE_DATA_DIR "
                f"writable by uid {os.getuid()}, point TRACEGATE_OUTBOX at a writable file, or make the database "
                "reachable"
            ) from None
        app[OUTBOX] = outbox
        yield
        await outbox.close()

    async def sending(_app: web.Application) -> AsyncIterator[None]:
        # Its own session for the vendors' native deployment APIs; OTLP goes through the forwarder.
        async with aiohttp.ClientSession(skip_auto_headers=("User-Agent",)) as session:
            sender = Sender(
                app[OUTBOX], runtime, base=settings.outbox_retry_base, cap=settings.outbox_retry_max, session=session
            )
            loop = asyncio.get_running_loop()
            # The settler stores the DORA points that come due (metrics: [dora]); the sender sends them.
            tasks = [loop.create_task(sender.run()), loop.create_task(Settler(app[OUTBOX]).run())]
            yield
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # The outbox opens first — before the runtime starts fetching keys — so that an unusable
    # data directory stops start-up before anything else is under way; the sender starts last.
    app.cleanup_ctx.insert(0, storage)
    app.cleanup_ctx.append(sending)
    app.middlewares.append(outbox_unavailable)
    app.router.add_post("/webhooks/gitea", handle_gitea, expect_handler=expect_refusal(_gitea_refuses, webhook_limit))

    app.router.add_post("/webhooks/gitlab", handle_gitlab, expect_handler=expect_gitlab)
    app.router.add_post("/webhooks/github", handle_github, expect_handler=expect_github)
    app.router.add_post(
        "/v1/deployments",
        handle_deployment,
        expect_handler=expect_admitted(lambda _r: "traces", lambda _r: MAX_DEPLOYMENT_BODY, mode="deployment"),
    )
