"""Contender (c): a bare aiohttp pass-through forwarder — no auth, no policy, no logging.

The same-stack ceiling for tracegate: same server, same client, same streaming, plus one
static header. Usage: python bench/forwarder.py PORT UPSTREAM_URL
"""

import sys

import aiohttp
from aiohttp import web

PORT, UPSTREAM = int(sys.argv[1]), sys.argv[2].rstrip("/")
FORWARDED = ("Content-Type", "Content-Encoding", "Content-Length")


async def forward(request: web.Request) -> web.Response:
    headers = {h: request.headers[h] for h in FORWARDED if h in request.headers}
    headers["lightstep-access-token"] = "static-bench-key"
    async with request.app["session"].post(
        UPSTREAM + request.path, data=request.content.iter_any(), headers=headers
    ) as resp:
        body = await resp.read()
        return web.Response(status=resp.status, body=body, headers={"Content-Type": resp.content_type})


async def session(app: web.Application):  # type: ignore[no-untyped-def]
    app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
    yield
    await app["session"].close()


app = web.Application()
app.cleanup_ctx.append(session)
app.router.add_post("/{path:.*}", forward)
try:  # the same event loop tracegate uses, so that c and d differ only in what tracegate adds
    import uvloop

    loop = uvloop.new_event_loop()
except ImportError:
    loop = None
web.run_app(app, host="127.0.0.1", port=PORT, access_log=None, auto_decompress=False, print=None, loop=loop)
