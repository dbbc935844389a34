"""Stage 1 — who is this? Credentials in, a verified :class:`Identity` out.

The token comes as ``Authorization: Bearer <jwt>`` or, so that an existing Lightstep
exporter switches by changing only the value, in ``lightstep-access-token``. Verification
follows RFC 8725: the algorithm is pinned per issuer and never taken from the token;
``iss`` must equal a configured issuer exactly; ``aud`` must contain one of its audiences;
``exp``/``nbf``/``iat`` are checked against the injected clock with a leeway.

A verified token is cached by its SHA-256 until its ``exp`` so that a pipeline's repeated
requests cost a hash and a dict lookup, not an RSA verification.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import jwt
from cachetools import TLRUCache
from multidict import CIMultiDictProxy, MultiMapping

from proxy.errors import AuthError
from proxy.keys import KeySource
from proxy.metrics import Metrics
from proxy.policy.model import Policy

#: Tokens longer than this are refused unparsed (GitLab ID tokens are ~1 KB).
MAX_TOKEN_BYTES = 8192
_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_QUERY_TOKEN_NAMES = frozenset(
    {"access_token", "token", "id_token", "jwt", "lightstep-access-token", "lightstep_access_token"}
)

_JWT_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.InvalidAudienceError, "audience-mismatch"),
    (jwt.InvalidIssuerError, "issuer-mismatch"),
    (jwt.InvalidAlgorithmError, "algorithm-not-allowed"),
    (jwt.MissingRequiredClaimError, "missing-claim"),
    (jwt.InvalidSignatureError, "bad-signature"),
    (jwt.DecodeError, "malformed-token"),
)


@dataclass(frozen=True)
class Identity:
    """A verified token: the policy's name for its issuer, and its claims (read-only)."""

    issuer: str
    claims: Mapping[str, Any]
    expires_at: float


def extract_token(headers: CIMultiDictProxy[str], query: MultiMapping[str]) -> str:
    """The one bearer token of a request. Raises AuthError: ``missing-token``,
    ``conflicting-tokens`` (two different ones), ``token-in-query``, ``unsupported-auth-scheme``."""
    for name, value in query.items():
        if name.lower() in _QUERY_TOKEN_NAMES or _JWT_SHAPE.match(value):
            raise AuthError("token-in-query")
    found: set[str] = set()
    for value in headers.getall("Authorization", ()):
        scheme, _, credential = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise AuthError("unsupported-auth-scheme")
        found.add(credential.strip())
    for value in headers.getall("lightstep-access-token", ()):
        found.add(value.strip())
    if not found:
        raise AuthError("missing-token")
    if len(found) > 1:
        raise AuthError("conflicting-tokens")
    return found.pop()


class TokenVerifier:
    """Verifies tokens against one policy's issuers. Built anew on each policy load (so a
    removed issuer's tokens stop verifying at once); key sources outlive it."""

    def __init__(
        self,
        policy: Policy,
        keys: Mapping[str, KeySource],
        metrics: Metrics,
        *,
        clock: Callable[[], float],
        leeway: float = 60.0,
        cache_size: int = 100_000,
    ) -> None:
        self._issuers = {i.issuer: i for i in policy.issuers.values()}
        self._keys = keys
        self._metrics = metrics
        self._clock = clock
        self._leeway = leeway
        self._cache: TLRUCache[bytes, Identity] = TLRUCache(
            maxsize=cache_size, ttu=lambda _k, ident, _now: ident.expires_at, timer=clock
        )

    async def verify(self, token: str) -> Identity:
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            self._metrics.token_cache.labels("hit").inc()
            return cached
        self._metrics.token_cache.labels("miss").inc()
        identity = await self._verify(token)
        self._cache[digest] = identity
        return identity

    async def _verify(self, token: str) -> Identity:
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("token-too-large")
        if not _JWT_SHAPE.match(token):
            raise AuthError("malformed-token")
        try:
            unverified = jwt.api_jwt.decode_complete(token, options={"verify_signature": False})
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
            raise AuthError("malformed-token") from None
        header, payload = unverified["header"], unverified["payload"]
        if "crit" in header or header.get("b64", True) is not True:
            raise AuthError("malformed-token")
        iss = payload.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise AuthError("unknown-issuer")
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in issuer.algorithms:
            raise AuthError("algorithm-not-allowed", issuer=issuer.name)
        if not isinstance(kid, str):
            raise AuthError("missing-kid", issuer=issuer.name)
        key = await self._keys[issuer.name].key_for(kid, alg)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(issuer.algorithms),
                audience=list(issuer.audiences),
                issuer=issuer.issuer,
                options={
                    "require": ["exp", "iat", "iss", "aud", "sub"],
                    "verify_exp": False,  # checked below against the injected clock
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except Exception as exc:  # noqa: BLE001 - every failure is a refusal, mapped to a reason
            raise AuthError(_reason(exc), issuer=issuer.name) from None
        expires_at = self._check_times(claims, issuer.name)
        return Identity(issuer.name, MappingProxyType(claims), expires_at)

    def _check_times(self, claims: dict[str, Any], issuer: str) -> float:
        now = self._clock()
        times = {}
        for name in ("exp", "iat", "nbf"):
            value = claims.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise AuthError("malformed-token", issuer=issuer)
            times[name] = float(value)
        if now > times["exp"] + self._leeway:
            raise AuthError("token-expired", issuer=issuer)
        if "nbf" in times and times["nbf"] > now + self._leeway:
            raise AuthError("token-not-yet-valid", issuer=issuer)
        if times["iat"] > now + self._leeway:
            raise AuthError("token-issued-in-future", issuer=issuer)
        return times["exp"] + self._leeway


def _reason(exc: Exception) -> str:
    for kind, reason in _JWT_ERRORS:
        if isinstance(exc, kind):
            return reason
    return "invalid-token"
