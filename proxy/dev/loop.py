"""``tracegate dev``: the real pipeline flow on this machine, kept running.

``tracegate dev`` starts a stand-in GitLab issuer, a recording sink (playing Lightstep, or
the backend ``--backend NAME`` names) and tracegate between them, all on 127.0.0.1, prints a
ready-to-paste ID token and the exact ``OTEL_EXPORTER_OTLP_*`` variables, then prints every
decision (the audit lines, as in production) and every request the sink receives — checked
against the backend's documented path and headers (:mod:`proxy.dev.backends`) — until Ctrl-C.
Point a real SDK or the OpenTelemetry Collector at it.

``tracegate dev token --claim project_path=a/b --claim ref=main`` mints another token for
the running dev issuer. How: the dev process keeps a *state directory* (``--state``,
default ``./.tracegate-dev``, mode 0700) holding ``state.json`` (the issuer URL, key id,
audience, addresses and the dev process's pid) and ``signing-key.pem`` (the issuer's RSA
key, mode 0600). ``dev token`` signs with that key; the running issuer serves its public
half, so tracegate verifies the token as it would a GitLab one. Both files are removed
when ``dev`` stops. No network call is needed to mint, and no mint endpoint is open to
other local users: minting takes read access to the key file, which only its owner has.

The policy is in ``STATE/policies``: ``00-dev-issuer.yaml`` and ``05-dev-account.yaml`` (the
service account ``ci`` of the chosen backend; both rewritten on every start: the ports change)
and ``10-dev-rules.yaml`` (written once; edit it and send SIGHUP to the dev process to reload,
as with ``serve``). A rules file written before ``--backend`` existed defines ``ci`` itself:
it keeps serving Lightstep, and another backend asks for its ``service_accounts:`` to go.
``20-dev-webhooks.yaml`` (rewritten on every start, :mod:`proxy.dev.forges`) holds a GitLab
and a Gitea webhook entry; the banner prints the ``curl`` lines that send the bundled payloads,
whose GitLab job span is the one ``GET /v1/traceparent`` answers for the dev token. The whole
policy passes ``tracegate check --strict``.

The stand-ins come from :mod:`proxy.dev.standins`, imported only when ``dev`` runs; the
request path imports neither module. Everything listens on loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from proxy.dev import forges
from proxy.dev.backends import (
    DOCUMENTED,
    account_in_own_file,
    account_yaml,
    banner,
    check_grpc,
    check_http,
    key_variable,
)
from proxy.dev.spans import TRACE_SERVICE, span_lines
from proxy.dev.state import (
    AUDIENCE,
    DEFAULT_STATE,
    DEFAULT_TTL,
    DEV_PROJECT_ID,
    mint,
    parse_claims,
    prepare,
    write_private,
)

ISSUER_YAML = """\
# Rewritten by `tracegate dev` on every start. The dev issuer stands in for https://gitlab.com.
issuers:
  gitlab:
    issuer: {issuer}
    audiences: [{audience}]
"""

RULES_YAML = """\
# Written once by `tracegate dev`; edit it, then `kill -HUP <pid of tracegate dev>` to reload.
# The same shape as the starter policy (policies/tracegate.yaml), plus a deny rule. The
# service account ci is in 05-dev-account.yaml, rewritten on every start (--backend NAME).
rules:
  - name: no-forks
    issuer: gitlab
    effect: deny
    when: {{project_path: {{match: "*/forks/*", case: insensitive}}}}
  - name: my-project
    issuer: gitlab
    when: {{project_id: "{project_id}"}}
    service_account: ci
