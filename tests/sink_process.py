"""A sink in its own process, so a test can SIGKILL it: records each request's body to a
file (one hex line, written and flushed) before it answers 200."""

import sys

from aiohttp import web

PORT, RECORD = int(sys.argv[1]), sys.argv[2]
out = open(RECORD, "a", buffering=1)  # noqa: SIM115 - lives as long as the process


async def record(request: web.Request) -> web.Response:
    body = await request.read()
    out.write(body.hex() + "\n")
    out.flush()
    return web.Response(status=200, body=b"", content_type="application/x-protobuf")


app = web.Application()
app.router.add_post("/{tail:.*}", record)
web.run_app(app, host="127.0.0.1", port=PORT, access_log=None, print=None)
