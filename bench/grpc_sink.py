"""The gRPC benchmarks' upstream: answers every unary call OK with an empty message.
Usage: python bench/grpc_sink.py PORT"""

import asyncio
import sys

import grpc
from grpc import aio

PORT = int(sys.argv[1])


async def ok(request: bytes, context: aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
    return b""


class Any(grpc.GenericRpcHandler):
    handler = grpc.unary_unary_rpc_method_handler(ok)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        return self.handler


async def main() -> None:
    server = aio.server(handlers=[Any()], options=[("grpc.so_reuseport", 0)])
    server.add_insecure_port(f"127.0.0.1:{PORT}")
    await server.start()
    await server.wait_for_termination()


asyncio.run(main())
