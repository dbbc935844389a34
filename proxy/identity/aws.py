"""AWS IAM callers: a presigned ``sts:GetCallerIdentity`` request in, an AWS identity out.

The pattern of Vault's ``aws`` auth ``iam`` method and Teleport's IAM join. A job signs
(SigV4, with whatever credentials it holds: an instance profile, a task role, IRSA, env
keys) a ``GetCallerIdentity`` request that names tracegate in a signed header,
``X-Tracegate-Server-ID``, and hands it to tracegate instead of sending it to AWS::

    Authorization: Bearer aws-sts.<base64url(JSON {"method", "url", "headers", "body"})>

(``tracegate aws-token`` prints it: :func:`presign`). Only AWS holds the secret key, so
tracegate cannot check the signature itself; it checks everything else, then lets STS check
the signature by sending it the request, and believes STS's answer:

* ``POST`` to an origin on the issuer's ``sts_endpoints``, path ``/``, no query: anything else
  would make tracegate send signed requests wherever a caller likes;
* the body is exactly ``Action=GetCallerIdentity&Version=2011-06-15``: the one call with no
  effect, which every principal may make;
* ``X-Tracegate-Server-ID`` is among the ``SignedHeaders`` and equals the issuer's
  ``server_id``: a request signed for another service that uses this pattern (Vault, another
  tracegate) is refused here, and one signed for this tracegate is refused there;
* ``X-Amz-Date`` is signed, at most ``max_age`` seconds old by the injected clock, and not
  ahead of it by more than the leeway;
* every part has a size bound, and only the signed headers (and ``Authorization``) are sent.

STS's answer is read to 64 KiB, without a DTD, and becomes the claims ``arn``, ``account``,
``user_id`` and, by the ARN's shape, ``role`` + ``session`` (an assumed role) or ``user``
(an IAM user); ``sub`` is the ARN (the audit line's subject), ``iss`` is ``aws:<issuer
name>`` and ``aud`` the server id, as an OIDC token's would be.

STS calls are bounded: a timeout that covers the wait for a slot and the call, a limit on
calls in flight, and the verifier's cache (:class:`proxy.identity.identify.TokenVerifier`),
keyed by the token's SHA-256, until ``X-Amz-Date + max_age``. STS unreachable, slow,
throttling, 5xx or answering nonsense: :class:`StsUnavailable` (503 with Retry-After), never
an allow. STS 401/403 (a bad signature, expired or unknown credentials):
``aws-signature-rejected``.

Security caveat: a signed request is a bearer credential here for ``max_age`` seconds —
whoever sees it (a log, a proxy in between) can use it as its signer until then, as with a
JWT. At AWS it is worth nothing beyond GetCallerIdentity. tracegate logs neither the token
nor any of its parts (the access key id, session token and signature included).
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree

import aiohttp

from proxy import untrusted
from proxy.errors import AuthError
from proxy.policy.model import AwsIssuer, endpoint_origin

log = logging.getLogger("tracegate.aws")

#: How a bearer credential says it is a signed STS request (never a JWT's first characters).
TOKEN_PREFIX = "aws-sts."  # noqa: S105 - a format marker, not a secret
#: The signed header that names the service a request is meant for.
SERVER_ID_HEADER = "X-Tracegate-Server-ID"
#: The one request tracegate forwards to STS, as every AWS SDK serialises it.
GET_CALLER_IDENTITY = "Action=GetCallerIdentity&Version=2011-06-15"
#: Longest token (an assumed role's is 2–3 KB; the header line limit is 8190 bytes).
MAX_TOKEN_BYTES = 7680
MAX_HEADERS = 16
MAX_HEADER_VALUE = 4096
MAX_URL = 256
#: Longest STS answer read.
MAX_ANSWER_BYTES = 64 * 1024
#: Seconds for one STS call, the wait for a slot included; calls in flight at once.
DEFAULT_TIMEOUT = 5.0
DEFAULT_CONCURRENCY = 16

_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_HEADER_VALUE = re.compile(r"^[\x20-\x7e]*$")
_AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=[A-Z0-9]{16,128}/(\d{8})/[a-z0-9-]{1,32}/sts/aws4_request,\s*"
    r"SignedHeaders=([a-z0-9;-]{1,1024}),\s*Signature=[0-9a-f]{64}$"
)
_AMZ_DATE = re.compile(r"^\d{8}T\d{6}Z$")
_ARN = re.compile(r"^arn:(aws[a-z-]*):(iam|sts)::(\d{12}):([\x21-\x7e]{1,1900})$")
_ACCOUNT = re.compile(r"^\d{12}$")
_ERROR_CODE = re.compile(rb"<Code>([A-Za-z.]{1,64})</Code>")
#: STS error codes that say "slow down", not "no": the request may succeed later.
_THROTTLED = frozenset({"Throttling", "RequestLimitExceeded", "ThrottlingException"})
#: Headers the HTTP client writes from the URL and the body itself.
_DERIVED = frozenset({"host", "content-length"})


class StsUnavailable(AuthError):
    """STS could not say who signed a request (unreachable, slow, throttling, 5xx, or an
    answer tracegate cannot read). Not the caller's fault: 503, retry later."""

    status = 503


