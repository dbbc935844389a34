"""``POST /webhooks/gitlab``: GitLab pipeline and job hooks become CI trace spans.

The door: the body (bounded), the secret token in ``X-Gitlab-Token`` (GitLab sends it as
is; there is no signature), the project the payload names, the entry that lists that
project, the token checked against every secret of that entry in constant time (rotation:
list old and new), then :mod:`.gitlab` for the spans and :mod:`.ci_outbox` to store them.

Answers: 401 when the token is missing, when no secret of the project's entry matches, and
when no ``webhooks:`` entry names the project (by ``project_id``, preferred, or its path) —
the last two with the same answer (``bad-token``) after the same work, so that a sender
without a token cannot learn which projects have entries; the audit line and the metric say
``unknown-project``. 400 for a body that is not a JSON object; 202 with ``accepted: false``
for authentic events that draw nothing (an intermediate status, an unlisted event); 202
``accepted: true`` once every span is durably stored; 503 if the outbox cannot store
(GitLab retries). Refusals store nothing.

Idempotency: ``Idempotency-Key`` (GitLab ≥ 17.4) or ``X-Gitlab-Event-UUID`` names the
delivery in the audit log; the outbox keys are derived from the content (the span and its
final state), so a redelivery — same key or not — and two racing deliveries of the same
run's events store each span once.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from proxy import untrusted
from proxy.ci import gitlab
from proxy.ci.ci_outbox import store_spans
from proxy.ci.door import OUTBOX, read_limited
from proxy.ci.payload import Skip
from proxy.ci.signatures import DECOY_SECRETS
from proxy.ci.store import OutboxStore
from proxy.doors.ingest import RUNTIME
from proxy.doors.protocol import expect_refusal
from proxy.errors import BodyError
from proxy.policy.model import WebhookSource
from proxy.policy.webhooks import pinned_instance
from proxy.secrets import Secret

#: Longest token compared; GitLab's secret token field is free text, bounded here.
MAX_TOKEN_BYTES = 1024


def token_matches(presented: str, secrets: Iterable[Secret]) -> bool:
    """True if ``presented`` equals any secret. Digests are compared (equal lengths), every
    secret is tried (no early exit), each in constant time."""
    given = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
    ok = False
    for secret in secrets:
        ok |= hmac.compare_digest(given, hashlib.sha256(secret.reveal().encode()).digest())
    return ok


def candidates(hooks: Iterable[WebhookSource], project_id: str | None, path: str | None) -> list[WebhookSource]:
    """GitLab entries naming the project. Entries that bind its id are the only ones when
    any exist: the secret of an entry matched by path (which the sender also writes) must
    not be able to speak for a project another entry binds by its immutable id. An entry
    that binds ids matches those ids only, never by path (the policy refuses one with both;
    this holds whatever built the entries)."""
    gitlab_hooks = [h for h in hooks if h.source == "gitlab"]
    by_id = [h for h in gitlab_hooks if project_id is not None and project_id in h.project_ids]
    if by_id:
        return by_id
    return [h for h in gitlab_hooks if not h.project_ids and path is not None and h.repository.match_text(path)]


async def _refuses(request: web.Request) -> bool:
    token = request.headers.get("X-Gitlab-Token") or ""
    return not token or len(token) > MAX_TOKEN_BYTES


def _limit(request: web.Request) -> int:
    return request.app[RUNTIME].settings.webhook_max_body


#: ``Expect: 100-continue``: a delivery without a usable token, or over the size limit, is
#: refused before its body is invited.
expect_gitlab = expect_refusal(_refuses, _limit)


async def handle_gitlab(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    event = request.headers.get("X-Gitlab-Event") or ""
    delivery = request.headers.get("Idempotency-Key") or request.headers.get("X-Gitlab-Event-UUID") or ""

    def done(status: int, decision: str, reason: str, *, answered: str | None = None, **more: Any) -> web.Response:
        """Count, audit and answer; ``answered`` is the reason the sender is told when it
        must not learn the exact one (which the metric and the audit line keep)."""
        runtime.metrics.webhooks.labels("gitlab", decision, reason).inc()
        runtime.audit(
            kind="webhook",
            decision=decision,
            reason=reason,
            source="gitlab",
            webhook_event=event[:32] or None,
            delivery=delivery[:64] or None,
            repository=more.get("repository"),
            service_account=more.get("account"),
            sender_instance=more.get("sender_instance"),
        )
        fields = {k: v for k, v in more.items() if k in ("spans", "duplicate")}
        answer = {"accepted": decision == "accepted", "reason": answered or reason, **fields}
        return web.json_response(answer, status=status)

    token = request.headers.get("X-Gitlab-Token") or ""
    if not token or len(token) > MAX_TOKEN_BYTES:  # refused before the body is read
        return done(401, "refused", "missing-token" if not token else "bad-token")
    try:
        body = await read_limited(request, runtime.settings.webhook_max_body, runtime.settings.body_timeout)
    except BodyError as exc:
        return done(exc.status, "refused", exc.reason)
    try:
        payload = untrusted.loads(body)  # no NaN/Infinity
    except (ValueError, RecursionError):
        return done(400, "refused", "bad-json")
    if not isinstance(payload, dict):
        return done(400, "refused", "bad-json")
    project_id, path = gitlab.project_of(payload)
    shown = (path or (f"project {project_id}" if project_id else ""))[:200] or None
    found = candidates(runtime.gate.policy.webhooks, project_id, path)
    if not found:  # answered as a wrong token, after the same work: no oracle for which projects have entries
        token_matches(token, DECOY_SECRETS)
        return done(401, "refused", "unknown-project", answered="bad-token", repository=shown)
    hook = next((h for h in found if token_matches(token, h.secrets)), None)
    if hook is None:
        return done(401, "refused", "bad-token", repository=shown)
    facts = {"repository": shown, "account": hook.service_account}
    listed = gitlab.EVENTS.get(event)
    if listed is None or listed not in hook.events:
        return done(202, "ignored", "event-not-listed", **facts)
    named = gitlab.instance_for(payload, request.headers.get("X-Gitlab-Instance"))  # the sender's word
    pinned = pinned_instance(hook)
    instance = pinned or named
    if instance is None:
        return done(202, "ignored", "no-instance-url", **facts)
    if pinned and named and named != pinned:  # the pinned one is used; the audit line keeps what was sent
        facts["sender_instance"] = named
    drawn = gitlab.spans_for(event, payload, instance, with_jobs="job" not in hook.events)
    if isinstance(drawn, Skip):
        return done(202, "ignored", drawn.reason, **facts)
    outbox: OutboxStore = request.app[OUTBOX]
    outcomes = await store_spans(outbox, drawn.spans, source="gitlab", hook=hook)  # routes.outbox_unavailable: 503
    stored = sum(1 for o in outcomes if o == "stored")
    if not stored:
        return done(202, "ignored", "duplicate-delivery", duplicate=True, spans=0, **facts)
    return done(202, "accepted", "stored", spans=stored, **facts)
