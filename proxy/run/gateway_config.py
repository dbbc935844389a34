"""``tracegate gateway-config nginx|envoy|traefik``: a gateway's configuration, printed ready.

The templates ship in the package (``gateway_templates/*.template``); deploy/ holds the
documented copies, and tests/test_gateway_config.py keeps the two in step. Each template's
``${TRACEGATE_…}`` placeholders are filled from a flag, else a variable, else a default.
Where tracegate has a setting for the same thing (TRACEGATE_UPSTREAM, _UPSTREAM_PATH_*,
_GRPC_UPSTREAM, _AUTHZ_PATH_PREFIX, _AUTHZ_KEY_HEADER, _AUTHZ_LISTEN) that setting is read, so
a gateway rendered in tracegate's environment agrees with it; TRACEGATE_AUTHZ_DIALECT,
TRACEGATE_AUTHZ_SECRET and TRACEGATE_TLS_CERT are checked against what the gateway can do.

A value that is missing or unusable is a :class:`ConfigError` naming the placeholder or the
setting, the flag and the variable; nothing is printed then (exit 2).

Security: no secret value is ever rendered. The shared secret tracegate checks
(X-Tracegate-Authz-Secret) appears only as a reference the gateway reads at run time: nginx
includes a file holding the header line, Envoy reads an environment variable
(``%ENVIRONMENT(NAME)%``); Traefik's ForwardAuth cannot send one (mTLS instead). Every value
is checked against a narrow alphabet before it is pasted in, so no flag can add a directive.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy.backends.profiles import LIGHTSTEP_KEY
from proxy.doors.authz import SECRET_HEADER
from proxy.errors import ConfigError
from proxy.settings.config import DEFAULT_PATHS
from proxy.settings.values import header_name, host_port, optional_path, secret_ref
from proxy.urls import check_url, grpc_address

GATEWAYS = ("nginx", "envoy", "traefik")
TEMPLATES = Path(__file__).with_name("gateway_templates")
#: The OTLP error bodies nginx serves for refusals (copies of deploy/nginx/errors).
NGINX_ERRORS = TEMPLATES / "nginx-errors"
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
#: Lines of a template that document the template itself; dropped when rendered.
TEMPLATE_NOTE = "#:"

_HOST = re.compile(r"[A-Za-z0-9.-]+")
_PATH_CHARS = re.compile(r"[A-Za-z0-9._~/@+=-]*")  # nothing nginx or YAML reads as syntax
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Input:
    """One value the renderer takes: a flag, the variables read when it is absent (first set
    wins), a default (None: required) and the gateways it applies to."""

    flag: str
    env: tuple[str, ...]
    default: str | None
    metavar: str
    help: str
    gateways: tuple[str, ...] = GATEWAYS

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


_NGINX, _ENVOY = ("nginx",), ("envoy",)
INPUTS: tuple[Input, ...] = (
    Input("--listen-http", ("TRACEGATE_GATEWAY_LISTEN_HTTP",), "0.0.0.0:4318", "HOST:PORT", "the gateway's OTLP/HTTP"),
    Input("--listen-grpc", ("TRACEGATE_GATEWAY_LISTEN_GRPC",), "0.0.0.0:4317", "HOST:PORT", "the gateway's OTLP/gRPC"),
    Input(
        "--authz-address",
        ("TRACEGATE_AUTHZ_ADDRESS", "TRACEGATE_AUTHZ_LISTEN"),
        "127.0.0.1:4319",
        "HOST:PORT",
        "where the gateway reaches tracegate's authorization listener",
    ),
    Input(
        "--authz-secret",
        ("TRACEGATE_GATEWAY_AUTHZ_SECRET",),
        "",
        "REF",
        "where the gateway reads the shared secret: nginx file:/PATH (a file holding the header line), envoy "
        "env:NAME (default: TRACEGATE_AUTHZ_SECRET's env:NAME); required when TRACEGATE_AUTHZ_SECRET is set",
        ("nginx", "envoy"),
    ),
    Input("--authz-path-prefix", ("TRACEGATE_AUTHZ_PATH_PREFIX",), "/authz", "PATH", "ext_authz path_prefix", _ENVOY),
    Input("--authz-key-header", ("TRACEGATE_AUTHZ_KEY_HEADER",), LIGHTSTEP_KEY, "NAME", "answer's key header", _NGINX),
    Input("--upstream", ("TRACEGATE_UPSTREAM",), "https://ingest.lightstep.com", "URL", "the OTLP/HTTP upstream"),
    *(
        Input(f"--upstream-path-{s}", (f"TRACEGATE_UPSTREAM_PATH_{s.upper()}",), p, "PATH", f"upstream {s} path")
        for s, p in DEFAULT_PATHS.items()
    ),
    Input(
        "--grpc-upstream",
        ("TRACEGATE_GRPC_UPSTREAM",),
        "ingest.lightstep.com:443",
        "TARGET",
        "the OTLP/gRPC upstream: HOST:PORT or https://HOST[:PORT] (TLS), http://HOST:PORT (loopback)",
    ),
    Input(
        "--ca-bundle",
        ("TRACEGATE_GATEWAY_CA_BUNDLE",),
        "/etc/ssl/certs/ca-certificates.crt",
        "FILE",
        "CAs that sign the upstream's certificate",
        ("nginx", "envoy"),
    ),
    Input("--cache", ("TRACEGATE_GATEWAY_CACHE",), "on", "on|off", "nginx's decision cache", _NGINX),
    Input(
        "--cache-dir",
        ("TRACEGATE_GATEWAY_CACHE_DIR",),
        "/run/nginx/tracegate-authz",
        "DIR",
        "the decision cache's directory (tmpfs, nginx's user only: it holds keys)",
        _NGINX,
    ),
    Input(
        "--errors-dir",
        ("TRACEGATE_GATEWAY_ERRORS_DIR",),
        None,
        "DIR",
        f"the OTLP error bodies nginx serves: deploy/nginx/errors, or their packaged copy {NGINX_ERRORS}",
        _NGINX,
    ),
)
BY_DEST = {i.dest: i for i in INPUTS}


class _Reader:
    """Each input's text and where it came from (for messages), flags before variables."""

    def __init__(self, gateway: str, flags: Mapping[str, str | None], environ: Mapping[str, str]) -> None:
        self.gateway, self.flags, self.environ = gateway, flags, environ
        for dest, value in flags.items():
            if value is not None and gateway not in BY_DEST[dest].gateways:
                raise ConfigError(f"{BY_DEST[dest].flag} does not apply to {gateway}")

    def get(self, dest: str, placeholder: str = "") -> tuple[str, str]:
        inp = BY_DEST[dest]
        if self.flags.get(dest) is not None:
            return str(self.flags[dest]), inp.flag
        for name in inp.env:
            if self.environ.get(name) or (name == inp.env[0] and name in self.environ):
                return self.environ[name], name  # a later variable set empty (TRACEGATE_AUTHZ_LISTEN off) is unset
        if inp.default is None:
            what = f"${{{placeholder}}}" if placeholder else inp.flag
            raise ConfigError(
                f"no value for {what} ({inp.help}): pass {inp.flag} {inp.metavar} or set {' or '.join(inp.env)}"
            )
        return inp.default, "default"

    def parse(self, dest: str, check: Any, placeholder: str = "") -> Any:
        raw, source = self.get(dest, placeholder)
        try:
            return check(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}={raw!r}: {exc}") from None