@dataclass(frozen=True)
class SignedRequest:
    """A caller's signed GetCallerIdentity request, checked as far as tracegate can."""

    url: str
    #: The headers sent to STS: the signed ones and ``Authorization``, as the caller wrote them.
    headers: tuple[tuple[str, str], ...]
    body: bytes
    server_id: str
    #: Its ``X-Amz-Date``, seconds since the epoch.
    signed_at: float


def parse_token(token: str) -> SignedRequest:
    """The signed request in a token, checked for shape: ``token-too-large``,
    ``aws-request-malformed`` (not base64url JSON of the documented shape, a header that is
    not a header, an Authorization that is not SigV4 for STS, an unsigned X-Amz-Date),
    ``aws-action-not-allowed`` (not ``POST /`` with exactly the GetCallerIdentity body), or
    ``aws-audience-unsigned`` (no signed X-Tracegate-Server-ID)."""
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthError("token-too-large")
    encoded = token[len(TOKEN_PREFIX) :]
    try:
        if len(encoded) % 4 == 1:
            raise ValueError("impossible base64url length")
        document = untrusted.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    except (ValueError, RecursionError):
        raise AuthError("aws-request-malformed") from None
    if not isinstance(document, dict) or set(document) != {"method", "url", "headers", "body"}:
        raise AuthError("aws-request-malformed")
    method, url, raw_headers, body = (document[k] for k in ("method", "url", "headers", "body"))
    if not all(isinstance(v, str) for v in (method, url, body)) or not isinstance(raw_headers, dict):
        raise AuthError("aws-request-malformed")
    if len(url) > MAX_URL or len(raw_headers) > MAX_HEADERS:
        raise AuthError("aws-request-malformed")
    headers: dict[str, tuple[str, str]] = {}  # lowercased name -> (name as written, value)
    for name, value in raw_headers.items():
        if not isinstance(value, str) or not _HEADER_NAME.match(name) or name.lower() in headers:
            raise AuthError("aws-request-malformed")
        if len(value) > MAX_HEADER_VALUE or not _HEADER_VALUE.match(value):
            raise AuthError("aws-request-malformed")
        headers[name.lower()] = (name, value)
    try:
        parts = urlsplit(url)
        origin = endpoint_origin(url)  # what is sent is rebuilt from this, never the URL as written
    except ValueError:
        raise AuthError("aws-request-malformed") from None
    if parts.username is not None or parts.password is not None:
        raise AuthError("aws-request-malformed")
    if method != "POST" or parts.path not in ("", "/") or parts.query or parts.fragment or body != GET_CALLER_IDENTITY:
        raise AuthError("aws-action-not-allowed")
    authorization = headers.get("authorization", ("", ""))[1]
    match = _AUTHORIZATION.match(authorization)
    if match is None:
        raise AuthError("aws-request-malformed")
    scope_date, signed = match.group(1), match.group(2).split(";")
    if SERVER_ID_HEADER.lower() not in signed or SERVER_ID_HEADER.lower() not in headers:
        raise AuthError("aws-audience-unsigned")
    amz_date = headers.get("x-amz-date", ("", ""))[1]
    if "x-amz-date" not in signed or not _AMZ_DATE.match(amz_date) or amz_date[:8] != scope_date:
        raise AuthError("aws-request-malformed")
    host = headers.get("host")
    if host is not None and host[1].lower() != origin.partition("://")[2]:
        raise AuthError("aws-request-malformed")  # signed for another host than its URL names
    length = headers.get("content-length")
    if length is not None and length[1] != str(len(body)):
        raise AuthError("aws-request-malformed")
    sent = [headers[n] for n in signed if n not in _DERIVED and n in headers]
    if len(sent) != len([n for n in signed if n not in _DERIVED]) or "host" not in signed:
        raise AuthError("aws-request-malformed")  # a signed header it does not carry: STS would refuse
    try:
        signed_at = float(calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ")))
    except ValueError:
        raise AuthError("aws-request-malformed") from None
    return SignedRequest(
        origin + "/",
        (*sent, headers["authorization"]),
        body.encode("ascii"),
        headers[SERVER_ID_HEADER.lower()][1],
        signed_at,
    )


def choose_issuer(request: SignedRequest, issuers: Mapping[str, AwsIssuer], *, now: float, leeway: float) -> AwsIssuer:
    """The issuer the request was signed for, if it may be sent to STS now:
    ``aws-audience-mismatch`` (no issuer has its server id), ``aws-endpoint-not-allowed``,
    ``aws-request-expired`` (older than ``max_age``), ``aws-request-in-future``."""
    issuer = next((i for i in issuers.values() if i.server_id == request.server_id), None)
    if issuer is None:
        raise AuthError("aws-audience-mismatch")
    if request.url.removesuffix("/") not in issuer.sts_endpoints:
        raise AuthError("aws-endpoint-not-allowed", issuer=issuer.name)
    if now > request.signed_at + issuer.max_age:
        raise AuthError("aws-request-expired", issuer=issuer.name)
    if request.signed_at > now + leeway:
        raise AuthError("aws-request-in-future", issuer=issuer.name)
    return issuer


@dataclass(frozen=True)
class Caller:
    """Who STS says signed the request."""

    arn: str
    account: str
    user_id: str


def parse_answer(body: bytes) -> Caller:
    """A GetCallerIdentity answer (XML). Raises ValueError for anything else: a DTD, another
    root, a missing or malformed field, an ARN in another account than ``Account``."""
    if len(body) > MAX_ANSWER_BYTES or b"<!" in body:
        raise ValueError("too large, or holds a DTD, an entity or CDATA")
    try:
        root = ElementTree.fromstring(body)  # noqa: S314 - bounded, no DTD (checked above), from an allowed STS
    except ElementTree.ParseError:
        raise ValueError("not XML") from None
    if root.tag.rpartition("}")[2] != "GetCallerIdentityResponse":
        raise ValueError("not a GetCallerIdentity answer")
    found: dict[str, str] = {}
    for element in root.iter():
        name = element.tag.rpartition("}")[2]
        if name in ("Arn", "Account", "UserId"):
            if name in found or not element.text:
                raise ValueError(f"{name} twice or empty")
            found[name] = element.text.strip()
    arn, account, user_id = found.get("Arn", ""), found.get("Account", ""), found.get("UserId", "")
    match = _ARN.match(arn)
    if match is None or not _ACCOUNT.match(account) or match.group(3) != account:
        raise ValueError("Arn or Account malformed, or not the same account")
    if not 0 < len(user_id) <= 256 or not _HEADER_VALUE.match(user_id):
        raise ValueError("UserId malformed")
    return Caller(arn, account, user_id)


def caller_claims(caller: Caller, issuer: AwsIssuer) -> dict[str, Any]:
    """The claims policies match: ``arn``, ``account``, ``user_id``; ``role`` and ``session``
    for an assumed role (``arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION``: STS drops the
    role's path), ``user`` for an IAM user (the last part of ``user/PATH/NAME``)."""
    claims: dict[str, Any] = {
        "iss": issuer.issuer,
        "aud": issuer.server_id,
        "sub": caller.arn,
        "arn": caller.arn,
        "account": caller.account,
        "user_id": caller.user_id,
    }
    service, resource = caller.arn.split(":", 5)[2], caller.arn.split(":", 5)[5]
    kind, _, rest = resource.partition("/")
    if service == "sts" and kind == "assumed-role" and rest.count("/") == 1:
        claims["role"], claims["session"] = rest.split("/")
    elif service == "iam" and kind == "user" and rest:
        claims["user"] = rest.rsplit("/", 1)[-1]
    return claims


class StsClient:
    """Sends checked requests to STS, bounded: ``timeout`` seconds for the wait for one of
    ``max_concurrent`` slots and the call together. ``session`` is shared when given (the
    runtime's); without one, each call opens and closes its own (a call is made once per
    signed request, which the verifier then caches)."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_concurrent: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self._session = session
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_concurrent)

    async def caller(self, request: SignedRequest, issuer: str) -> Caller:
        """Who signed ``request``. Raises AuthError (``aws-signature-rejected``,
        ``aws-request-rejected``) or :class:`StsUnavailable` (``sts-unavailable``)."""
        try:
            async with asyncio.timeout(self._timeout), self._slots:
                if self._session is not None:
                    status, body = await self._post(self._session, request)
                else:
                    async with aiohttp.ClientSession() as session:
                        status, body = await self._post(session, request)
        except TimeoutError:
            raise self._unavailable(issuer, request, f"no answer within {self._timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise self._unavailable(issuer, request, type(exc).__name__) from None
        code_match = _ERROR_CODE.search(body) if status != 200 else None
        code = code_match.group(1).decode() if code_match else None
        if status == 200:
            try:
                return parse_answer(body)
            except ValueError as exc:
                raise self._unavailable(issuer, request, f"unreadable answer ({exc})") from None
        if status in (401, 403):
            log.info("sts refused a signed request: %s", code, extra={"issuer": issuer, "sts_error": code})
            raise AuthError("aws-signature-rejected", issuer=issuer)
        if 400 <= status < 500 and status != 429 and code not in _THROTTLED:
            log.info("sts refused a request: HTTP %d %s", status, code, extra={"issuer": issuer, "sts_error": code})
            raise AuthError("aws-request-rejected", issuer=issuer)
        raise self._unavailable(issuer, request, f"HTTP {status}" + (f" {code}" if code else ""))

    async def _post(self, session: aiohttp.ClientSession, request: SignedRequest) -> tuple[int, bytes]:
        async with session.post(
            request.url, data=request.body, headers=list(request.headers), allow_redirects=False
        ) as resp:
            if (resp.content_length or 0) > MAX_ANSWER_BYTES:
                return resp.status, b""
            body = bytearray()
            async for chunk in resp.content.iter_chunked(16384):
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    break
            return resp.status, bytes(body)

    @staticmethod
    def _unavailable(issuer: str, request: SignedRequest, cause: str) -> StsUnavailable:
        log.warning("sts call failed: %s (%s)", request.url, cause, extra={"issuer": issuer, "url": request.url})
        return StsUnavailable("sts-unavailable", issuer=issuer)


def presign(
    credentials: Any,
    *,
    server_id: str,
    endpoint: str = "https://sts.amazonaws.com",
    region: str | None = None,
) -> str:
    """A token for tracegate: GetCallerIdentity for ``endpoint``, signed (SigV4, now) with
    botocore ``credentials`` (anything with ``access_key``, ``secret_key`` and ``token``)
    and ``X-Tracegate-Server-ID: server_id``. The region is ``region``, else the endpoint's
    (``sts.REGION.amazonaws.com``), else ``us-east-1`` (the global endpoint's). Needs
    botocore (imported here only); tracegate's verification does not."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest

    origin = endpoint_origin(endpoint)
    if region is None:
        match = re.match(r"^https://sts(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?$", origin)
        region = match.group(1) if match else "us-east-1"
    request = AWSRequest(
        method="POST",
        url=origin + "/",
        data=GET_CALLER_IDENTITY,
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8", SERVER_ID_HEADER: server_id},
    )
    SigV4Auth(credentials, "sts", region).add_auth(request)
    document = {"method": "POST", "url": origin + "/", "headers": dict(request.headers), "body": GET_CALLER_IDENTITY}
    encoded = base64.urlsafe_b64encode(json.dumps(document, separators=(",", ":")).encode()).rstrip(b"=")
    return TOKEN_PREFIX + encoded.decode("ascii")
