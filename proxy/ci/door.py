"""What the webhook doors share: the outbox they store into (an app key) and the bounded
read of a delivery's body. Its own module so that ``routes`` (Gitea, Forgejo, deployments;
it registers every webhook door) and ``gitlab_routes`` both import it, and not each other."""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.ci.store import OutboxStore
from proxy.errors import BodyError
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
