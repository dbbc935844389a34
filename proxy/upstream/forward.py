"""Stage 3 — forward: inject the account's key, stream the body upstream byte for byte.

The body is neither decompressed (the ingest server runs with ``auto_decompress=False``)
nor re-encoded: the upstream receives exactly the bytes the client sent, with its
Content-Encoding. The limit is enforced on the declared Content-Length before anything is
sent, and again while streaming (for chunked bodies): a body that goes over aborts the
upstream request mid-body, so the upstream never receives a complete request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, cast

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.backends.profiles import Backend, BackendSpec, Defaults, Route, Signal, build_backend
from proxy.errors import BodyError, ConfigError, UpstreamError
from proxy.observe.metrics import Metrics
from proxy.policy.model import ServiceAccount
from proxy.settings.config import DEFAULT_PATHS
from proxy.upstream.headers import RELAYED, HeaderPolicy
from proxy.upstream.pool import UpstreamPool

#: Lightstep's documented OTLP/HTTP paths on its public ingest (ingest.lightstep.com).
#: The upstream's answer is read whole before it is relayed; OTLP answers are tiny.
MAX_ANSWER_BYTES = 4 << 20
CHUNK = 32 * 1024
#: Pieces in which a body is streamed upstream: what the server has buffered, up to this.
#: 256 KiB pieces took 100 concurrent 4 MB uploads to +119 MiB RSS (target 64); 64 KiB: +40.
STREAM_CHUNK = 64 * 1024
#: RELAYED by their lower-case names, as the upstream pool matches them.
_RELAYED_LOWER = {name.lower().encode(): name for name in RELAYED}
#: Pieces in which a body that is read whole (for stamping) is taken from the buffer.
READ_CHUNK = 1 << 20


class Upload(Protocol):
    """What forwarding needs of a client's request: aiohttp's requests have it, and so have
    the exports ``ingest_conn`` parses itself."""

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def content(self) -> aiohttp.StreamReader: ...


@dataclass(frozen=True)
class UpstreamAnswer:
    status: int
    body: bytes
    headers: Mapping[str, str]
    body_bytes: int


@dataclass
class _BodyState:
    received: int = 0
    error: BodyError | None = field(default=None)


#: What reading a request body can raise when the client breaks off or sends broken framing:
#: each is the client's doing (``body-incomplete``, 400), never an unhandled error.
BODY_READ_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncio.IncompleteReadError,
    aiohttp.ClientError,
    HttpProcessingError,
    web.HTTPException,
)


def declared_length(request: Upload, limit: int) -> None:
    """Refuse (413) a declared Content-Length over ``limit`` before reading anything."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyError("body-too-large", 413)


def routes_of(account: ServiceAccount, defaults: Defaults) -> Backend:
    """The account's routes: built by the runtime at load (``ServiceAccount.routes``), else —
    an account made without a profile, as tests and the dev loop do — Lightstep's, from its
    ``access_token`` and ``defaults``. Raises ConfigError for an account loaded without secrets."""
    if account.routes is not None:
        return account.routes
    if account.backend is not None and account.credentials is not None:
        return build_backend(account.backend, account.credentials, defaults)
    if account.access_token is None:
        raise ConfigError(f"service account {account.name!r} was loaded without its access token")
    spec = BackendSpec("lightstep", upstream=account.upstream, grpc_upstream=account.grpc_upstream)
    return build_backend(spec, {"access_token": account.access_token}, defaults)


def is_json(content_type: str | None) -> bool:
    return content_type is not None and content_type.split(";", 1)[0].strip().lower() == "application/json"


async def _read_answer(resp: aiohttp.ClientResponse) -> bytes:
    """The upstream's whole answer, up to MAX_ANSWER_BYTES (over it: 502). Read to EOF so
    that the connection goes back to the pool: stopping early closed it, and a new
    upstream connection per request cost a third of the throughput in the benchmark."""
    if resp.content_length is not None and resp.content_length <= MAX_ANSWER_BYTES:
        return await resp.read()
    body = bytearray()
    while chunk := await resp.content.read(CHUNK):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise UpstreamError("upstream-answer-too-large", 502)
    return bytes(body)


#: upstream_responses' status label for the pool's failures (anything else: "error").
_LABELS = {"upstream-timeout": "timeout", "upstream-unreachable": "unreachable"}


