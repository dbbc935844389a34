"""HMAC-SHA256 webhook signatures, as GitHub, Gitea and Forgejo send them.

Gitea signs the JSON payload (for form-encoded deliveries, the ``payload`` field's value,
not the form body) and sends the hex digest in ``X-Gitea-Signature`` (Forgejo:
``X-Forgejo-Signature``) and, GitHub-style, ``sha256=<hex>`` in ``X-Hub-Signature-256``.
GitHub signs the raw request body, whatever its content type, and sends only
``X-Hub-Signature-256`` (:func:`hub_signatures`; its SHA-1 ``X-Hub-Signature`` is ignored).
Without a secret those headers are sent empty; SHA-1 (``X-Hub-Signature``) is not accepted.
Every listed secret verifies (rotation without downtime); comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from multidict import CIMultiDictProxy

from proxy.secrets import Secret

BARE_HEX_HEADERS = ("X-Gitea-Signature", "X-Forgejo-Signature", "X-Gogs-Signature")
#: Checked against when no entry names the sender's repository (or GitLab project), so that
#: answer costs what a wrong signature or token costs. The result is always thrown away:
#: that answer is a refusal whatever it says.
DECOY_SECRETS = (Secret("tracegate-no-entry-" + "0" * 44),)


def hub_signatures(headers: CIMultiDictProxy[str]) -> list[str]:
    """The non-empty ``X-Hub-Signature-256: sha256=<hex>`` digests a request carries, lower-case."""
    found = []
    for value in headers.getall("X-Hub-Signature-256", ()):
        scheme, _, digest = value.strip().partition("=")
        if scheme.lower() == "sha256" and digest:
            found.append(digest.lower())
    return found


def presented_signatures(headers: CIMultiDictProxy[str]) -> list[str]:
    """The non-empty SHA-256 signatures a request carries, lower-case hex."""
    found = [v.strip().lower() for name in BARE_HEX_HEADERS for v in headers.getall(name, ()) if v.strip()]
    return found + hub_signatures(headers)


def verifies(signed: bytes, signatures: Iterable[str], secrets: Iterable[Secret]) -> bool:
    """True if any presented signature is the HMAC-SHA256 of ``signed`` under any secret.
    Every pair is compared (no early exit on the secret), in constant time each."""
    expected = [hmac.new(s.reveal().encode(), signed, hashlib.sha256).hexdigest() for s in secrets]
    ok = False
    for presented in signatures:
        for digest in expected:
            ok |= hmac.compare_digest(presented.encode("ascii", "replace"), digest.encode())
    return ok
