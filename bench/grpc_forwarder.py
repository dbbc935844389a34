"""Contender (i): a bare grpc.aio pass-through forwarder — no auth, no policy, no logging.

The same-stack ceiling for tracegate's gRPC door: same server library, same channel, raw
bytes both ways, plus one static metadata entry. Usage: python bench/grpc_forwarder.py PORT UPSTREAM
"""

import asyncio
import sys

import grpc
from grpc import aio

PORT, UPSTREAM = int(sys.argv[1]), sys.argv[2]
KEY = (("lightstep-access-token", "static-bench-key"),)


class Forward(grpc.GenericRpcHandler):
    def __init__(self, channel: aio.Channel) -> None:
        self.channel = channel
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}  # type: ignore[type-arg]

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        method: str = details.method
        if method not in self.handlers:
            upstream = self.channel.unary_unary(method)

            async def forward(request: bytes, context: aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
                try:
                    return await upstream(request, metadata=KEY, timeout=context.time_remaining())  # type: ignore[no-any-return]
                except aio.AioRpcError as exc:
                    await context.abort(exc.code(), exc.details() or "")
                    raise

            self.handlers[method] = grpc.unary_unary_rpc_method_handler(forward)
        return self.handlers[method]


async def main() -> None:
    server = aio.server(handlers=[Forward(aio.insecure_channel(UPSTREAM))], options=[("grpc.so_reuseport", 0)])
    server.add_insecure_port(f"127.0.0.1:{PORT}")
    await server.start()
    await server.wait_for_termination()


try:  # the event loop tracegate uses, so that i and k differ only in what tracegate adds
    import uvloop

    uvloop.run(main())
except ImportError:
    asyncio.run(main())