"""


def add_dev_parser(sub: Any) -> None:
    """``tracegate dev`` and ``tracegate dev token`` (``sub``: the CLI's subparsers)."""
    dev = sub.add_parser(
        "dev", help="keep a stand-in issuer, a recording sink and tracegate running on loopback; print a token"
    )
    dev.add_argument("--state", default=DEFAULT_STATE, help=f"state directory (default {DEFAULT_STATE})")
    dev.add_argument("--listen", default="127.0.0.1:4318", help="tracegate's OTLP/HTTP listener (default %(default)s)")
    dev.add_argument("--admin-listen", default="127.0.0.1:9464", help="admin listener (default %(default)s)")
    dev.add_argument(
        "--grpc-listen", default="127.0.0.1:4317", help="tracegate's OTLP/gRPC listener, or off (default %(default)s)"
    )
    dev.add_argument("--ttl", type=_seconds, help=f"token lifetime, seconds (default {DEFAULT_TTL})")
    dev.add_argument(
        "--backend",
        choices=tuple(DOCUMENTED),
        default="lightstep",
        help="the backend the dev account sends to; the sink checks its documented paths and headers "
        "(default %(default)s)",
    )
    more = dev.add_subparsers(dest="dev_command")
    token = more.add_parser("token", help="mint a token for the running `tracegate dev` issuer (printed on stdout)")
    token.add_argument("--state", default=argparse.SUPPRESS, help="the dev process's state directory")
    token.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a claim (repeatable); NAME= removes it. project_path also sets namespace_path, "
        "and project_path/ref/ref_type set sub, unless given",
    )
    token.add_argument(
        "--ttl", type=_seconds, default=argparse.SUPPRESS, help="lifetime, seconds (default: the dev process's)"
    )
    token.add_argument("--export", action="store_true", help="print `export OTEL_EXPORTER_OTLP_HEADERS=…` instead")


def _seconds(text: str) -> int:
    value = int(text)
    if not 0 < value <= 7 * 86400:
        raise argparse.ArgumentTypeError("seconds between 1 and 604800 (a week)")
    return value


def run_dev_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from proxy.errors import ConfigError

    state = Path(args.state)
    if args.dev_command == "token":
        try:
            token = mint(state, parse_claims(args.claim), args.ttl)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        print(export_headers(token) if args.export else token)
        return 0
    try:
        return asyncio.run(
            run_dev(
                state,
                args.listen,
                args.admin_listen,
                args.ttl or DEFAULT_TTL,
                grpc_listen=args.grpc_listen,
                backend=args.backend,
                environ=store_environment(environ),
            )
        )
    except KeyboardInterrupt:  # Ctrl-C while starting, before our handler is installed
        return 130


# --- what to paste -------------------------------------------------------------------------


#: The shell variable the banner prints the token into, once; every other line names it.
TOKEN_VARIABLE = "TRACEGATE_DEV_TOKEN"  # noqa: S105 - a variable name, not its value
#: OTEL_EXPORTER_OTLP_HEADERS from that variable (percent-encoded: the space is %20).
HEADERS_FROM_TOKEN = f'export OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer%20${{{TOKEN_VARIABLE}}}"'


def export_headers(token: str) -> str:
    # The header value is percent-encoded: the space in "Bearer <token>" becomes %20.
    return f"export OTEL_EXPORTER_OTLP_HEADERS=authorization=Bearer%20{token}"


def exporter_variables(token: str, http_endpoint: str, grpc_endpoint: str | None = None) -> list[str]:
    """The lines to paste into a shell: the token, once, in ``TRACEGATE_DEV_TOKEN``; then
    the ``OTEL_EXPORTER_OTLP_*`` variables for OTLP/HTTP, and for OTLP/gRPC when tracegate
    has a gRPC listener (see :func:`grpc_endpoint`), each group complete by itself."""
    lines = [
        f"export {TOKEN_VARIABLE}={token}",
        "# OTLP/HTTP (protobuf or JSON); the SDK appends /v1/traces, /v1/metrics, /v1/logs",
        f"export OTEL_EXPORTER_OTLP_ENDPOINT={http_endpoint}",
        "export OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf",
        HEADERS_FROM_TOKEN,
    ]
    if grpc_endpoint is not None:
        lines += [
            "# or OTLP/gRPC",
            f"export OTEL_EXPORTER_OTLP_ENDPOINT={grpc_endpoint}",
            "export OTEL_EXPORTER_OTLP_PROTOCOL=grpc",
            "export OTEL_EXPORTER_OTLP_INSECURE=true",
            HEADERS_FROM_TOKEN,
        ]
    return lines


def collector_exporter(http_endpoint: str) -> list[str]:
    """An OpenTelemetry Collector exporter block (the Collector does not read the
    ``OTEL_EXPORTER_OTLP_*`` variables; ``otlphttp`` appends ``/v1/<signal>`` itself). The
    token comes from the Collector's environment (``${env:…}``: run it where the token
    variable was exported)."""
    return [
        "exporters:",
        "  otlphttp/tracegate:",
        f"    endpoint: {http_endpoint}",
        f'    headers: {{authorization: "Bearer ${{env:{TOKEN_VARIABLE}}}"}}',
    ]


