"""Forward over gRPC: one long-lived channel per upstream, the account's key, raw bytes.

The request message is sent as the bytes the client sent (after gRPC's own decompression):
no protobuf is parsed or re-encoded. The upstream call carries exactly one
``lightstep-access-token`` — the service account's — and, of the client's metadata, only
names the operator listed in ``TRACEGATE_FORWARD_HEADERS``; the client's ``authorization``,
its ``lightstep-access-token`` and everything else stay behind.

TLS upstreams are verified against grpcio's root bundle (or
``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``), or, with ``TRACEGATE_GRPC_UPSTREAM_CA``, against that
PEM bundle only (:func:`read_roots`, read once at start: a private CA).

The call's deadline is the client's remaining deadline, bounded by
``TRACEGATE_UPSTREAM_TIMEOUT``; when the client gives up (deadline or cancel) the handler is
cancelled and so is the upstream call. The upstream's status, message, retry trailers and
response bytes come back unchanged, except that the message of a failure the channel
produced itself (UNAVAILABLE or DEADLINE_EXCEEDED without the upstream's details) is made
generic: it would name the upstream's address.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterable
from pathlib import Path

import grpc
from grpc import aio

from proxy.backends.profiles import Route
from proxy.errors import ConfigError
from proxy.grpc_status import RETRY_TRAILERS, GrpcAnswer, Trailers, refusal
from proxy.observe.metrics import Metrics
from proxy.policy.model import ServiceAccount
from proxy.upstream.forward import MAX_ANSWER_BYTES
from proxy.urls import grpc_address

#: Keep-alive pings on an idle upstream connection: often enough to notice a dead peer
#: behind a load balancer, rarely enough that servers do not answer GOAWAY too_many_pings.
KEEPALIVE_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000
#: Failures the channel reports itself when the upstream did not answer: the door's own
#: refusal (status, reason) replaces them, as on OTLP/HTTP. CANCELLED here means the
#: upstream reset the stream (it was shutting down): our caller did not cancel, and the
#: export may be retried, so the client is told UNAVAILABLE.
_LOCAL_FAILURES = {
    grpc.StatusCode.UNAVAILABLE: (502, "upstream-unreachable"),
    grpc.StatusCode.CANCELLED: (502, "upstream-unreachable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "upstream-timeout"),
}
_Call = aio.UnaryUnaryMultiCallable[bytes, bytes]


def _reason(code: grpc.StatusCode) -> str:
    return "upstream-" + code.name.lower().replace("_", "-")


def read_roots(path: str) -> bytes | None:
    """The PEM certificates of ``TRACEGATE_GRPC_UPSTREAM_CA`` (None when it is empty: grpcio's
    own roots). Read once, at start (not on the event loop while serving); a file that
    cannot be read or holds no usable certificate is a ConfigError naming the setting, so
    that a typo is not a silent fall back to public roots."""
    if not path:
        return None
    setting = f"TRACEGATE_GRPC_UPSTREAM_CA={path}"
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{setting}: cannot read it ({type(exc).__name__}); give a PEM CA bundle tracegate's user can read"
        ) from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except (ValueError, ssl.SSLError):  # UnicodeDecodeError is a ValueError
        raise ConfigError(
            f"{setting}: holds no usable PEM certificate; give the CA's certificates (-----BEGIN CERTIFICATE----- …)"
        ) from None
    return pem


class GrpcUpstream:
    def __init__(
        self,
        metrics: Metrics,
        *,
        default_target: str,
        timeout: float,
        max_message: int,
        forward_metadata: Iterable[str] = (),
        root_certificates: bytes | None = None,
    ) -> None:
        """``root_certificates``: PEM CAs every TLS upstream is verified against (None:
        grpcio's roots)."""
        self._metrics = metrics
        self._roots = root_certificates
        self._default = default_target
        self._timeout = timeout
        self._max_message = max_message
        self._forward = frozenset(
            n.lower() for n in forward_metadata if not n.lower().startswith(("grpc-", ":")) and n.lower() != "te"
        )
        self._channels: dict[tuple[str, int, bool], aio.Channel] = {}
        self._calls: dict[tuple[str, str], _Call] = {}

    def _channel(self, target: str) -> aio.Channel:
        address = grpc_address(target)  # validated at load; parsing is cheap and cached below
        channel = self._channels.get(address)
        if channel is None:
            host, port, tls = address
            options = [
                ("grpc.keepalive_time_ms", KEEPALIVE_MS),
                ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                ("grpc.max_send_message_length", self._max_message),
                ("grpc.max_receive_message_length", MAX_ANSWER_BYTES),
                ("grpc.primary_user_agent", "tracegate"),
            ]
            where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
            if tls:
                credentials = grpc.ssl_channel_credentials(root_certificates=self._roots)
                channel = aio.secure_channel(where, credentials, options=options)
            else:
                channel = aio.insecure_channel(where, options=options)
            self._channels[address] = channel
        return channel

    def _call(self, target: str, method: str) -> _Call:
        found = self._calls.get((target, method))
        if found is None:
            # No serializer and no deserializer: bytes in, bytes out.
            found = self._calls[(target, method)] = self._channel(target).unary_unary(method)
        return found

    def metadata(
        self, incoming: Iterable[tuple[str, str | bytes]], route: Route
    ) -> tuple[tuple[str, str | bytes], ...]:
        """The route's headers (for Lightstep exactly one ``lightstep-access-token``, the
        account's), then the allowed names of the client's — never one the route sets."""
        sets = route.names
        extra = (
            tuple((name, value) for name, value in incoming if name in self._forward and name not in sets)
            if self._forward
            else ()
        )
        return (*route.reveal(), *extra)

    def deadline(self, remaining: float | None) -> float:
        """Seconds the upstream call may take: the client's remaining time, at most the
        configured upstream timeout."""
        return self._timeout if remaining is None else min(remaining, self._timeout)

    async def export(
        self,
        account: ServiceAccount,
        method: str,
        signal: str,
        body: bytes,
        route: Route,
        incoming: Iterable[tuple[str, str | bytes]],
        remaining: float | None,
    ) -> GrpcAnswer:
        """Send ``body`` to the route's gRPC target and return how the call ended."""
        started = time.perf_counter()
        label = "error"
        call = self._call(route.grpc or self._default, method)(
            body, timeout=self.deadline(remaining), metadata=self.metadata(incoming, route)
        )
        try:
            response: bytes = await call
            label = "grpc-OK"
            return GrpcAnswer(grpc.StatusCode.OK, "", "forwarded", response)
        except aio.AioRpcError as exc:
            code = exc.code()
            label = f"grpc-{code.name}"
            trailers: Trailers = tuple((k, v) for k, v in (exc.trailing_metadata() or ()) if k in RETRY_TRAILERS)
            local = _LOCAL_FAILURES.get(code)
            if local is not None and not trailers:
                return refusal(*local)
            return GrpcAnswer(code, exc.details() or "", _reason(code), trailers=trailers)
        except asyncio.CancelledError:
            label = "client-cancelled"
            call.cancel()
            raise
        finally:
            metrics = self._metrics
            metrics.child(metrics.request_bytes, signal).inc(len(body))
            metrics.child(metrics.upstream_responses, signal, label).inc()
            metrics.child(metrics.upstream_latency, signal).observe(time.perf_counter() - started)

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        self._calls.clear()
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