def _file_path(value: str) -> str:
    if not value.startswith("/") or not _PATH_CHARS.fullmatch(value):
        raise ValueError("expected an absolute path of letters, digits and ._~/@+=- (no spaces or quotes)")
    return value.rstrip("/") or "/"


def _url_path(value: str) -> str:
    if not value.startswith("/") or not _PATH_CHARS.fullmatch(value):
        raise ValueError("expected a path starting with / of letters, digits and ._~/@+=-")
    return value


def _address(value: str, *, connect: bool = False) -> tuple[str, int]:
    host, port = host_port(value)
    if not 0 < port < 65536:
        raise ValueError("expected a fixed port (1-65535)")
    if not _host_ok(host):
        raise ValueError("expected HOST:PORT with a host name or IP address")
    if connect and _is_ip(host) and ipaddress.ip_address(host).is_unspecified:
        raise ValueError("that listens on every interface; give the address the gateway connects to")
    return host, port


def _joined(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _upstream(value: str) -> tuple[str, str, int, str, str]:
    """``(scheme, host, port, origin, base path)`` of a base URL, tracegate's rules (proxy/urls.py)."""
    problem = check_url(value)
    if problem:
        raise ValueError(problem)
    parts = urlsplit(value)
    host = parts.hostname or ""
    if not _host_ok(host) or not _PATH_CHARS.fullmatch(parts.path):
        raise ValueError("expected a URL of a host name or IP address and a plain path")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, host, port, f"{parts.scheme}://{parts.netloc}", parts.path.rstrip("/")


def _grpc(value: str) -> tuple[str, int, bool]:
    host, port, tls = grpc_address(value)
    if not _host_ok(host):
        raise ValueError("expected a host name or IP address")
    return host, port, tls


def _checks(gateway: str, environ: Mapping[str, str]) -> None:
    """tracegate's own settings in this environment that the rendered gateway could not serve."""
    dialect = environ.get("TRACEGATE_AUTHZ_DIALECT", "")
    if dialect and dialect != gateway:
        raise ConfigError(
            f"TRACEGATE_AUTHZ_DIALECT={dialect!r}, but this renders {gateway}: tracegate reads the original "
            f"request where a {gateway} check carries it only with TRACEGATE_AUTHZ_DIALECT={gateway}"
        )
    if environ.get("TRACEGATE_TLS_CERT"):
        raise ConfigError(
            "TRACEGATE_TLS_CERT is set, so tracegate's authorization listener speaks TLS, and the configs this "
            "command prints reach it over plain HTTP: render without TRACEGATE_TLS_CERT in the environment, then "
            "add the gateway's client TLS (nginx proxy_ssl_certificate/_key/_trusted_certificate in the check "
            "locations, Envoy a transport_socket on the tracegate_authz cluster, Traefik forwardAuth.tls)"
        )


def _secret(gateway: str, read: _Reader, environ: Mapping[str, str]) -> dict[str, str]:
    """The placeholders that carry the shared secret's *reference*; never its value."""
    try:
        tracegates = secret_ref(environ.get("TRACEGATE_AUTHZ_SECRET", ""))
    except ValueError as exc:  # not a reference: perhaps the secret itself, so never shown
        raise ConfigError(f"TRACEGATE_AUTHZ_SECRET (its value not shown): {exc}") from None
    if gateway == "traefik":
        if tracegates is not None:
            raise ConfigError(
                "TRACEGATE_AUTHZ_SECRET is set, but Traefik's ForwardAuth cannot add a header to its check, so "
                "every check would be refused: unset it for a Traefik gateway and protect the hop with mTLS"
            )
        return {}
    text, source = read.get("authz_secret")
    if not text and gateway == "envoy" and tracegates is not None and tracegates.kind == "env":
        text, source = f"env:{tracegates.name}", "TRACEGATE_AUTHZ_SECRET"
    want = "file:/PATH" if gateway == "nginx" else "env:NAME"
    if not text:
        if tracegates is not None:
            raise ConfigError(
                f"TRACEGATE_AUTHZ_SECRET is set, so tracegate refuses checks without {SECRET_HEADER}: pass "
                f"--authz-secret {want} (or set TRACEGATE_GATEWAY_AUTHZ_SECRET), where {gateway} reads that value"
            )
        note = (
            "No shared secret (TRACEGATE_AUTHZ_SECRET unset): keep the authz hop on loopback; "
            f"--authz-secret {want} adds one."
        )
        if gateway == "nginx":
            return {
                "TRACEGATE_GATEWAY_AUTHZ_SECRET_DIRECTIVE": f'proxy_set_header {SECRET_HEADER} "";',
                "TRACEGATE_GATEWAY_AUTHZ_SECRET_NOTE": note,
            }
        return {"TRACEGATE_GATEWAY_AUTHZ_SECRET_HEADERS": "[]", "TRACEGATE_GATEWAY_AUTHZ_SECRET_NOTE": note}
    kind, _, name = text.partition(":")
    if gateway == "nginx":
        if kind != "file" or not _PATH_CHARS.fullmatch(name) or not name.startswith("/"):
            raise ConfigError(
                f"{source}={text!r}: nginx reads the secret from a file it includes: expected file:/PATH "
                "(an absolute path of letters, digits and ._~/@+=-); nginx cannot read environment variables"
            )
        line = f'proxy_set_header {SECRET_HEADER} "VALUE";'
        return {
            "TRACEGATE_GATEWAY_AUTHZ_SECRET_DIRECTIVE": f"include {name};",
            "TRACEGATE_GATEWAY_AUTHZ_SECRET_NOTE": (
                f"Shared secret: each check includes {name}, which holds the one line\n"
                f"#     {line}\n"
                "#   with VALUE the secret behind tracegate's TRACEGATE_AUTHZ_SECRET (letters, digits, - and _:\n"
                "#   nginx reads $ as a variable). Keep it readable by nginx's master (root) only, e.g.\n"
                f"#     (umask 077; printf '{line.replace('VALUE', '%s')}\\n' \"$(cat SECRET_FILE)\" > {name})"
            ),
        }
    if kind != "env" or not _ENV_NAME.fullmatch(name):
        raise ConfigError(
            f"{source}={text!r}: Envoy reads the secret from its environment (%ENVIRONMENT(NAME)%): expected "
            "env:NAME; for a secret file, start Envoy with NAME set from it"
        )
    return {
        "TRACEGATE_GATEWAY_AUTHZ_SECRET_HEADERS": (
            f'[{{key: {SECRET_HEADER.lower()}, value: "%ENVIRONMENT({name})%"}}]'
        ),
        "TRACEGATE_GATEWAY_AUTHZ_SECRET_NOTE": (
            f"TRACEGATE_AUTHZ_SECRET=env:{name} (or file:PATH holding the same value); Envoy sends {name}\n"
            f"#   from its own environment (headers_to_add below)"
        ),
    }


def placeholder_values(gateway: str, flags: Mapping[str, str | None], environ: Mapping[str, str]) -> dict[str, str]:
    """Every placeholder of ``gateway``'s template, from ``flags`` (by :class:`Input` dest,
    None where not given), then ``environ``, then the defaults. Raises ConfigError."""
    if gateway not in GATEWAYS:
        raise ConfigError(f"unknown gateway {gateway!r}: expected one of {', '.join(GATEWAYS)}")
    _checks(gateway, environ)
    read = _Reader(gateway, flags, environ)
    out: dict[str, str] = {}

    http_host, http_port = read.parse("listen_http", _address)
    grpc_host, grpc_port = read.parse("listen_grpc", _address)
    authz_host, authz_port = read.parse("authz_address", lambda v: _address(v, connect=True))
    out["TRACEGATE_AUTHZ_ADDRESS"] = _joined(authz_host, authz_port)
    if gateway != "envoy":  # Envoy takes host and port apart
        out["TRACEGATE_GATEWAY_LISTEN_HTTP"] = _joined(http_host, http_port)
        out["TRACEGATE_GATEWAY_LISTEN_GRPC"] = _joined(grpc_host, grpc_port)

    scheme, host, port, origin, base = read.parse("upstream", _upstream)
    for signal in ("traces", "metrics", "logs"):
        path = read.parse(f"upstream_path_{signal}", _url_path)
        out[f"TRACEGATE_UPSTREAM_PATH_{signal.upper()}"] = base + path
    g_host, g_port, g_tls = read.parse("grpc_upstream", _grpc)
    key_header = read.parse("authz_key_header", header_name) if gateway == "nginx" else LIGHTSTEP_KEY
    if gateway != "nginx" and environ.get("TRACEGATE_AUTHZ_KEY_HEADER", LIGHTSTEP_KEY).lower() != LIGHTSTEP_KEY:
        raise ConfigError(
            f"TRACEGATE_AUTHZ_KEY_HEADER is set, but {gateway} copies the answer's headers upstream by name, so "
            f"Lightstep would get the key under another name: keep TRACEGATE_AUTHZ_KEY_HEADER={LIGHTSTEP_KEY}"
        )
    out |= _secret(gateway, read, environ)

    if gateway == "nginx":
        errors = read.parse("errors_dir", _file_path, "TRACEGATE_GATEWAY_ERRORS_DIR")
        cache = read.parse("cache", _on_off)
        out |= {
            "TRACEGATE_UPSTREAM_SCHEME": scheme,
            "TRACEGATE_UPSTREAM_SERVER": _joined(host, port),
            "TRACEGATE_UPSTREAM_HOST": host,
            "TRACEGATE_GRPC_UPSTREAM_SCHEME": "grpcs" if g_tls else "grpc",
            "TRACEGATE_GRPC_UPSTREAM_SERVER": _joined(g_host, g_port),
            "TRACEGATE_GRPC_UPSTREAM_HOST": g_host,
            "TRACEGATE_GATEWAY_CA_BUNDLE": read.parse("ca_bundle", _file_path),
            "TRACEGATE_GATEWAY_CACHE_ZONE": "tracegate_authz" if cache else "off",
            "TRACEGATE_GATEWAY_CACHE_DIR": read.parse("cache_dir", _file_path),
            "TRACEGATE_GATEWAY_ERRORS_DIR": errors,
            "TRACEGATE_AUTHZ_KEY_HEADER": key_header,
            "TRACEGATE_AUTHZ_KEY_VARIABLE": key_header.replace("-", "_"),
        }
    elif gateway == "envoy":
        if scheme != "https" or not g_tls:
            raise ConfigError(
                "the Envoy config speaks TLS to its upstreams: give https:// for --upstream (TRACEGATE_UPSTREAM) "
                "and a TLS --grpc-upstream (TRACEGATE_GRPC_UPSTREAM); for a plaintext local collector remove the "
                "clusters' transport_socket by hand"
            )
        prefix = read.parse("authz_path_prefix", optional_path)
        if not _PATH_CHARS.fullmatch(prefix):
            raise ConfigError(f"--authz-path-prefix {prefix!r}: expected letters, digits and ._~/@+=-")
        out |= {
            "TRACEGATE_GATEWAY_LISTEN_HTTP_HOST": _yaml_host(http_host),
            "TRACEGATE_GATEWAY_LISTEN_HTTP_PORT": str(http_port),
            "TRACEGATE_GATEWAY_LISTEN_GRPC_HOST": _yaml_host(grpc_host),
            "TRACEGATE_GATEWAY_LISTEN_GRPC_PORT": str(grpc_port),
            "TRACEGATE_AUTHZ_HOST": _yaml_host(authz_host),
            "TRACEGATE_AUTHZ_PORT": str(authz_port),
            "TRACEGATE_GATEWAY_AUTHZ_CLUSTER_TYPE": "STATIC" if _is_ip(authz_host) else "STRICT_DNS",
            "TRACEGATE_AUTHZ_PATH_PREFIX": prefix or '""',
            "TRACEGATE_UPSTREAM_HOST": _yaml_host(host),
            "TRACEGATE_UPSTREAM_PORT": str(port),
            "TRACEGATE_GRPC_UPSTREAM_HOST": _yaml_host(g_host),
            "TRACEGATE_GRPC_UPSTREAM_PORT": str(g_port),
            "TRACEGATE_GATEWAY_CA_BUNDLE": read.parse("ca_bundle", _file_path),
        }
    else:
        g_origin = f"{'https' if g_tls else 'h2c'}://{_joined(g_host, g_port)}"
        out |= {"TRACEGATE_UPSTREAM_URL": origin, "TRACEGATE_GRPC_UPSTREAM_URL": g_origin}
    return out


def _on_off(value: str) -> bool:
    if value.lower() not in ("on", "off"):
        raise ValueError("expected on or off")
    return value.lower() == "on"


def _host_ok(host: str) -> bool:
    return bool(_HOST.fullmatch(host)) or _is_ip(host)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _yaml_host(host: str) -> str:
    return f'"{host}"' if ":" in host else host  # an IPv6 literal's colons would read as YAML


def template(gateway: str) -> str:
    return (TEMPLATES / f"{_FILES[gateway]}.template").read_text(encoding="utf-8")


_FILES = {"nginx": "nginx.conf", "envoy": "envoy.yaml", "traefik": "traefik.yaml"}


def render(text: str, values: Mapping[str, str]) -> str:
    """``text`` without its ``#:`` lines, every ``${NAME}`` replaced. A placeholder without a
    value is an error naming it, never a blank."""
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith(TEMPLATE_NOTE))
    missing = sorted({name for name in PLACEHOLDER.findall(body) if name not in values})
    if missing:
        raise ConfigError("no value for " + ", ".join(f"${{{name}}}" for name in missing))
    rendered = PLACEHOLDER.sub(lambda m: values[m.group(1)], body)
    left = PLACEHOLDER.findall(rendered)
    if left:  # a value carried one in (values are checked, so this is a bug, not a user error)
        raise ConfigError(f"a value rendered the placeholder ${{{left[0]}}}")
    return rendered


