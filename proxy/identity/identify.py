"""Stage 1 — who is this? Credentials in, a verified :class:`Identity` out.

The token comes as ``Authorization: Bearer <jwt>`` or, so that an existing Lightstep
exporter switches by changing only the value, in ``lightstep-access-token``. Verification
follows RFC 8725: the algorithm is pinned per issuer and never taken from the token;
the signature is checked with PyJWT's implementation of that algorithm;
``iss`` must equal a configured issuer exactly; ``aud`` must contain one of its audiences;
``exp``/``nbf``/``iat`` are checked against the injected clock with a leeway.

A verified token is cached by its SHA-256 until its ``exp`` so that a pipeline's repeated
requests cost a hash and a dict lookup, not an RSA verification. The cache holds each
identity as a plain tuple of atoms (:mod:`proxy.identity.token_cache`): its claims as the JSON text
that was signed, its audit fields escaped once, and its policy decisions as numbers — so
that 100,000 cached identities add nothing for the cycle collector to walk.

A bearer credential that starts ``aws-sts.`` is not a JWT but a presigned
``sts:GetCallerIdentity`` request, for an issuer of ``kind: aws`` (:mod:`proxy.identity.aws`):
checked here, confirmed by STS, then cached and decided like any token, until its
``X-Amz-Date`` plus the issuer's ``max_age``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jwt
from cachetools import TTLCache
from multidict import MultiMapping, istr

from proxy import untrusted
from proxy.errors import AuthError
from proxy.identity import aws
from proxy.identity.forges import audit_identity
from proxy.identity.keys import KeySource
from proxy.identity.token_cache import ExpiringCache
from proxy.observe.audit import claims_fields
from proxy.observe.metrics import Metrics
from proxy.policy.model import Policy

#: Tokens longer than this are refused unparsed (GitLab ID tokens are ~1 KB; the header
#: line limit, 8190 bytes, refuses anything much longer before it gets here).
MAX_TOKEN_BYTES = 6144
_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_AUTHORIZATION = istr("Authorization")
_ACCESS_TOKEN = istr("lightstep-access-token")
_QUERY_TOKEN_NAMES = frozenset(
    {"access_token", "token", "id_token", "jwt", "lightstep-access-token", "lightstep_access_token"}
)


class Identity(NamedTuple):
    """A verified token. Every field is an atom, so the cache can keep the fields as a plain
    tuple (which the cycle collector stops tracking) and hand out an Identity per request."""

    #: When the cache lets go of it: ``exp`` plus the leeway (seconds since the epoch).
    expires_at: float
    #: The policy's name for its issuer.
    issuer: str
    #: The token's ``exp`` claim (seconds since the epoch).
    exp: float
    #: The verified claims: the JSON text that was signed (see :attr:`claims`).
    payload: str
    #: The audit line's identity fields, named alike for every forge
    #: (:func:`proxy.identity.forges.audit_identity`), bounded and escaped once at
    #: verification (:func:`proxy.observe.audit.claims_fields`).
    audit: str = claims_fields(None)
    #: The policy's decisions for this token, numbered (:mod:`proxy.policy.memo`); empty when
    #: the verifier was built without a decision book.
    decisions: tuple[int, ...] = ()

    @property
    def claims(self) -> Mapping[str, Any]:
        """The claims, read-only. Decoded from :attr:`payload` on every access: a caller that
        reads several keeps the mapping (the request path reads none: its decisions and audit
        fields were made at verification)."""
        return MappingProxyType(decode_claims(self.payload))


def decode_claims(payload: str) -> dict[str, Any]:
    """A cached identity's claims from its payload (text the verifier has already parsed
    strictly, so plain ``json.loads`` reads it back)."""
    claims: dict[str, Any] = json.loads(payload)
    return claims


def extract_token(headers: MultiMapping[str], query: Mapping[str, str] | MultiMapping[str]) -> str:
    """The one bearer token of a request. Raises AuthError: ``missing-token``,
    ``conflicting-tokens`` (two different ones), ``token-in-query``, ``unsupported-auth-scheme``."""
    if query:
        for name, value in query.items():
            if name.lower() in _QUERY_TOKEN_NAMES or _JWT_SHAPE.match(value):
                raise AuthError("token-in-query")
    found: str | None = None
    conflicting = False
    for value in headers.getall(_AUTHORIZATION, ()):
        scheme, _, credential = value.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthError("unsupported-auth-scheme")
        conflicting = conflicting or (found is not None and found != credential)
        found = credential
    for value in headers.getall(_ACCESS_TOKEN, ()):
        credential = value.strip()
        conflicting = conflicting or (found is not None and found != credential)
        found = credential
    if found is None:
        raise AuthError("missing-token")
    if conflicting:
        raise AuthError("conflicting-tokens")
    return found


#: Refusals that no retry of the same token can turn into a success (under one policy).
PERMANENT_REFUSALS = frozenset(
    {
        "malformed-token",
        "token-too-large",
        "bad-signature",
        "algorithm-not-allowed",
        "audience-mismatch",
        "missing-claim",
        "token-expired",
        "unknown-issuer",
        "missing-kid",
        "key-algorithm-mismatch",
        "malformed-claims",
        "aws-request-malformed",
        "aws-action-not-allowed",
        "aws-audience-unsigned",
        "aws-audience-mismatch",
        "aws-endpoint-not-allowed",
        "aws-request-expired",
        "aws-signature-rejected",
        "aws-request-rejected",
    }
)
REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub")
TIME_CLAIMS = ("exp", "iat", "nbf")
#: Time claims outside [0, this) are not times (this is the year 5138): ``malformed-claims``.
MAX_TIME = 1e11


def _b64(segment: str) -> bytes:
    if len(segment) % 4 == 1:
        raise ValueError("impossible base64url length")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


class TokenVerifier:
    """Verifies tokens against one policy's issuers. Built anew on each policy load (so a
    removed issuer's tokens stop verifying at once); key sources outlive it.

    The token is parsed once (the alphabet is checked by one regex first), and the
    signature is checked with PyJWT's algorithm implementation for the key's pinned
    algorithm. Permanent refusals (a bad signature, an expired token…) are remembered by
    digest for ``refusal_ttl`` seconds, so a client repeating a bad token costs a hash."""

    def __init__(
        self,
        policy: Policy,
        keys: Mapping[str, KeySource],
        metrics: Metrics,
        *,
        clock: Callable[[], float],
        leeway: float = 60.0,
        cache_size: int = 100_000,
        refusal_ttl: float = 60.0,
        decisions: Callable[[str, Mapping[str, Any]], tuple[int, ...]] | None = None,
        sts: aws.StsClient | None = None,
    ) -> None:
        """``decisions`` numbers a verified token's policy decisions (issuer name and claims
        in), kept with it in the cache: :meth:`proxy.policy.memo.DecisionBook.numbers`.
        ``sts`` asks STS about the ``aws`` issuers' signed requests (default: a client with
        its own bounds, opening a session per call)."""
        self._issuers = {i.issuer: i for i in policy.issuers.values()}
        self._aws_issuers = policy.aws_issuers
        self._sts = sts if sts is not None or not policy.aws_issuers else aws.StsClient()
        self._keys = keys
        self._metrics = metrics
        self._clock = clock
        self._leeway = leeway
        self._decisions = decisions
        #: Hex digest → the fields of an :class:`Identity`, until its ``expires_at``.
        self.cache = ExpiringCache(cache_size, clock)
        self._refused: TTLCache[str, AuthError] = TTLCache(maxsize=10_000, ttl=refusal_ttl, timer=clock)
        self._hits = metrics.token_cache.labels("hit")
        self._misses = metrics.token_cache.labels("miss")
        self._refused_hits = metrics.token_cache.labels("refused-hit")

    async def verify(self, token: str) -> Identity:
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
        cached = self.cache.get(digest)
        if cached is not None:
            self._hits.inc()
            return Identity(*cached)
        refused = self._refused.get(digest)
        if refused is not None:
            self._refused_hits.inc()
            raise AuthError(refused.reason, issuer=refused.issuer)
        self._misses.inc()
        try:
            identity = await self._verify(token)
        except AuthError as exc:
            if exc.reason in PERMANENT_REFUSALS:
                self._refused[digest] = exc
            raise
        self.cache.put(digest, tuple(identity))
        return identity

    async def _verify(self, token: str) -> Identity:
        if token.startswith(aws.TOKEN_PREFIX):
            return await self._verify_aws(token)
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("token-too-large")
        if not _JWT_SHAPE.match(token):
            raise AuthError("malformed-token")
        head_b64, payload_b64, signature_b64 = token.split(".")
        try:
            header = untrusted.loads(_b64(head_b64))
            payload = untrusted.decode(_b64(payload_b64))
            claims = untrusted.loads(payload)
            signature = _b64(signature_b64)
        except untrusted.NonFiniteNumber:
            raise AuthError("malformed-claims") from None
        except (ValueError, RecursionError):
            raise AuthError("malformed-token") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise AuthError("malformed-token")
        if "crit" in header or header.get("b64", True) is not True:
            raise AuthError("malformed-token")
        iss = claims.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise AuthError("unknown-issuer")
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in issuer.algorithms:
            raise AuthError("algorithm-not-allowed", issuer=issuer.name)
        if not isinstance(kid, str):
            raise AuthError("missing-kid", issuer=issuer.name)
        key = await self._keys[issuer.name].key_for(kid, alg)
        try:
            valid = key.Algorithm.verify(f"{head_b64}.{payload_b64}".encode("ascii"), key.key, signature)
        except (ValueError, TypeError, jwt.PyJWTError):
            valid = False
        if not valid:
            raise AuthError("bad-signature", issuer=issuer.name)
        for name in REQUIRED_CLAIMS:
            if name not in claims:
                raise AuthError("missing-claim", issuer=issuer.name)
        aud = claims["aud"]
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(isinstance(a, str) and a in issuer.audiences for a in audiences):
            raise AuthError("audience-mismatch", issuer=issuer.name)
        exp = self._check_times(claims, issuer.name)
        decisions = self._decisions(issuer.name, claims) if self._decisions is not None else ()
        return Identity(exp + self._leeway, issuer.name, exp, payload, claims_fields(audit_identity(claims)), decisions)

    async def _verify_aws(self, token: str) -> Identity:
        """A presigned GetCallerIdentity request: checked (proxy/identity/aws.py), then sent
        to STS, whose answer gives the claims. Good until ``X-Amz-Date + max_age``."""
        if self._sts is None:
            raise AuthError("unknown-issuer")
        request = aws.parse_token(token)
        issuer = aws.choose_issuer(request, self._aws_issuers, now=self._clock(), leeway=self._leeway)
        claims = aws.caller_claims(await self._sts.caller(request, issuer.name), issuer)
        exp = request.signed_at + issuer.max_age
        payload = json.dumps(claims, separators=(",", ":"))
        decisions = self._decisions(issuer.name, claims) if self._decisions is not None else ()
        return Identity(exp, issuer.name, exp, payload, claims_fields(audit_identity(claims)), decisions)

    def _check_times(self, claims: dict[str, Any], issuer: str) -> float:
        """``exp``/``iat`` (required) and ``nbf`` against the clock; returns ``exp``. Each
        present time claim must be a finite JSON number (not a bool, not null) in
        [0, MAX_TIME); anything else is ``malformed-claims``: a time that cannot be compared
        must not pass a comparison."""
        times: dict[str, float] = {}
        for name in TIME_CLAIMS:
            if name not in claims:
                continue
            value = claims[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < MAX_TIME:
                raise AuthError("malformed-claims", issuer=issuer)
            times[name] = float(value)
        now = self._clock()
        if now > times["exp"] + self._leeway:
            raise AuthError("token-expired", issuer=issuer)
        if "nbf" in times and times["nbf"] > now + self._leeway:
            raise AuthError("token-not-yet-valid", issuer=issuer)
        if times["iat"] > now + self._leeway:
            raise AuthError("token-issued-in-future", issuer=issuer)
        return times["exp"]
