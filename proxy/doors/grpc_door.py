"""The OTLP/gRPC door: unary ``Export`` of the trace, metrics and logs services on 4317.

Identify → decide is :func:`proxy.gate.admission.admit`, shared with every other door; this
module only knows where gRPC puts the credential (metadata: ``authorization: Bearer …`` or
``lightstep-access-token``), which method is which signal, and how a gRPC answer is
written (:mod:`proxy.grpc_status`). Messages are not decoded: the generic handler has no
deserializer and no serializer, so the request's bytes go upstream as they came and the
upstream's response bytes come back as they were.

As on OTLP/HTTP, the call is identified and decided *before* its message is read: the
handler is registered as client-streaming (the same bytes on the wire as a unary call), so
it runs when the metadata arrives and reads the one message only once admitted. A refused
call never reaches the upstream and its message is never buffered; a call is answered OK
only when the upstream said OK. gRPC itself refuses a message over
``TRACEGATE_MAX_BODY_BYTES`` (after gzip decompression) with ``RESOURCE_EXHAUSTED``; the
handler then reads no message and records ``body-too-large``. An Export that ends its stream
without any message is ``INVALID_ARGUMENT`` (``no-message``); a zero-length message is a
message (an empty export) and goes upstream like any other.

The server is a ``grpc.aio`` server in the event loop of the process that serves it: it is
created after ``--workers`` forked (grpc objects must not cross a fork), with
``SO_REUSEPORT`` when workers share the port. TLS uses the listener's certificate files;
SIGHUP hands new ones to new handshakes (``dynamic_ssl_server_credentials``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable

import grpc
from aiohttp import web
from grpc import aio
from multidict import CIMultiDict

from proxy.errors import BodyError, ConfigError, StampError, UpstreamError
from proxy.gate.admission import Admitted, Refused, admit, refuse
from proxy.gate.runtime import Runtime
from proxy.grpc_status import GrpcAnswer, failure, from_http, refusal
from proxy.settings.tls import TlsFiles
from proxy.upstream.forward import MAX_ANSWER_BYTES
from proxy.upstream.grpc import GrpcUpstream, read_roots
from proxy.upstream.headers import FORWARDED
from proxy.upstream.stamp import stamp_for, stamp_protobuf

log = logging.getLogger("tracegate")

#: The OTLP/gRPC methods, by full method name, and the signal each carries.
METHODS = {
    "/opentelemetry.proto.collector.trace.v1.TraceService/Export": "traces",
    "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export": "metrics",
    "/opentelemetry.proto.collector.logs.v1.LogsService/Export": "logs",
}
PROTOBUF = "application/x-protobuf"
#: Seconds an Export whose stream ended without a message waits for gRPC's own end of a call
#: it refused as too large (measured: under 15 ms with 500 such calls at once).
OVERSIZE_GRACE = 1.0
DRAINING = "tracegate is shutting down; retry"


def _certificates(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    try:
        chain = [(files.key.read_bytes(), files.cert.read_bytes())]
        client_ca = files.client_ca.read_bytes() if files.client_ca is not None else None
    except OSError as exc:
        raise ConfigError(
            f"TRACEGATE_TLS_CERT={files.cert} / TRACEGATE_TLS_KEY={files.key}: cannot read them for the gRPC "
            f"listener ({type(exc).__name__}); give files tracegate's user can read"
        ) from None
    return grpc.ssl_server_certificate_configuration(chain, root_certificates=client_ca)


def _cannot_listen(address: tuple[str, int], why: str) -> ConfigError:
    return ConfigError(
        f"TRACEGATE_GRPC_LISTEN={address[0]}:{address[1]}: cannot listen there ({why}); "
        "choose another address or set it to off"
    )


def _check_bindable(address: tuple[str, int], *, shared: bool) -> None:
    """Bind and release the address as gRPC will (SO_REUSEADDR, and SO_REUSEPORT when
    workers share it), so that a port in use is one clear error before anything starts
    rather than gRPC's own log line after the runtime did."""
    host, port = address
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if shared:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise _cannot_listen(address, exc.strerror or type(exc).__name__) from None


class _Methods(grpc.GenericRpcHandler):
    def __init__(self, door: GrpcDoor) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
            method: grpc.stream_unary_rpc_method_handler(door.handler(method, signal))
            for method, signal in METHODS.items()
        }

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        return self._handlers.get(handler_call_details.method)  # unknown method: None, answered UNIMPLEMENTED


def add_grpc_listener(app: web.Application, runtime: Runtime) -> None:
    """Run the gRPC listener with the ingest app, in its event loop: started after the
    runtime (registered after the runtime's cleanup context), told to drain when the app
    shuts down — at the same time as the HTTP listener — and closed before the runtime.
    Raises ConfigError at once if the gRPC address cannot be bound, before anything starts."""
    settings = runtime.settings
    if settings.grpc_listen is not None:
        _check_bindable(settings.grpc_listen, shared=settings.workers > 1)
    door = GrpcDoor(runtime)

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await door.start()
        yield
        await door.cleanup()

    async def drain(_app: web.Application) -> None:
        door.begin_drain()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(drain)


