"""An issuer's signing keys: OIDC discovery, JWKS fetch, cache and bounded refetch.

One :class:`KeySource` per issuer. Keys come from ``{issuer}/.well-known/openid-configuration``
(or, where that is absent, OAuth 2.0 authorization server metadata: :func:`discovery_urls`)
→ ``jwks_uri`` (which must share the issuer's origin: a discovery document that points
elsewhere is refused), or from the ``jwks_uri`` the policy names explicitly (trusted as
configured). Fetches use aiohttp, never a blocking client.

Bounds, so that no token can make tracegate fetch without limit:

* an unknown ``kid`` triggers at most one fetch in flight and at most one per
  ``min_refetch_interval`` seconds; other requests with unknown kids are refused meanwhile;
* the cache lifetime follows ``Cache-Control: max-age`` clamped to [60 s, 24 h]
  (5 min when absent);
* documents are limited to ``MAX_DOCUMENT_BYTES``; redirects are not followed.

The last good key set stays in use while the issuer is down or serving garbage.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
from yarl import URL

from proxy import untrusted
from proxy.errors import AuthError, KeysUnavailable
from proxy.observe.metrics import Metrics
from proxy.policy.model import Issuer
from proxy.urls import check_url, same_origin

log = logging.getLogger("tracegate.keys")

MAX_DOCUMENT_BYTES = 256 * 1024
MIN_CACHE_SECONDS = 60.0
MAX_CACHE_SECONDS = 86400.0
DEFAULT_CACHE_SECONDS = 300.0
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=10, connect=5)
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*(\d+)", re.I)

#: Which key type each pinned algorithm family needs.
_KTY_FOR_ALG = {"RS": "RSA", "PS": "RSA", "ES": "EC"}


def discovery_urls(issuer: str) -> list[str]:
    """Where an issuer's metadata may be, in order: OIDC discovery; then OAuth 2.0
    authorization server metadata (RFC 8414) for issuers without OIDC (an Okta custom
    authorization server for client-credentials tokens), appended to the issuer as Okta
    serves it, and inserted after the host as RFC 8414 §3.1 places it."""
    urls = [issuer + "/.well-known/openid-configuration", issuer + "/.well-known/oauth-authorization-server"]
    url = URL(issuer)
    if url.path not in ("", "/"):
        urls.append(str(url.origin()) + "/.well-known/oauth-authorization-server" + url.path)
    return urls


class FetchFailed(Exception):
    """A JWKS or discovery fetch that produced no usable keys; ``result`` is the metric label,
    ``url`` what was asked (None: the issuer's current JWKS or discovery URL) and ``cause``
    what went wrong, for the log line an operator reads (``connection refused``, ``HTTP 500``)."""

    def __init__(self, result: str, *, url: str | None = None, cause: str | None = None) -> None:
        self.result = result
        self.url = url
        self.cause = cause or _CAUSES.get(result, result)
        super().__init__(result)


#: What a ``result`` means when nothing more specific is known.
_CAUSES = {
    "bad-document": "not a JWKS document",
    "empty": "no usable signing key for the pinned algorithms",
    "discovery-issuer-mismatch": "the discovery document names another issuer",
    "discovery-foreign-jwks-uri": "the discovery document's jwks_uri is not on the issuer's origin",
}


def connect_cause(exc: aiohttp.ClientError) -> str:
    """A client error in a few words: ``connection refused``, ``name not resolved``…"""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "TLS certificate not trusted"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, socket.gaierror):
            return "name not resolved"
        code = exc.os_error.errno
        return os.strerror(code).lower() if isinstance(code, int) and code > 0 else "cannot connect"
    return type(exc).__name__


@dataclass(frozen=True)
class KeySet:
    keys: dict[str, jwt.PyJWK]
    expires_at: float


def cache_seconds(cache_control: str | None) -> float:
    if not cache_control:
        return DEFAULT_CACHE_SECONDS
    if "no-store" in cache_control.lower() or "no-cache" in cache_control.lower():
        return MIN_CACHE_SECONDS
    match = _MAX_AGE.search(cache_control)
    if not match:
        return DEFAULT_CACHE_SECONDS
    return min(max(float(match.group(1)), MIN_CACHE_SECONDS), MAX_CACHE_SECONDS)


def parse_jwks(document: Any, algorithms: tuple[str, ...]) -> dict[str, jwt.PyJWK]:
    """The usable signing keys of a JWKS document, by kid. Keys without a kid, for
    encryption, of a type no pinned algorithm uses, or that fail to parse are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise FetchFailed("bad-document")
    wanted = {_KTY_FOR_ALG[alg[:2]] for alg in algorithms}
    keys: dict[str, jwt.PyJWK] = {}
    for item in document["keys"][:100]:
        if not isinstance(item, dict) or not isinstance(item.get("kid"), str):
            continue
        kty, use = item.get("kty"), item.get("use", "sig")
        if not isinstance(kty, str) or kty not in wanted or use != "sig":  # a list or object is no kty
            continue
        if any(k in item for k in ("d", "p", "q", "k")):
            continue  # private or symmetric material has no place in a JWKS
        try:
            keys[item["kid"]] = jwt.PyJWK(item, algorithm=_algorithm_for(item, algorithms))
        except (jwt.PyJWTError, ValueError, TypeError):
            continue
    if not keys:
        raise FetchFailed("empty")
    return keys


def _algorithm_for(item: dict[str, Any], algorithms: tuple[str, ...]) -> str:
    for alg in algorithms:
        if _KTY_FOR_ALG[alg[:2]] == item["kty"] and item.get("alg", alg) == alg:
            return alg
    raise ValueError("no pinned algorithm fits this key")


class KeySource:
    """The keys of one issuer. ``clock`` is monotonic seconds; ``session`` is shared."""

    def __init__(
        self,
        issuer: Issuer,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        clock: Callable[[], float],
        min_refetch_interval: float = 30.0,
    ) -> None:
        self.issuer = issuer
        self._session = session
        self._metrics = metrics
        self._clock = clock
        self._min_refetch = min_refetch_interval
        self._keyset: KeySet | None = None
        self._jwks_uri = issuer.jwks_uri
        self._last_attempt = float("-inf")
        self._inflight: asyncio.Task[bool] | None = None

    @property
    def ready(self) -> bool:
        return self._keyset is not None

    async def key_for(self, kid: str, alg: str) -> jwt.PyJWK:
        """The key for ``kid``. Raises AuthError("unknown-kid") or KeysUnavailable."""
        keyset = self._keyset
        if keyset is not None and kid in keyset.keys:
            if self._clock() >= keyset.expires_at:
                self._start_refresh()  # stale: refresh behind, keep serving the last good keys
            return self._checked(keyset.keys[kid], alg)
        if self._inflight is None and self._clock() - self._last_attempt < self._min_refetch:
            raise self._missing()
        await asyncio.shield(self._start_refresh())
        keyset = self._keyset
        if keyset is not None and kid in keyset.keys:
            return self._checked(keyset.keys[kid], alg)
        raise self._missing()

    def _missing(self) -> AuthError:
        if self._keyset is None:
            return KeysUnavailable("keys-unavailable", issuer=self.issuer.name)
        return AuthError("unknown-kid", issuer=self.issuer.name)

    def _checked(self, key: jwt.PyJWK, alg: str) -> jwt.PyJWK:
        if key.algorithm_name != alg:
            raise AuthError("key-algorithm-mismatch", issuer=self.issuer.name)
        return key

    def _start_refresh(self) -> asyncio.Task[bool]:
        if self._inflight is None:
            self._last_attempt = self._clock()
            self._inflight = asyncio.get_running_loop().create_task(self._refresh())
        return self._inflight

    async def _refresh(self) -> bool:
        try:
            keys, lifetime = await self._fetch()
        except FetchFailed as exc:
            self._metrics.jwks_fetches.labels(self.issuer.name, exc.result).inc()
            url = exc.url or self._jwks_uri or self.issuer.issuer
            log.warning(
                "jwks fetch failed: %s (%s)",
                url,
                exc.cause,
                extra={"issuer": self.issuer.name, "result": exc.result, "url": url},
            )
            if self.issuer.jwks_uri is None:
                self._jwks_uri = None  # discover again next time
            return False
        finally:
            self._inflight = None
        self._metrics.jwks_fetches.labels(self.issuer.name, "ok").inc()
        self._keyset = KeySet(keys, self._clock() + lifetime)
        return True

    async def _fetch(self) -> tuple[dict[str, jwt.PyJWK], float]:
        if self._jwks_uri is None:
            discovery = await self._discover()
            if not isinstance(discovery, dict) or discovery.get("issuer") != self.issuer.issuer:
                raise FetchFailed("discovery-issuer-mismatch")
            uri = discovery.get("jwks_uri")
            if not isinstance(uri, str) or check_url(uri) or not same_origin(uri, self.issuer.issuer):
                raise FetchFailed("discovery-foreign-jwks-uri")
            self._jwks_uri = uri
        document, cache_control = await self._get_json(self._jwks_uri)
        return parse_jwks(document, self.issuer.algorithms), cache_seconds(cache_control)

    async def _discover(self) -> Any:
        """The first metadata document the issuer serves (see :func:`discovery_urls`); an
        absent one (404/410) moves on to the next, any other failure stops here."""
        for url in discovery_urls(self.issuer.issuer):
            try:
                document, _ = await self._get_json(url)
            except FetchFailed as exc:
                if exc.result == "not-found":
                    continue
                raise
            return document
        raise FetchFailed("not-found", url=self.issuer.issuer, cause="no OIDC discovery or OAuth metadata (HTTP 404)")

    async def _get_json(self, url: str) -> tuple[Any, str | None]:
        try:
            async with self._session.get(url, allow_redirects=False, timeout=FETCH_TIMEOUT) as resp:
                if resp.status in (404, 410):
                    raise FetchFailed("not-found", url=url, cause=f"HTTP {resp.status}")
                if resp.status != 200:
                    raise FetchFailed("http-error", url=url, cause=f"HTTP {resp.status}")
                too_large = f"larger than {MAX_DOCUMENT_BYTES} bytes"
                if (resp.content_length or 0) > MAX_DOCUMENT_BYTES:
                    raise FetchFailed("too-large", url=url, cause=too_large)
                body = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise FetchFailed("too-large", url=url, cause=too_large)
                cache_control = resp.headers.get("Cache-Control")
        except TimeoutError:
            raise FetchFailed("timeout", url=url, cause=f"no answer within {FETCH_TIMEOUT.total:g} s") from None
        except aiohttp.ClientError as exc:
            raise FetchFailed("unreachable", url=url, cause=connect_cause(exc)) from None
        try:
            return untrusted.loads(body), cache_control
        except (ValueError, RecursionError):
            raise FetchFailed("bad-document", url=url, cause="not JSON") from None

    async def close(self) -> None:
        """Stop a fetch in flight (shielded from its callers, so not cancelled with them):
        at shutdown it must end quietly, not fail noisily on a session being closed."""
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def run(self) -> None:
        """Background upkeep: fetch at start (retrying with backoff while the issuer is
        down, so tracegate serves meanwhile) and refresh before the cache runs out."""
        backoff = 1.0
        while True:
            try:
                ok = await asyncio.shield(self._start_refresh())
            except Exception as exc:  # noqa: BLE001 - the upkeep of an issuer's keys must outlive any one bad answer
                self._metrics.unhandled_errors.inc()
                log.error("unhandled error", extra={"issuer": self.issuer.name, "error_type": type(exc).__name__})
                ok = False
            if ok and self._keyset is not None:
                backoff = 1.0
                delay = max(self._keyset.expires_at - self._clock(), MIN_CACHE_SECONDS)
            else:
                delay = backoff * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not crypto
                backoff = min(backoff * 2, 60.0)
            await asyncio.sleep(delay)