class Forwarder:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        header_policy: HeaderPolicy,
        metrics: Metrics,
        *,
        upstream: str,
        paths: Mapping[str, str] = DEFAULT_PATHS,
        timeout: float = 30.0,
        max_body: int = 64 << 20,
        body_timeout: float = 30.0,
        pool: UpstreamPool | None = None,
        grpc_upstream: str = Defaults.grpc_upstream,
    ) -> None:
        """``pool`` carries forward()'s requests (one is made when not given; whoever makes
        it closes it); ``session`` carries exchange() and send()."""
        self._session = session
        self._pool = pool if pool is not None else UpstreamPool(connect_timeout=min(timeout, 10.0))
        self._total = timeout
        self._headers = header_policy
        self._metrics = metrics
        self._upstream = upstream.rstrip("/")
        self._paths = paths
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 10.0))
        self.max_body = max_body
        self._body_timeout = body_timeout
        self._urls: dict[str, URL] = {}
        #: What Lightstep's profile honours (TRACEGATE_UPSTREAM, its paths, the gRPC upstream).
        self.defaults = Defaults(self._upstream, cast(Mapping[Signal, str], paths), grpc_upstream)

    def route(self, account: ServiceAccount, signal: str) -> Route:
        """Where ``signal`` of ``account`` goes, with which headers (its backend profile).
        Raises BodyError ``signal-not-accepted`` (403) for a signal its backend takes not."""
        route = routes_of(account, self.defaults).routes.get(cast(Signal, signal))
        if route is None:  # check refuses such a rule; an account made in code may still ask
            raise BodyError("signal-not-accepted", 403)
        return route

    def url(self, route: Route) -> URL:
        """The route's URL, parsed once (yarl parsing per request showed in the profile)."""
        found = self._urls.get(route.url)
        if found is None:
            found = self._urls[route.url] = URL(route.url)
        return found

    async def _stream(self, request: Upload, state: _BodyState, size: int = CHUNK) -> AsyncIterator[bytes]:
        content = request.content
        while True:
            try:
                # What is already buffered needs no timer (the common case for OTLP bodies);
                # only a read that must wait for the client is bounded by the body timeout.
                chunk = content.read_nowait(size)
                if not chunk and not content.at_eof():
                    async with asyncio.timeout(self._body_timeout):
                        chunk = await content.read(size)
            except TimeoutError:
                state.error = BodyError("body-timeout", 408)
                raise state.error from None
            except BODY_READ_ERRORS as exc:
                state.error = BodyError("body-incomplete", 400)
                raise state.error from exc
            if not chunk:
                return
            state.received += len(chunk)
            if state.received > self.max_body:
                state.error = BodyError("body-too-large", 413)
                raise state.error
            yield chunk

    async def send(
        self, account: ServiceAccount, signal: str, body: bytes, content_type: str
    ) -> tuple[int, str | None]:
        """Send a body tracegate made itself (a deployment marker) as ``account``. Returns
        the upstream's status and Retry-After; raises UpstreamError (502/504)."""
        answer = await self.exchange(account, signal, body, content_type)
        return answer.status, answer.headers.get("Retry-After")

    async def exchange(
        self, account: ServiceAccount, signal: str, body: bytes, content_type: str, *, timeout: float | None = None
    ) -> UpstreamAnswer:
        """POST a body already in memory as ``account`` and return the upstream's answer,
        whatever its status. ``timeout`` (seconds) shortens TRACEGATE_UPSTREAM_TIMEOUT, for a
        caller with a deadline of its own. Raises UpstreamError (502/504)."""
        # identity: the answer is relayed as it came (a gRPC client in bridge mode gets it as
        # the response message), and the session does not decompress.
        route = self.route(account, signal)
        if is_json(content_type) and not route.json:
            raise BodyError("backend-json-unsupported", 415)
        headers = {"Content-Type": content_type, "Accept-Encoding": "identity", **dict(route.reveal())}
        limit = self._timeout
        if timeout is not None and (limit.total is None or timeout < limit.total):
            limit = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 10.0))
        try:
            async with self._session.post(
                self.url(route), data=body, headers=headers, timeout=limit, allow_redirects=False
            ) as resp:
                if not 100 <= resp.status <= 599:  # aiohttp takes any three digits (RFC 9110 §15)
                    raise UpstreamError("upstream-unreachable", 502)
                answer = await _read_answer(resp)
                relayed = {h: resp.headers[h] for h in RELAYED if h in resp.headers}
                return UpstreamAnswer(resp.status, answer, relayed, len(body))
        except TimeoutError:
            raise UpstreamError("upstream-timeout", 504) from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamError("upstream-unreachable", 502) from None

    async def read(self, request: Upload) -> bytes:
        """The whole request body, under the same limit and body timeout as streaming; for
        a body that must change before it is sent (stamping). Raises BodyError."""
        declared_length(request, self.max_body)
        chunks = [chunk async for chunk in self._stream(request, _BodyState(), READ_CHUNK)]
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def forward(
        self, request: Upload, signal: str, account: ServiceAccount, *, body: bytes | None = None
    ) -> UpstreamAnswer:
        """Send the request upstream as ``account``: its body streamed byte for byte, or
        ``body`` instead (read and changed by the caller; sent with its own length).
        Raises BodyError or UpstreamError; returns the upstream's answer, whatever its status."""
        route = self.route(account, signal)
        if not route.json and is_json(request.headers.get("Content-Type")):
            raise BodyError("backend-json-unsupported", 415)  # refused before a byte is read
        declared_length(request, self.max_body)
        state = _BodyState()
        headers = self._headers.upstream(request.headers, route)
        # The pool writes the framing: the client's Content-Length when it declared one
        # (and did not name it in Connection), else chunked; ``body``'s own length.
        length = request.content_length if headers.popall("Content-Length", None) else None
        content = request.content
        if body is None and length is not None and content.is_eof() and content.exception() is None:
            body = content.read_nowait(-1)  # all of it is here already (most exports): one piece
        data: AsyncIterator[bytes] | bytes
        if body is not None:
            state.received = len(body)
            data, length = body, None
        else:
            data = self._stream(request, state, STREAM_CHUNK)
        started = time.perf_counter()
        status_label = "error"
        try:
            answer = await self._pool.post(
                self.url(route),
                headers.items(),
                data,
                timeout=self._total,
                relayed=_RELAYED_LOWER,
                max_answer=MAX_ANSWER_BYTES,
                content_length=length,
            )
            status_label = str(answer.status)
            return UpstreamAnswer(answer.status, answer.body, answer.headers, state.received)
        except UpstreamError as exc:
            if state.error is not None:
                status_label = "client-" + state.error.reason
                raise state.error from None
            status_label = _LABELS.get(exc.reason, "error")
            raise
        except BodyError as exc:
            status_label = "client-" + exc.reason
            raise
        finally:
            metrics = self._metrics
            metrics.child(metrics.request_bytes, signal).inc(state.received)
            metrics.child(metrics.upstream_responses, signal, status_label).inc()
            metrics.child(metrics.upstream_latency, signal).observe(time.perf_counter() - started)