def render_gateway(gateway: str, flags: Mapping[str, str | None], environ: Mapping[str, str]) -> str:
    return render(template(gateway), placeholder_values(gateway, flags, environ))


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """``tracegate gateway-config`` (``sub``: the CLI's subparsers)."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "gateway-config",
        help="print a ready nginx, Envoy or Traefik config for gateway mode (flags, then variables, then defaults)",
        description="Print the shipped gateway config for tracegate's authorization listener with every "
        "placeholder filled. Values come from the flags, else the variables named in [brackets], else the "
        "defaults; a missing or unusable one is an error (exit 2). No secret value is ever printed: the "
        "gateway reads the shared secret from a file (nginx) or its environment (Envoy).",
    )
    parser.add_argument("gateway", choices=GATEWAYS, help="the gateway the config is for")
    for inp in INPUTS:
        default = "required" if inp.default is None else (inp.default or "none")
        only = "" if inp.gateways == GATEWAYS else f"{', '.join(inp.gateways)}: "
        parser.add_argument(
            inp.flag, dest=inp.dest, metavar=inp.metavar, help=f"{only}{inp.help} [{', '.join(inp.env)}; {default}]"
        )
    return parser


def main(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    flags = {i.dest: getattr(args, i.dest, None) for i in INPUTS}
    try:
        text = render_gateway(args.gateway, flags, environ)
    except ConfigError as exc:
        print(f"tracegate: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0
