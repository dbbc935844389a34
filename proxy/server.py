"""Running tracegate: two listeners, signal handling, graceful drain.

SIGHUP reloads policies and secret files, and so does a change to them on disk
(:mod:`proxy.watch`); SIGTERM/SIGINT stop accepting, let in-flight requests finish for up
to ``drain_seconds``, then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from http import HTTPStatus
from pathlib import Path

from aiohttp import web

from proxy import multiproc
from proxy.admin import build_admin_app
from proxy.audit import AuditLog
from proxy.config import Settings
from proxy.errors import OutboxUnavailable, PolicyLoadError
from proxy.ingest import RUNTIME, add_ingest_routes
from proxy.logs import redact_aiohttp
from proxy.metrics import Metrics
from proxy.policy import Policy
from proxy.runtime import Runtime
from proxy.tls import server_context
from proxy.watch import FileWatch
from proxy.webhooks.routes import add_webhook_routes

log = logging.getLogger("tracegate")

#: Server protocol limits: oversized header blocks and lines are refused by the parser.
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 100
#: Per-connection request body buffer (aiohttp pauses reading at twice this): bounds the
#: memory a slow upstream can make a fast client's upload take.
READ_BUFSIZE = 64 * 1024


class _QuietRequestHandler(web.RequestHandler):
    """aiohttp answers a malformed request with its parser's message, which quotes the
    offending header bytes — an ``Authorization`` line among them. Answer with the
    status phrase alone."""

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        return super().handle_error(request, status, exc, HTTPStatus(status).phrase)


class _QuietServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _QuietRequestHandler(self, loop=self._loop, **self._kwargs)


class _QuietRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _QuietServer  # same object and state; only how it makes handlers changes
        return server


def build_ingest_app(runtime: Runtime, policy: Policy) -> web.Application:
    app = web.Application(client_max_size=runtime.settings.max_body)
    app[RUNTIME] = runtime

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await runtime.start(policy)
        interval = runtime.settings.watch_interval
        watch = asyncio.get_running_loop().create_task(FileWatch(runtime, interval).run()) if interval > 0 else None
        yield
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        await runtime.close()

    app.cleanup_ctx.append(lifecycle)
    add_ingest_routes(app)
    add_webhook_routes(app, runtime)
    return app


async def start(
    settings: Settings,
    environ: Mapping[str, str],
    *,
    metrics: Metrics | None = None,
    audit: AuditLog | None = None,
    policy: Policy | None = None,
) -> tuple[Runtime, list[web.AppRunner]]:
    """Load the policy and start both listeners. Raises PolicyLoadError if the first
    policy does not load: tracegate never starts without one."""
    redact_aiohttp()
    runtime = Runtime(settings, environ, metrics or Metrics(), audit=audit)
    if settings.tls is not None:
        runtime.tls_context = server_context(settings.tls)
    if policy is None:
        policy = await asyncio.to_thread(runtime.load)
    ingest = _QuietRunner(
        build_ingest_app(runtime, policy),
        access_log=None,
        auto_decompress=False,
        shutdown_timeout=settings.drain_seconds,
        handle_signals=False,
        max_line_size=MAX_LINE_SIZE,
        max_field_size=MAX_FIELD_SIZE,
        max_headers=MAX_HEADERS,
        read_bufsize=READ_BUFSIZE,
        keepalive_timeout=settings.idle_timeout,
    )
    admin = web.AppRunner(build_admin_app(runtime), access_log=None, handle_signals=False)
    await ingest.setup()
    await admin.setup()
    shared = settings.workers > 1
    await web.TCPSite(
        ingest, *settings.listen, reuse_address=True, reuse_port=shared, ssl_context=runtime.tls_context
    ).start()
    await web.TCPSite(admin, *settings.admin_listen, reuse_address=True, reuse_port=shared).start()
    return runtime, [ingest, admin]


async def serve(settings: Settings, environ: Mapping[str, str], metrics: Metrics | None = None) -> int:
    try:
        runtime, runners = await start(settings, environ, metrics=metrics)
    except PolicyLoadError as exc:
        for problem in exc.problems:
            log.error("policy failed to load: %s", problem)
        return 2
    except OutboxUnavailable as exc:
        log.error("outbox could not be opened: %s", exc.reason)
        return 2
    gc.freeze()  # start-up objects (modules, policy, keys) are never garbage: stop scanning them
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(runtime.reload()))
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    listen, admin = settings.listen, settings.admin_listen
    log.info("tracegate serving", extra={"listen": f"{listen[0]}:{listen[1]}", "admin": f"{admin[0]}:{admin[1]}"})
    await stop.wait()
    log.info("draining", extra={"seconds": settings.drain_seconds})
    runtime.draining = True
    for runner in runners:
        await runner.cleanup()
    log.info("stopped")
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (the ``fast`` extra), else the standard event loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_one(settings: Settings, environ: Mapping[str, str], metrics: Metrics | None = None) -> int:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(serve(settings, environ, metrics))


def run(settings: Settings, environ: Mapping[str, str]) -> int:
    """Serve in this process, or with ``workers`` > 1 fork that many workers that share the
    ingest and admin ports (SO_REUSEPORT: the kernel spreads connections), each with its own
    JWKS cache, token cache and outbox sender; any worker's ``/metrics`` answers for all of
    them (:mod:`proxy.multiproc`). The parent forwards SIGHUP/SIGTERM/SIGINT and exits with
    the worst worker exit code."""
    if settings.workers == 1:
        return run_one(settings, environ)
    directory, made = multiproc.enable(os.environ)
    try:
        return _fork_workers(settings, environ, directory)
    finally:
        multiproc.cleanup(directory, made)


def _fork_workers(settings: Settings, environ: Mapping[str, str], directory: Path) -> int:
    pids = []
    for _ in range(settings.workers):
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = run_one(settings, environ, Metrics(multiprocess_dir=directory))
            os._exit(code)
        pids.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    worst = 0
    for child in pids:
        _, status = os.waitpid(child, 0)
        multiproc.worker_exited(directory, child)
        worst = max(worst, os.waitstatus_to_exitcode(status) & 0xFF)
    return worst
