"""HTTP endpoints that become deployment markers: ``POST /webhooks/gitea`` (Gitea and
Forgejo, HMAC-signed) and ``POST /v1/deployments`` (a GitLab job with its ID token).

Both answer 202 only after the event is durably in the outbox; refusals store nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from proxy.answers import refusal
from proxy.errors import AuthError, BodyError
from proxy.forges import ci_facts
from proxy.forward import declared_length
from proxy.identify import extract_token
from proxy.ingest import RUNTIME
from proxy.runtime import Runtime
from proxy.webhooks.gitea import Classified, classify, repository_name
from proxy.webhooks.marker import Marker, is_commit_sha, otlp_json
from proxy.webhooks.outbox import Added, Outbox
from proxy.webhooks.sender import Sender
from proxy.webhooks.signatures import presented_signatures, verifies

OUTBOX = web.AppKey("outbox", Outbox)
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
    """A CI job (GitLab, GitHub Actions, Forgejo Actions) marks its deploy. Every fact
    comes from the verified token (proxy/forges.py); the body may only narrow the services
    to those the matched rule lists."""
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
    facts = ci_facts(gate.policy.issuers[identity.issuer].issuer, claims)
    source = facts.provider if facts is not None else "oidc"

    def done(status: int, decision_: str, reason: str, **more: Any) -> web.Response:
        runtime.metrics.webhooks.labels(source, decision_, reason).inc()
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
    key = f"{facts.provider}:{identity.issuer}:{facts.job_key}:{','.join(services)}"
    stored = await _store(
        request,
        key=key,
        digest=hashlib.sha256(key.encode()).hexdigest(),
        source=facts.provider,
        account=decision.account.name,
        marker=marker,
        services=services,
    )
    if stored != "stored":
        return done(202, "ignored", stored, duplicate=True)
    return done(202, "accepted", "stored", services=list(services))


def add_webhook_routes(app: web.Application, runtime: Runtime) -> None:
    settings = runtime.settings

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        outbox = Outbox(settings.outbox_file, clock=time.time, dedupe_window=settings.dedupe_window)
        await outbox.open()
        app[OUTBOX] = outbox
        sender = Sender(outbox, runtime, base=settings.outbox_retry_base, cap=settings.outbox_retry_max)
        task = asyncio.get_running_loop().create_task(sender.run())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await outbox.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/webhooks/gitea", handle_gitea)
    app.router.add_post("/v1/deployments", handle_deployment)
