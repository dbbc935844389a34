"""HTTP endpoints that become deployment markers: ``POST /webhooks/gitea`` (Gitea and
Forgejo, HMAC-signed) and ``POST /v1/deployments`` (a GitLab job with its ID token).

Both answer 202 only after the event is durably in the outbox; refusals store nothing.
When the outbox cannot commit (its database is down), they answer 503 with Retry-After,
which forges and GitLab jobs retry; never 202 without a commit.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.answers import refusal
from proxy.errors import AuthError, BodyError, OutboxUnavailable
from proxy.forward import declared_length
from proxy.identify import extract_token
from proxy.ingest import RUNTIME
from proxy.runtime import Runtime
from proxy.webhooks.gitea import Classified, classify, repository_name
from proxy.webhooks.marker import Marker, is_commit_sha, otlp_json
from proxy.webhooks.outbox import Added
from proxy.webhooks.sender import Sender
from proxy.webhooks.signatures import presented_signatures, verifies
from proxy.webhooks.store import OutboxStore, describe, open_outbox

log = logging.getLogger("tracegate.outbox")
OUTBOX: web.AppKey[OutboxStore] = web.AppKey("outbox")
#: Seconds a webhook sender is asked to wait when the outbox cannot commit.
OUTBOX_RETRY_AFTER = 5
MAX_DEPLOYMENT_BODY = 4096


async def read_limited(request: web.Request, limit: int, timeout: float) -> bytes:
    """The whole body, refused (413) past ``limit`` bytes and (408) past ``timeout`` seconds."""
    declared_length(request, limit)
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_any():
                body += chunk
                if len(body) > limit:
                    raise BodyError("body-too-large", 413)
    except TimeoutError:
        raise BodyError("body-timeout", 408) from None
    return bytes(body)


def _answer(status: int, **fields: Any) -> web.Response:
    return web.json_response(fields, status=status)


async def _store(
    request: web.Request, *, key: str, digest: str, source: str, account: str, marker: Marker, services: tuple[str, ...]
) -> Added:
    """Put the marker in the outbox (durably, before the caller answers 202)."""
    payload = otlp_json(marker, services, key, time.time_ns())
    return await request.app[OUTBOX].add(
        key=key, body_digest=digest, source=source, service_account=account, payload=payload
    )


async def handle_gitea(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    source = "forgejo" if "X-Forgejo-Event" in request.headers else "gitea"
    event = request.headers.get(f"X-{source.capitalize()}-Event") or ""
    delivery = request.headers.get(f"X-{source.capitalize()}-Delivery") or ""

    def done(status: int, decision: str, reason: str, **more: Any) -> web.Response:
        runtime.metrics.webhooks.labels(source, decision, reason).inc()
        runtime.audit(
            kind="webhook",
            decision=decision,
            reason=reason,
            source=source,
            webhook_event=event[:32] or None,
            delivery=delivery[:64] or None,
            repository=more.get("repository"),
            service_account=more.get("account"),
        )
        return _answer(
            status,
            accepted=decision == "accepted",
            reason=reason,
            **{k: v for k, v in more.items() if k in ("services", "duplicate")},
        )

    try:
        body = await read_limited(request, runtime.settings.webhook_max_body, runtime.settings.body_timeout)
    except BodyError as exc:
        return done(exc.status, "refused", exc.reason)
    if not event or not delivery:
        return done(400, "refused", "missing-event-or-delivery-header")
    signatures = presented_signatures(request.headers)
    if not signatures:
        return done(401, "refused", "missing-signature")
    signed = body
    if request.content_type == "application/x-www-form-urlencoded":
        form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=20)
        if len(form.get("payload", [])) != 1:
            return done(400, "refused", "bad-form")
        signed = form["payload"][0].encode("utf-8")
    try:
        payload = json.loads(signed)
    except (ValueError, RecursionError):
        return done(400, "refused", "bad-json")
    if not isinstance(payload, dict):
        return done(400, "refused", "bad-json")
    repository = repository_name(payload)
    candidates = [
        hook
        for hook in runtime.gate.policy.webhooks
        if hook.source == source and repository is not None and hook.repository.match_text(repository)
    ]
    if not candidates:
        return done(403, "refused", "unknown-repository")
    hook = next((h for h in candidates if verifies(signed, signatures, h.secrets)), None)
    if hook is None:
        return done(401, "refused", "bad-signature", repository=repository)
    facts = {"repository": repository, "account": hook.service_account}
    classified = classify(source, event, delivery, payload)
    if not isinstance(classified, Classified):
        return done(202, "ignored", classified.reason, **facts)
    if classified.kind not in hook.events:
        return done(202, "ignored", "event-not-listed", **facts)
    if not hook.refs.match_text(classified.ref):
        return done(202, "ignored", "ref-not-listed", **facts)
    digest = hashlib.sha256(f"{source}\0{event}\0".encode() + signed).hexdigest()
    stored = await _store(
        request,
        key=f"{source}:{delivery}",
        digest=digest,
        source=source,
        account=hook.service_account,
        marker=classified.marker,
        services=hook.services,
    )
    if stored != "stored":
        return done(202, "ignored", stored, duplicate=True, **facts)
    return done(202, "accepted", "stored", services=list(hook.services), **facts)


async def handle_deployment(request: web.Request) -> web.Response:
    """A GitLab job marks its deploy. Every fact comes from the verified token; the body
    may only narrow the services to those the matched rule lists."""
    runtime = request.app[RUNTIME]
    gate = runtime.gate
    content_type = request.headers.get("Content-Type")
    try:
        identity = await gate.verifier.verify(extract_token(request.headers, request.query))
    except AuthError as exc:
        runtime.metrics.webhooks.labels("gitlab", "refused", exc.reason).inc()
        runtime.audit(kind="deployment", decision="refused", reason=exc.reason, issuer=exc.issuer)
        return refusal(exc.status, content_type, retry_after=5 if exc.status == 503 else None)
    claims = identity.claims
    decision = gate.decide(identity, None)

    def done(status: int, decision_: str, reason: str, **more: Any) -> web.Response:
        runtime.metrics.webhooks.labels("gitlab", decision_, reason).inc()
        runtime.audit(
            kind="deployment",
            decision=decision_,
            reason=reason,
            issuer=identity.issuer,
            claims=claims,
            rule=decision.rule.name if decision.rule else None,
            service_account=decision.account.name if decision.account else None,
        )
        return _answer(status, accepted=decision_ == "accepted", reason=reason, **more)

    if not decision.allowed or decision.rule is None or decision.account is None:
        return done(403, "denied", decision.reason)
    try:
        raw = await read_limited(request, MAX_DEPLOYMENT_BODY, runtime.settings.body_timeout)
        body = json.loads(raw) if raw.strip() else {}
    except BodyError as exc:
        return done(exc.status, "refused", exc.reason)
    except (ValueError, RecursionError):
        return done(400, "refused", "bad-json")
    if not isinstance(body, dict) or set(body) - {"service", "environment"}:
        return done(400, "refused", "unknown-field")
    allowed = decision.rule.services
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
    sha = claims.get("sha")
    if not is_commit_sha(sha):
        return done(400, "refused", "token-has-no-sha")
    project = str(claims.get("project_path", ""))
    job = str(claims.get("job_id", ""))
    issuer_url = gate.policy.issuers[identity.issuer].issuer
    marker = Marker(
        provider="gitlab",
        repository_url=f"{issuer_url}/{project}",
        repository_name=project.rsplit("/", 1)[-1],
        owner=str(claims.get("namespace_path", "")),
        ref_name=str(claims.get("ref", "")),
        ref_type=str(claims.get("ref_type", "branch")),
        revision=sha,
        event="deployment",
        delivery_id=f"gitlab-job-{job}",
        actor=str(claims["user_login"]) if claims.get("user_login") else None,
        environment=str(environment) if environment else None,
        extra={
            k: str(claims[c])
            for k, c in (
                ("cicd.pipeline.run.id", "pipeline_id"),
                ("tracegate.job.id", "job_id"),
                ("tracegate.project_path", "project_path"),
            )
            if claims.get(c)
        },
    )
    key = f"gitlab:{identity.issuer}:{job}:{','.join(services)}"
    stored = await _store(
        request,
        key=key,
        digest=hashlib.sha256(key.encode()).hexdigest(),
        source="gitlab",
        account=decision.account.name,
        marker=marker,
        services=services,
    )
    if stored != "stored":
        return done(202, "ignored", stored, duplicate=True)
    return done(202, "accepted", "stored", services=list(services))


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

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        outbox = open_outbox(
            settings.outbox_path,
            settings.data_dir,
            clock=time.time,
            dedupe_window=settings.dedupe_window,
            pool_size=settings.outbox_pool_size,
        )
        await outbox.open()
        log.info("outbox open", extra={"outbox": describe(settings.outbox_path, settings.data_dir)})
        app[OUTBOX] = outbox
        sender = Sender(outbox, runtime, base=settings.outbox_retry_base, cap=settings.outbox_retry_max)
        task = asyncio.get_running_loop().create_task(sender.run())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await outbox.close()

    app.cleanup_ctx.append(lifecycle)
    app.middlewares.append(outbox_unavailable)
    app.router.add_post("/webhooks/gitea", handle_gitea)
    app.router.add_post("/v1/deployments", handle_deployment)