def grpc_endpoint(address: tuple[str, int] | None) -> str | None:
    """The OTLP/gRPC endpoint to paste (plaintext on loopback), or None when it is off."""
    return None if address is None else f"http://{address[0]}:{address[1]}"


# --- running -------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_free(flag: str, address: str) -> None:
    """Fail before anything starts when a listener's port is taken (the usual cause: a
    ``tracegate dev`` or ``serve`` already running)."""
    from proxy.settings.values import host_port

    try:
        host, port = host_port(address)
    except ValueError as exc:
        raise ValueError(f"{flag}={address!r}: {exc}") from None
    if host != "localhost" and not _is_loopback(host):
        raise ValueError(f"{flag}={address}: tracegate dev listens on loopback only; use 127.0.0.1:PORT")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listener will
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ValueError(
                f"{flag}={address}: cannot listen there ({exc.strerror}); is another tracegate running? "
                f"pass {flag} 127.0.0.1:PORT"
            ) from None


def _say(text: str = "") -> None:
    print(text, flush=True)


#: What dev's tracegate takes from the caller's environment, so that a rule file using
#: ``{aws_secret:}`` / ``{vault:}`` references or an ``aws`` issuer works as under ``serve``:
#: the stores' and AWS's own settings, nothing else (dev's settings are its flags).
_STORE_PREFIXES = ("AWS_", "VAULT_", "TRACEGATE_SECRET_", "TRACEGATE_VAULT_")


def store_environment(environ: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in environ.items() if name.startswith(_STORE_PREFIXES)}


async def run_dev(
    state: Path,
    listen: str,
    admin_listen: str,
    ttl: int,
    *,
    grpc_listen: str = "off",
    backend: str = "lightstep",
    environ: Mapping[str, str] | None = None,
) -> int:
    from proxy.dev.standins import GrpcSink, Received, Sink, StandInIssuer
    from proxy.errors import ConfigError, PolicyLoadError
    from proxy.observe import logs
    from proxy.observe.audit import AuditLog
    from proxy.run.server import start
    from proxy.secrets import Secret
    from proxy.settings.config import Settings

    try:
        prepare(state)
        checked = [("--listen", listen), ("--admin-listen", admin_listen)]
        for flag, address in checked + ([("--grpc-listen", grpc_listen)] if grpc_listen != "off" else []):
            _check_free(flag, address)
        policies = state / "policies"
        rules = policies / "10-dev-rules.yaml"
        own_account = account_in_own_file(rules, backend)
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from None
    logs.configure("WARNING")
    issuer, sink, grpc_sink = StandInIssuer(), Sink(), GrpcSink()
    key = Secret("lsdev-" + secrets.token_hex(16))

    def received(request: Received) -> None:
        seen = check_http(backend, key.reveal(), request.method, request.path, request.headers, len(request.body))
        _say(f"# sink: {seen}")
        if DOCUMENTED[backend].signal_of(request.path) == "traces":
            for line in span_lines(
                request.body, request.headers.get("Content-Type"), request.headers.get("Content-Encoding")
            ):
                _say(f"# sink: {line}")
        sink.received.clear()  # long-running: keep nothing

    sink.on_receive = received
    await issuer.start()
    await sink.start()
    await grpc_sink.start()
    policies.mkdir(exist_ok=True)
    (policies / "00-dev-issuer.yaml").write_text(ISSUER_YAML.format(issuer=issuer.url, audience=AUDIENCE))
    account = policies / "05-dev-account.yaml"
    if own_account:
        account.write_text(account_yaml(backend, sink.url, grpc_sink.target))
    else:
        account.unlink(missing_ok=True)
    if not rules.exists():
        rules.write_text(RULES_YAML.format(project_id=DEV_PROJECT_ID))
    forges.write(state, issuer.url)
    runners: list[Any] = []
    try:
        flags = {
            "policies": str(policies),
            "listen": listen,
            "admin_listen": admin_listen,
            "upstream": sink.url,
            "data_dir": str(state / "data"),
            "grpc_listen": grpc_listen,
            "grpc_upstream": grpc_sink.target,
            "watch_interval": "0",  # dev reloads on SIGHUP, as it says
        }
        settings = Settings.load(flags, {})
        audit = AuditLog(_audit_line, flush_interval=0)
        try:
            runtime, runners = await start(
                settings, {**(environ or {}), key_variable(backend): key.reveal()}, audit=audit
            )
        except PolicyLoadError as exc:
            raise ConfigError(f"{rules}: " + "; ".join(str(p) for p in exc.problems)) from None
        except OSError as exc:
            raise ConfigError(f"cannot listen ({exc.strerror}); pass --listen/--admin-listen 127.0.0.1:PORT") from None
        for _ in range(400):
            if not runtime.issuers_without_keys():
                break
            await asyncio.sleep(0.025)
        port = runners[0].addresses[0][1]
        write_private(state / "signing-key.pem", issuer.private_key_pem())
        info = {
            "pid": os.getpid(),
            "issuer": issuer.url,
            "kid": issuer.rsa_kid,
            "audience": AUDIENCE,
            "ttl": ttl,
            "ingest": f"http://127.0.0.1:{port}",
            "admin": f"http://127.0.0.1:{runners[1].addresses[0][1]}",
            "sink": sink.url,
            "backend": backend,
        }
        write_private(state / "state.json", json.dumps(info, indent=1).encode())
        token = mint(state, {}, ttl)
        stop = _install_signals(runtime.reload)
        _banner(info, token, grpc_endpoint(runtime.grpc_address), state)
        await _relay_grpc(grpc_sink, backend, key.reveal(), stop)
    finally:
        _remove_signals()
        for runner in runners:
            await runner.cleanup()
        await issuer.stop()
        await sink.stop()
        await grpc_sink.stop()
        for name in ("state.json", "signing-key.pem"):
            with contextlib.suppress(FileNotFoundError):
                (state / name).unlink()
        forges.remove(state)
    _say("# tracegate dev stopped")
    return 0