class GrpcDoor:
    """The gRPC listener and its upstream channels, for one runtime."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        settings = runtime.settings
        extra = runtime.header_policy.forwarded - FORWARDED
        self._upstream = GrpcUpstream(
            runtime.metrics,
            default_target=settings.grpc_upstream,
            timeout=settings.upstream_timeout,
            max_message=settings.max_body,
            forward_metadata=extra,
            root_certificates=read_roots(settings.grpc_upstream_ca),
        )
        self._server: aio.Server | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._pending_certificates: grpc.ServerCertificateConfiguration | None = None

    def handler(self, method: str, signal: str) -> Callable[..., object]:
        async def export(_messages: object, context: aio.ServicerContext[bytes, bytes]) -> bytes:
            return await self._export(method, signal, context)

        return export

    async def _export(self, method: str, signal: str, context: aio.ServicerContext[bytes, bytes]) -> bytes:
        runtime = self._runtime
        if self._stopping is not None:  # draining: new calls are told to go elsewhere
            refuse(runtime, signal=signal, transport="grpc", reason="draining", status=503)
            return await self._answer(context, failure(grpc.StatusCode.UNAVAILABLE, DRAINING, "draining"))
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._admit_and_forward(method, signal, context)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _admit_and_forward(self, method: str, signal: str, context: aio.ServicerContext[bytes, bytes]) -> bytes:
        runtime = self._runtime
        incoming = tuple(context.invocation_metadata() or ())
        headers: CIMultiDict[str] = CIMultiDict((k, v) for k, v in incoming if isinstance(v, str))
        admitted = await admit(runtime, headers, {}, signal=signal, transport="grpc")
        if isinstance(admitted, Refused):
            return await self._answer(context, refusal(admitted.status, admitted.reason, admitted.retry_after))
        try:
            # The one message, then the end of the stream, within the body timeout (as on
            # OTLP/HTTP): an admitted caller may not hold a call open by never sending.
            async with asyncio.timeout(runtime.settings.body_timeout):
                request = await context.read()
                after = await context.read() if isinstance(request, bytes) else None
        except TimeoutError:
            admitted.record("failed", "body-timeout")
            return await self._answer(context, refusal(408, "body-timeout"))
        if not isinstance(request, bytes):  # EOF: over the size limit (gRPC answered it), or no message at all
            return await self._no_message(admitted, context)
        if isinstance(after, bytes):  # Export is unary: a second message is not OTLP
            admitted.record("failed", "more-than-one-message", bytes_in=len(request))
            return await self._answer(context, refusal(400, "more-than-one-message"))
        quotas, rule = runtime.gate.quotas, admitted.decision.rule
        if quotas is not None and rule is not None:  # its bytes, now known, before anything goes upstream
            over = quotas.take_bytes(rule.name, len(request), runtime.monotonic(), runtime.clock)
            if over is not None:
                admitted.record("refused", over.reason, bytes_in=len(request))
                return await self._answer(context, refusal(429, over.reason, over.wait))
        if admitted.account.stamp:  # grpcio has already inflated a gzip message
            try:
                request = stamp_protobuf(request, stamp_for(admitted.account, admitted.identity))
            except StampError as exc:
                admitted.record("failed", exc.reason, bytes_in=len(request))
                return await self._answer(context, refusal(exc.status, exc.reason))
        try:
            answer = await self._forward(admitted, method, request, incoming, context.time_remaining())
        except asyncio.CancelledError:  # the client's deadline passed or it cancelled
            admitted.record("failed", "client-cancelled", bytes_in=len(request))
            raise
        status = answer.code.name if answer.outcome == "allowed" else None
        admitted.record(answer.outcome, answer.reason, bytes_in=len(request), upstream_status=status)
        return await self._answer(context, answer)

    async def _no_message(self, admitted: Admitted, context: aio.ServicerContext[bytes, bytes]) -> bytes:
        """The call's stream ended without a message. grpcio reads two different events as
        this one EOF: a message over ``TRACEGATE_MAX_BODY_BYTES``, which gRPC refused itself
        (the client already has its RESOURCE_EXHAUSTED) and whose call it then ends, which
        cancels this handler within milliseconds; and a client that half-closed without
        sending the one message an Export needs, which is INVALID_ARGUMENT (``no-message``,
        as a second message is ``more-than-one-message``). Waiting up to
        :data:`OVERSIZE_GRACE` seconds for that cancellation tells them apart."""
        try:
            await asyncio.sleep(min(OVERSIZE_GRACE, self._runtime.settings.body_timeout))
        except asyncio.CancelledError:  # gRPC ended the call: the message was too large, or the deadline passed
            remaining = context.time_remaining()
            admitted.record(
                "failed", "client-cancelled" if remaining is not None and remaining <= 0 else "body-too-large"
            )
            raise
        admitted.record("failed", "no-message")
        return await self._answer(context, refusal(400, "no-message"))

    async def _forward(
        self,
        admitted: Admitted,
        method: str,
        request: bytes,
        incoming: tuple[tuple[str, str | bytes], ...],
        remaining: float | None,
    ) -> GrpcAnswer:
        account, signal = admitted.account, admitted.signal
        forwarder = self._runtime.forwarder
        if forwarder is None:
            raise RuntimeError("runtime not started")
        try:
            route = forwarder.route(account, signal)
        except BodyError as exc:  # a signal the account's backend takes not (check refuses such a policy)
            return refusal(exc.status, exc.reason)
        # A backend that takes OTLP/HTTP only (route.grpc None) is bridged, as
        # ``upstream_protocol: http`` asks for any backend.
        if account.upstream_protocol == "grpc" and route.grpc is not None:
            return await self._upstream.export(account, method, signal, request, route, incoming, remaining)
        return await self._bridge(admitted, request, remaining)

    async def _bridge(self, admitted: Admitted, request: bytes, remaining: float | None) -> GrpcAnswer:
        """``upstream_protocol: http``: the message to the account's OTLP/HTTP path, counted
        in the same upstream metrics as OTLP/HTTP requests (status: the HTTP status)."""
        runtime, signal = self._runtime, admitted.signal
        forwarder = runtime.forwarder
        if forwarder is None:
            raise RuntimeError("runtime not started")
        started, label = time.perf_counter(), "error"
        try:
            got = await forwarder.exchange(
                admitted.account, signal, request, PROTOBUF, timeout=self._upstream.deadline(remaining)
            )
            label = str(got.status)
        except UpstreamError as exc:
            label = "timeout" if exc.status == 504 else "unreachable"
            return refusal(exc.status, exc.reason)
        finally:
            metrics = runtime.metrics
            metrics.child(metrics.request_bytes, signal).inc(len(request))
            metrics.child(metrics.upstream_responses, signal, label).inc()
            metrics.child(metrics.upstream_latency, signal).observe(time.perf_counter() - started)
        return from_http(got.status, got.body, got.headers.get("Content-Type"), got.headers.get("Retry-After"))

    @staticmethod
    async def _answer(context: aio.ServicerContext[bytes, bytes], answer: GrpcAnswer) -> bytes:
        if answer.code is grpc.StatusCode.OK:
            if answer.trailers:
                context.set_trailing_metadata(answer.trailers)
            return answer.body
        await context.abort(answer.code, answer.details, answer.trailers)  # raises: the call ends here

    def _credentials(self, files: TlsFiles) -> grpc.ServerCredentials:
        def fetch() -> grpc.ServerCertificateConfiguration | None:
            found, self._pending_certificates = self._pending_certificates, None
            return found

        return grpc.dynamic_ssl_server_credentials(
            _certificates(files),
            fetch,  # type: ignore[arg-type]  # grpcio: None means "keep the current certificate"
            require_client_authentication=files.client_ca is not None,
        )

    def reload_tls(self) -> None:
        """Called on SIGHUP after the HTTP listener's certificate reloaded: new gRPC
        handshakes get the new files too; connections already open keep theirs."""
        files = self._runtime.settings.tls
        if files is not None and self._server is not None:
            self._pending_certificates = _certificates(files)

    async def start(self) -> None:
        settings = self._runtime.settings
        if settings.grpc_listen is None:
            raise RuntimeError("the gRPC listener is off")
        host, port = settings.grpc_listen
        options = [
            ("grpc.max_receive_message_length", settings.max_body),
            ("grpc.max_send_message_length", MAX_ANSWER_BYTES),
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
            ("grpc.max_connection_idle_ms", int(settings.idle_timeout * 1000)),
        ]
        server = aio.server(handlers=[_Methods(self)], options=options)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        files = settings.tls
        try:
            if files is None:
                bound = server.add_insecure_port(address)
            else:
                bound = server.add_secure_port(address, self._credentials(files))
        except RuntimeError:
            bound = 0
        if not bound:
            await server.stop(None)
            raise _cannot_listen((host, port), "gRPC could not bind it")
        await server.start()
        self._server = server
        self._runtime.grpc_address = (host, bound)
        self._runtime.grpc_serving = True
        self._runtime.tls_reload_hooks.append(self.reload_tls)

    def begin_drain(self) -> None:
        """Stop taking calls: from now on a new call is answered UNAVAILABLE (by the handler,
        so never CANCELLED by a server half shut down), calls in flight have
        TRACEGATE_DRAIN_SECONDS to finish, then the server stops (GOAWAY, listener closed).
        :meth:`cleanup` waits for all of it."""
        if self._server is not None and self._stopping is None:
            self._runtime.grpc_serving = False
            self._stopping = asyncio.ensure_future(self._drain(self._server))

    async def _drain(self, server: aio.Server) -> None:
        grace = self._runtime.settings.drain_seconds
        loop = asyncio.get_running_loop()
        until = loop.time() + grace
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        await server.stop(max(0.0, until - loop.time()))

    async def cleanup(self) -> None:
        self.begin_drain()
        if self._stopping is not None:
            await self._stopping
        self._server = None
        await self._upstream.close()
