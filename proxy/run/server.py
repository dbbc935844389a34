"""Running tracegate: two listeners, signal handling, graceful drain.

SIGHUP reloads policies and secret files; SIGTERM/SIGINT stop accepting, let in-flight
requests finish for up to ``drain_seconds``, then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import logging
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.ci.routes import add_webhook_routes
from proxy.ci.store import describe
from proxy.ci.traceparent import add_traceparent_route
from proxy.doors.admin import build_admin_app
from proxy.doors.authz import build_authz_app
from proxy.doors.head_rules import Limits
from proxy.doors.ingest import RUNTIME, add_ingest_routes
from proxy.doors.ingest_conn import IngestConnection
from proxy.doors.protocol import EdgeRunner, LaneFactory, guard
from proxy.errors import ConfigError, PolicyLoadError
from proxy.gate.runtime import Runtime
from proxy.observe import multiproc
from proxy.observe.audit import AuditLog
from proxy.observe.logs import redact_aiohttp
from proxy.observe.metrics import Metrics
from proxy.policy import Policy, load_policy
from proxy.run.gcfreeze import freeze_periodically
from proxy.run.watch import FileWatch
from proxy.settings.config import Settings
from proxy.settings.secret_stores import SecretStores
from proxy.settings.tls import server_context

log = logging.getLogger("tracegate")

#: Server protocol limits: oversized header blocks and lines are refused by the parser.
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 100
#: Per-connection request body buffer (aiohttp pauses reading at twice this): bounds the
#: memory a slow upstream can make a fast client's upload take.
READ_BUFSIZE = 64 * 1024


#: Linux prctl(2) option: the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1
#: What a gRPC/HTTP/2 client on the OTLP/HTTP port is told.
GRPC_HINT = "send OTLP/gRPC to the gRPC listener (TRACEGATE_GRPC_LISTEN, port 4317 by default)"


def build_ingest_app(runtime: Runtime, policy: Policy) -> web.Application:
    app = web.Application(client_max_size=runtime.settings.max_body, middlewares=[guard(runtime.metrics)])
    app[RUNTIME] = runtime

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await runtime.start(policy)
        interval = runtime.settings.watch_interval
        watch = asyncio.get_running_loop().create_task(FileWatch(runtime, interval).run()) if interval > 0 else None
        freeze = runtime.settings.gc_freeze_interval
        freezer = asyncio.get_running_loop().create_task(freeze_periodically(freeze)) if freeze > 0 else None
        yield
        if freezer is not None:
            freezer.cancel()
            await asyncio.gather(freezer, return_exceptions=True)
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        await runtime.close()

    app.cleanup_ctx.append(lifecycle)
    if runtime.settings.grpc_listen is not None:
        from proxy.doors.grpc_door import add_grpc_listener  # grpc is imported only when its listener is on

        add_grpc_listener(app, runtime)
    add_ingest_routes(app)
    add_webhook_routes(app, runtime)
    add_traceparent_route(app)
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
    # Built before any listener opens, so that a bad authz setting stops tracegate at once.
    authz_app = build_authz_app(runtime) if settings.authz_listen is not None else None
    shared = settings.workers > 1
    tls = runtime.tls_context
    listeners: list[tuple[web.AppRunner, tuple[str, int], str, ssl.SSLContext | None]] = [
        (
            _edge(
                build_ingest_app(runtime, policy),
                runtime,
                lane=ingest_lane(runtime),
                http_limits=True,
                auto_decompress=False,
                shutdown_timeout=settings.drain_seconds,
                read_bufsize=READ_BUFSIZE,
                keepalive_timeout=settings.idle_timeout,
            ),
            settings.listen,
            "TRACEGATE_LISTEN",
            tls,
        ),
        (_edge(build_admin_app(runtime), runtime), settings.admin_listen, "TRACEGATE_ADMIN_LISTEN", None),
    ]
    if authz_app is not None and settings.authz_listen is not None:  # the gateway door; TLS as the ingest's
        authz = _edge(authz_app, runtime, http_limits=True, keepalive_timeout=settings.idle_timeout)
        listeners.append((authz, settings.authz_listen, "TRACEGATE_AUTHZ_LISTEN", tls))
    runners: list[web.AppRunner] = []
    try:
        for runner, address, setting, context in listeners:
            runners.append(runner)
            await runner.setup()
            site = web.TCPSite(runner, *address, reuse_address=True, reuse_port=shared, ssl_context=context)
            await _listen(site, setting, address)
    except BaseException:
        for started in reversed(runners):
            await started.cleanup()
        raise
    return runtime, runners


def ingest_lane(runtime: Runtime) -> LaneFactory:
    """The ingest listener's connections: exports served by ``ingest_conn``, the rest by aiohttp."""
    limits = Limits(MAX_LINE_SIZE, MAX_FIELD_SIZE, MAX_HEADERS, runtime.settings.idle_timeout)
    return lambda server: IngestConnection(runtime, limits, server.handler, server.lanes)


def _edge(app: web.Application, runtime: Runtime, *, http_limits: bool = False, **options: Any) -> EdgeRunner:
    """A runner for one listener, with tracegate's answers to malformed input (protocol.py)
    and, for listeners clients reach, the parser's header limits."""
    if http_limits:
        options.update(max_line_size=MAX_LINE_SIZE, max_field_size=MAX_FIELD_SIZE, max_headers=MAX_HEADERS)
    return EdgeRunner(
        app, metrics=runtime.metrics, grpc_hint=GRPC_HINT, access_log=None, handle_signals=False, **options
    )


