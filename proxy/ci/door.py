"""What the webhook doors share: the outbox they store into (an app key) and the bounded
read of a delivery's body. Its own module so that ``routes`` (Gitea, Forgejo, deployments;
it registers every webhook door) and ``gitlab_routes`` both import it, and not each other."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from proxy.ci.gitea import repository_instance
from proxy.ci.signatures import DECOY_SECRETS, verifies
from proxy.ci.store import OutboxStore
from proxy.errors import BodyError
from proxy.policy.model import WebhookSource
from proxy.upstream.forward import BODY_READ_ERRORS, declared_length

OUTBOX: web.AppKey[OutboxStore] = web.AppKey("outbox")
#: Seconds a webhook sender is asked to wait when the outbox cannot commit.
OUTBOX_RETRY_AFTER = 5


async def read_limited(request: web.Request, limit: int, timeout: float) -> bytes:
    """The whole body, refused (413) past ``limit`` bytes, (408) past ``timeout`` seconds,
    and (400 ``body-incomplete``) when the client breaks off or its framing is broken."""
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
    except BODY_READ_ERRORS:
        raise BodyError("body-incomplete", 400) from None
    return bytes(body)


def signed_entry(candidates: Sequence[WebhookSource], signed: bytes, signatures: Sequence[str]) -> WebhookSource | str:
    """The entry whose secret signed ``signed``, or the reason none did. No entry for the
    repository (``unknown-repository``) costs the same work as a wrong signature (a decoy
    HMAC) and is answered as one, so a sender cannot learn which entries exist."""
    if not candidates:
        verifies(signed, signatures, DECOY_SECRETS)
        return "unknown-repository"
    hook = next((h for h in candidates if verifies(signed, signatures, h.secrets)), None)
    return hook if hook is not None else "bad-signature"


def refused_signature(reason: str) -> dict[str, str]:
    """What an unauthenticated delivery's answer says: always ``bad-signature``."""
    return {"answered": "bad-signature"} if reason != "bad-signature" else {}


def sender_facts(hook: WebhookSource, payload: dict[str, Any], repository: str | None) -> dict[str, Any]:
    """The audit facts of an authenticated delivery; ``sender_instance`` when the entry pins
    another forge instance than the payload's ``html_url`` names (the pinned one is used)."""
    pinned, named = hook.instance, repository_instance(payload)
    return {
        "repository": repository,
        "account": hook.service_account,
        "sender_instance": named if pinned and named and named != pinned else None,
    }
