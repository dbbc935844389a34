"""``POST /webhooks/github``: GitHub's signed webhooks become deployment markers and CI traces.

The door: the event and delivery headers (``X-GitHub-Event``, ``X-GitHub-Delivery``), the
bounded body, the repository it names, the entry naming that repository — by
``repository.id`` when an entry binds it (``repository_id:``), else by ``full_name``
(:func:`.github.candidates`) — and ``X-Hub-Signature-256`` checked against every secret of
that entry: HMAC-SHA256 over the raw body, whatever its content type (GitHub signs the body
it sends; a form delivery's JSON is its ``payload`` field), in constant time
(:mod:`.signatures`; rotation: list old and new). Then ``push``/``release``/
``deployment_status`` → markers (:mod:`.github`, :mod:`.marker_outbox`), ``workflow_run``/
``workflow_job`` → spans (:mod:`.actions`), ``ping`` → answered, stored nothing.

Answers are the Gitea door's: 401 ``bad-signature`` for a missing or wrong signature and —
after the same work — for a repository no entry names (the audit line and metric say
``unknown-repository``), so a sender cannot learn which repositories are configured; 400
for a missing header or a body that is not a JSON object; 202 ``accepted: false`` for
authentic events that draw nothing; 202 ``accepted: true`` once stored durably; 503 when the
outbox cannot store (GitHub does not retry by itself: redeliver from the hook's page).

Idempotency: a marker is keyed on ``X-GitHub-Delivery`` (a redelivery of the same delivery
is one event) and deduplicated by body within the window; spans are keyed on their content
(:meth:`.pipeline.CiSpan.outbox_key`), so any redelivery stores each span once.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web
from multidict import CIMultiDictProxy

from proxy import untrusted
from proxy.ci import actions, dora_facts, github
from proxy.ci.door import OUTBOX, read_limited, refused_signature, sender_facts, signed_entry
from proxy.ci.gitea import Classified
from proxy.ci.marker_outbox import store_marker
from proxy.ci.signatures import hub_signatures
from proxy.doors.ingest import RUNTIME
from proxy.doors.protocol import expect_refusal
from proxy.errors import BodyError
from proxy.policy.webhooks import markers_of, pinned_instance

#: An event name or delivery id as GitHub sends them (a word, a GUID).
_HEADER_TOKEN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
#: More fields than this in a form-encoded delivery is not GitHub's form (it sends one).
MAX_FORM_FIELDS = 20


def _headers_refusal(headers: CIMultiDictProxy[str]) -> tuple[int, str, str | None] | None:
    """(status, reason, header) for a delivery missing what every authentic one carries."""
    for name in ("X-GitHub-Event", "X-GitHub-Delivery"):
        value = headers.get(name)
        if not value:
            return 400, "missing-header", name
        if not _HEADER_TOKEN.fullmatch(value):  # it becomes part of the outbox's key
            return 400, "bad-header", name
    if not hub_signatures(headers):
        return 401, "missing-signature", None
    return None


async def _refuses(request: web.Request) -> bool:
    return _headers_refusal(request.headers) is not None


def _limit(request: web.Request) -> int:
    return request.app[RUNTIME].settings.webhook_max_body


#: ``Expect: 100-continue``: a delivery without its headers, or over the size limit, is
#: refused before its body is invited.
expect_github = expect_refusal(_refuses, _limit)


def _payload(body: bytes, content_type: str) -> dict[str, Any] | None:
    """The delivery's JSON object: the body, or a form delivery's single ``payload`` field."""
    text = body
    if content_type == "application/x-www-form-urlencoded":
        try:
            form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=MAX_FORM_FIELDS)
        except ValueError:
            return None
        if len(form.get("payload", [])) != 1:
            return None
        text = form["payload"][0].encode("utf-8")
    try:
        payload = untrusted.loads(text)
    except (ValueError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


async def handle_github(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    event = request.headers.get("X-GitHub-Event") or ""
    delivery = request.headers.get("X-GitHub-Delivery") or ""

    def done(status: int, decision: str, reason: str, *, answered: str | None = None, **more: Any) -> web.Response:
        """Count, audit and answer; ``answered`` is the reason the sender is told when it
        must not learn the exact one (which the metric and the audit line keep)."""
        runtime.metrics.webhooks.labels(github.SOURCE, decision, reason).inc()
        runtime.audit(
            kind="webhook",
            decision=decision,
            reason=reason,
            source=github.SOURCE,
            webhook_event=event[:32] or None,
            delivery=delivery[:64] or None,
            repository=more.get("repository"),
            service_account=more.get("account"),
            sender_instance=more.get("sender_instance"),
        )
        fields = {k: v for k, v in more.items() if k in ("services", "duplicate", "header")}
        answer = {"accepted": decision == "accepted", "reason": answered or reason, **fields}
        return web.json_response(answer, status=status)

    missing = _headers_refusal(request.headers)
    if missing is not None:
        status, reason, header = missing
        return done(status, "refused", reason, **({"header": header} if header else {}))
    try:
        body = await read_limited(request, runtime.settings.webhook_max_body, runtime.settings.body_timeout)
    except BodyError as exc:
        return done(exc.status, "refused", exc.reason)
    payload = _payload(body, request.content_type)
    if payload is None:
        return done(400, "refused", "bad-json")
    repository_id, full_name = github.repository_of(payload)
    shown = (full_name or (f"repository {repository_id}" if repository_id else ""))[:200] or None
    signatures = hub_signatures(request.headers)
    found = github.candidates(runtime.gate.policy.webhooks, repository_id, full_name)
    hook = signed_entry(found, body, signatures)
    if isinstance(hook, str):
        return done(401, "refused", hook, repository=shown, **refused_signature(hook))
    pinned, facts = pinned_instance(hook), sender_facts(hook, payload, shown)
    if event == "ping":  # sent when the hook is made: authentic, nothing to draw
        return done(202, "ignored", "ping", **facts)
    if event in actions.EVENTS:
        status, decision, reason, more = await actions.receive(request.app[OUTBOX], hook, github.SOURCE, event, payload)
        return done(status, decision, reason, **more, **facts)
    classified = github.markers_for(event, delivery, payload, instance=pinned)
    # metrics: [dora]: pushes and deployments, failed ones too, are facts (proxy/ci/dora_facts.py)
    failed = not isinstance(classified, Classified) and classified.reason == "deployment-not-successful"
    recorded = (failed or isinstance(classified, Classified)) and await dora_facts.record(
        request.app[OUTBOX], hook, event, payload
    )
    if recorded and failed:
        return done(202, "accepted", "stored", **facts)
    if not isinstance(classified, Classified):
        if classified.reason == "repository-mismatch":
            return done(400, "refused", classified.reason, **facts)
        return done(202, "ignored", classified.reason, **facts)
    if classified.kind not in hook.events:
        return done(202, "ignored", "event-not-listed", **facts)
    if not hook.refs.match_text(classified.ref):
        return done(202, "ignored", "ref-not-listed", **facts)
    stored = await store_marker(  # routes.outbox_unavailable: 503
        request.app[OUTBOX],
        key=f"{github.SOURCE}:{delivery}",
        digest=hashlib.sha256(f"{github.SOURCE}\0{event}\0".encode() + body).hexdigest(),
        source=github.SOURCE,
        account=hook.service_account,
        marker=classified.marker,
        services=hook.services,
        time_unix_nano=time.time_ns(),
        markers=markers_of(hook),
    )
    if stored != "stored":
        return done(202, "ignored", stored, duplicate=True, **facts)
    return done(202, "accepted", "stored", services=list(hook.services), **facts)
