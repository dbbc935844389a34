"""Real nginx running the shipped gateway config (deploy/nginx), rendered with test ports.

nginx runs as the current user under a temporary prefix, in the foreground (``daemon off``),
on 127.0.0.1 only; the test (or benchmark) that starts it stops it. Used by
tests/test_gateway_nginx.py and bench/run.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "nginx" / "tracegate-gateway.conf"
ERRORS = ROOT / "deploy" / "nginx" / "errors"
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


def render(template: str, values: dict[str, str]) -> str:
    """Replace every ``{{NAME}}``; a name without a value is an error, not a silent blank."""
    missing = sorted({m for m in _PLACEHOLDER.findall(template) if m not in values})
    if missing:
        raise KeyError(f"no value for {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@dataclass
class NginxGateway:
    """nginx with the shipped config. ``upstream`` is the OTLP/HTTP sink's host:port,
    ``grpc_upstream`` the OTLP/gRPC sink's (plaintext in tests)."""

    nginx: str
    prefix: Path
    authz: str
    upstream: str
    grpc_upstream: str
    cache: bool = True
    secret: str = ""
    scheme: str = "http"
    grpc_scheme: str = "grpc"
    paths: dict[str, str] = field(
        default_factory=lambda: {"traces": "/v1/traces", "metrics": "/v1/metrics", "logs": "/v1/logs"}
    )
    http_port: int = 0
    grpc_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def config(self) -> str:
        values = {
            "LISTEN_HTTP": f"127.0.0.1:{self.http_port}",
            "LISTEN_GRPC": f"127.0.0.1:{self.grpc_port}",
            "AUTHZ_ADDRESS": self.authz,
            "AUTHZ_SECRET": self.secret,
            "AUTHZ_CACHE": "tracegate_authz" if self.cache else "off",
            "CACHE_DIR": str(self.prefix / "authz-cache"),
            "ERRORS_DIR": str(ERRORS),
            "UPSTREAM_SCHEME": self.scheme,
            "UPSTREAM_SERVER": self.upstream,
            "UPSTREAM_HOST": "127.0.0.1",
            "UPSTREAM_PATH_TRACES": self.paths["traces"],
            "UPSTREAM_PATH_METRICS": self.paths["metrics"],
            "UPSTREAM_PATH_LOGS": self.paths["logs"],
            "GRPC_SCHEME": self.grpc_scheme,
            "GRPC_SERVER": self.grpc_upstream,
            "CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt",
        }
        p = self.prefix
        # As root, nginx would run its workers as nobody; keep them the current user's.
        user = "user root root;\n" if os.geteuid() == 0 else ""
        return (
            user + "daemon off;\n"
            "worker_processes 1;\n"
            f"pid {p}/nginx.pid;\n"
            f"error_log {p}/error.log warn;\n"
            "events { worker_connections 4096; }\n"
            "http {\n"
            "  access_log off;\n"
            f"  client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n"
            f"  fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n"
            "  keepalive_requests 1000000;\n" + render(TEMPLATE.read_text(), values) + "\n}\n"
        )

    def start(self) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        conf = self.prefix / "nginx.conf"
        conf.write_text(self.config())
        check = subprocess.run(
            [self.nginx, "-t", "-p", str(self.prefix), "-c", str(conf)], capture_output=True, check=False
        )
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t refused the rendered config:\n{check.stderr.decode()}")
        with (self.prefix / "stderr.log").open("wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [self.nginx, "-p", str(self.prefix), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_port(self.http_port)
        wait_port(self.grpc_port)

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def pids(self) -> list[int]:
        if self.process is None:
            return []
        try:
            kids = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        except OSError:
            kids = []
        return [self.process.pid, *(int(k) for k in kids)]