async def _listen(site: web.TCPSite, setting: str, address: tuple[str, int]) -> None:
    """Start a listener; a port in use or not ours to bind is a ConfigError naming the setting."""
    try:
        await site.start()
    except OSError as exc:
        what = {errno.EADDRINUSE: "is in use", errno.EACCES: "needs privileges tracegate does not have"}.get(
            exc.errno or 0, f"cannot be bound ({exc.strerror})"
        )
        raise ConfigError(
            f"{setting}={address[0]}:{address[1]}: the address {what}; choose another with {setting}"
        ) from None


def policy_failed(settings: Settings, exc: PolicyLoadError) -> ConfigError:
    """A first policy that did not load, as one start-up line like the others: the setting,
    the problems (each with file:line) and the command that lists them one per line."""
    count = len(exc.problems)
    shown = " ".join(f"[{n}] {problem}" for n, problem in enumerate(exc.problems[:3], start=1))
    more = f" [and {count - 3} more]" if count > 3 else ""
    return ConfigError(
        f"TRACEGATE_POLICIES={settings.policies}: the policy did not load, {count} problem(s): {shown}{more} "
        f"— `tracegate check {settings.policies}` lists each"
    )


def load_first_policy(settings: Settings, environ: Mapping[str, str]) -> Policy:
    """The policy tracegate starts with (blocking: file reads). Raises ConfigError."""
    try:
        # As Runtime.load, once for all workers; store references ({aws_secret:}, {vault:}) read now.
        return load_policy(settings.policies, environ=SecretStores(environ).environ())
    except PolicyLoadError as exc:
        raise policy_failed(settings, exc) from None


def _shown(address: tuple[Any, ...]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listening(runtime: Runtime, runners: list[web.AppRunner]) -> dict[str, str]:
    """Every address tracegate listens on, as bound (a port 0 shows the port it got)."""
    names = ("listen", "admin", "authz")  # the order start() opens them in
    where = {name: _shown(runner.addresses[0]) for name, runner in zip(names, runners, strict=False)}
    where["grpc_listen"] = _shown(runtime.grpc_address) if runtime.grpc_address is not None else "off"
    return where


async def serve(
    settings: Settings, environ: Mapping[str, str], metrics: Metrics | None = None, policy: Policy | None = None
) -> int:
    """Serve until SIGTERM/SIGINT. Raises ConfigError (nothing left open) when tracegate
    cannot start, a policy that does not load included: the caller prints it as one line
    and exits 2."""
    try:
        runtime, runners = await start(settings, environ, metrics=metrics, policy=policy)
    except PolicyLoadError as exc:
        raise policy_failed(settings, exc) from None
    gc.freeze()  # start-up objects (modules, policy, keys) are never garbage: stop scanning them
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(runtime.reload()))
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    where = listening(runtime, runners)
    said = [f"OTLP/HTTP {where['listen']}", f"OTLP/gRPC {where['grpc_listen']}", f"admin {where['admin']}"]
    if "authz" in where:
        said.append(f"gateway authz {where['authz']}")
    where["outbox"] = describe(settings.outbox_path, settings.data_dir)  # never the password
    log.info("tracegate serving: %s", ", ".join(said), extra=where)
    await stop.wait()
    log.info("draining", extra={"seconds": settings.drain_seconds})
    runtime.draining = True
    for runner in [*runners[2:], *runners[:2]]:  # the authz listener first: it needs the runtime
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


def run_one(
    settings: Settings, environ: Mapping[str, str], metrics: Metrics | None = None, policy: Policy | None = None
) -> int:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(serve(settings, environ, metrics, policy))


def run(settings: Settings, environ: Mapping[str, str]) -> int:
    """Serve in this process, or with ``workers`` > 1 fork that many workers that share the
    ingest, gRPC and admin ports (SO_REUSEPORT: the kernel spreads connections), each with
    its own JWKS cache, token cache and outbox sender; any worker's ``/metrics`` answers for
    all of them (:mod:`proxy.observe.multiproc`). The parent forwards SIGHUP/SIGTERM/SIGINT and
    exits with the worst worker exit code. The policy is loaded once, before the fork: a
    policy that does not load is one ConfigError, not one per worker."""
    if settings.workers == 1:
        return run_one(settings, environ)
    policy = load_first_policy(settings, environ)
    directory, made = multiproc.enable(os.environ)
    try:
        return _fork_workers(settings, environ, directory, policy)
    finally:
        multiproc.cleanup(directory, made)


def _die_with(parent: int) -> None:
    """Ask the kernel for SIGTERM (a drain) when the parent dies, however it dies: a parent
    SIGKILLed by an orchestrator or a test must not leave workers serving on its ports."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _fork_workers(settings: Settings, environ: Mapping[str, str], directory: Path, policy: Policy) -> int:
    parent = os.getpid()
    pids = []
    for k in range(settings.workers):
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _die_with(parent)
            try:
                code = run_one(settings, environ, Metrics(multiprocess_dir=directory), policy)
            except ConfigError as exc:
                print(f"tracegate: worker {k}: {exc}", file=sys.stderr, flush=True)
                code = 2
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