async def _relay_grpc(grpc_sink: Any, backend: str, key: str, stop: asyncio.Event) -> None:
    """Until ``stop``: say what the gRPC sink received, as the HTTP sink's callback does."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)
        for call in grpc_sink.received:
            _say(f"# grpc sink: {check_grpc(backend, key, call.method, call.metadata, len(call.body))}")
            for line in span_lines(call.body) if call.method.startswith(TRACE_SERVICE) else []:
                _say(f"# grpc sink: {line}")
        grpc_sink.received.clear()


def _audit_line(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _banner(info: Mapping[str, Any], token: str, grpc: str | None, state: Path) -> None:
    _say(f"# stand-in GitLab issuer  {info['issuer']}  (OIDC discovery + JWKS)")
    _say(f"# recording sink          {info['sink']}  ({banner(info['backend'])})")
    _say(f"# tracegate               {info['ingest']}  (admin: {info['admin']}/metrics)")
    _say(f"# policy                  {state}/policies  (edit 10-dev-rules.yaml, then kill -HUP {info['pid']})")
    _say(
        f"# paste into the shell that runs your SDK or Collector; the first line is a token for project_id "
        f"{DEV_PROJECT_ID}, payments/api on protected main, valid {info['ttl']} s:"
    )
    for line in exporter_variables(token, info["ingest"], grpc):
        _say(line)
    _say("# or, in an OpenTelemetry Collector's configuration (add it to a pipeline's exporters):")
    for line in collector_exporter(info["ingest"]):
        _say(line)
    _say(f"# more tokens: tracegate dev token --state {state} --claim project_path=a/b --claim ref=main")
    for line in forges.banner(state, info["ingest"], TOKEN_VARIABLE, secrets.token_hex(4)):
        _say(line)
    _say("# decisions (audit lines) follow; Ctrl-C stops")
    _say("# ready")


def _install_signals(reload: Callable[[], Awaitable[bool]]) -> asyncio.Event:
    """SIGTERM/SIGINT set the returned event; SIGHUP reloads the policy. Installed before
    "ready" is printed, so a signal sent on seeing it is never the default (kill)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    async def reloaded() -> None:
        ok = await reload()
        _say("# policy reloaded" if ok else "# policy reload failed; the previous policy keeps serving (see stderr)")

    def on_hup() -> None:
        task = loop.create_task(reloaded())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    return stop


def _remove_signals() -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)
