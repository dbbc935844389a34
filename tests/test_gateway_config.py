"""``tracegate gateway-config nginx|envoy|traefik`` (proxy/run/gateway_config.py).

The packaged templates and deploy/ are kept in step: Envoy's and Traefik's shipped files are
exactly what the command prints in the environment their headers document for tracegate;
nginx's rendered directives are exactly the deploy/ template's filled with the values its
header documents; the error bodies are the same bytes. Every rendering fills every
placeholder; a missing or unusable value is exit 2 naming it and what sets it; no secret value
is ever printed. nginx's output passes ``nginx -t`` and carries a real request, with the
shared secret read from the file it includes.
"""

from __future__ import annotations

import argparse
import asyncio
import filecmp
import os
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.dev.standins import Sink, StandInIssuer, free_port
from proxy.doors.authz import SECRET_HEADER
from proxy.errors import ConfigError
from proxy.run import gateway_config
from proxy.run.gateway_config import GATEWAYS, NGINX_ERRORS, PLACEHOLDER, TEMPLATE_NOTE
from tests.conftest import PAYMENTS_KEY, Tracegate, environ, policy_yaml
from tests.nginx_gateway import NginxGateway
from tests.nginx_gateway import render as render_deploy_nginx
from tests.system import require_program

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SHIPPED = {"envoy": DEPLOY / "envoy" / "envoy.yaml", "traefik": DEPLOY / "traefik" / "tracegate.yaml"}
DEPLOY_NGINX = DEPLOY / "nginx" / "tracegate-gateway.conf"
DEPLOY_ERRORS = DEPLOY / "nginx" / "errors"


def parse(argv: list[str]) -> argparse.Namespace:
    """``tracegate gateway-config ARGV`` parsed as the CLI parses it (through ``add_parser``)."""
    parser = argparse.ArgumentParser(prog="tracegate")
    gateway_config.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["gateway-config", *argv])


def run(argv: list[str], env: Mapping[str, str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The command as the CLI runs it: parsed, then ``main(args, environ)``."""
    code = gateway_config.main(parse(argv), env)
    out, err = capsys.readouterr()
    return code, out, err


def documented_environment(text: str) -> dict[str, str]:
    """The ``TRACEGATE_*=VALUE`` settings a shipped file's header says tracegate runs with."""
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    return dict(re.findall(r"\b(TRACEGATE_[A-Z_]+)=(\S+)", header))


def body_placeholders(gateway: str) -> set[str]:
    body = [line for line in gateway_config.template(gateway).splitlines() if not line.startswith(TEMPLATE_NOTE)]
    return set(PLACEHOLDER.findall("\n".join(body)))


# Renderings that between them take every branch: defaults, a shared secret, other hosts and
# ports (IPv6, a host name for tracegate), plaintext loopback upstreams, a base path, no cache.
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "defaults": ([], {"TRACEGATE_AUTHZ_LISTEN": ""}),  # empty: tracegate's listener off, so unset
    "secret": ([], {"TRACEGATE_AUTHZ_SECRET": "env:AUTHZ_SHARED_SECRET"}),
    "elsewhere": (
        ["--listen-http", "[::]:14318", "--listen-grpc", "127.0.0.1:14317", "--authz-address", "tracegate:9000"],
        {"TRACEGATE_UPSTREAM": "https://otlp.example.com:8443/base/", "TRACEGATE_GRPC_UPSTREAM": "https://g.example"},
    ),
    "local": ([], {"TRACEGATE_UPSTREAM": "http://127.0.0.1:4000", "TRACEGATE_GRPC_UPSTREAM": "http://[::1]:4001"}),
}
NGINX_EXTRA = {
    "defaults": ["--errors-dir", str(DEPLOY_ERRORS)],
    "secret": ["--errors-dir", str(DEPLOY_ERRORS), "--authz-secret", "file:/etc/nginx/tracegate-secret.conf"],
    "elsewhere": ["--errors-dir", "/srv/errors", "--cache", "off", "--authz-key-header", "X-LS-Key"],
    "local": ["--errors-dir", str(DEPLOY_ERRORS), "--cache-dir", "/tmp/cache"],
}


def renderings() -> list[Any]:
    cases = []
    for gateway in GATEWAYS:
        for name, (argv, env) in VARIANTS.items():
            if gateway == "traefik" and name == "secret":
                continue  # ForwardAuth cannot send it: refused below
            if gateway == "envoy" and name == "local":
                continue  # TLS upstreams only: refused below
            extra = NGINX_EXTRA[name] if gateway == "nginx" else []
            cases.append(pytest.param(gateway, [*argv, *extra], env, id=f"{gateway}-{name}"))
    return cases


@pytest.mark.parametrize(("gateway", "argv", "env"), renderings())
def test_every_rendering_fills_every_placeholder(
    gateway: str, argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run([gateway, *argv], env, capsys)
    assert (code, err) == (0, "")
    assert not PLACEHOLDER.search(out) and "{{" not in out and TEMPLATE_NOTE not in out
    args = parse([gateway, *argv])
    flags = {i.dest: getattr(args, i.dest) for i in gateway_config.INPUTS}
    values = gateway_config.placeholder_values(gateway, flags, env)
    assert set(values) == body_placeholders(gateway), "a placeholder without a value, or a value none uses"
    if gateway != "nginx":
        yaml.safe_load(out)


def test_a_template_placeholder_without_a_value_is_named() -> None:
    with pytest.raises(ConfigError, match=r"no value for \$\{TRACEGATE_NEW\}"):
        gateway_config.render("#: a note\nlisten ${TRACEGATE_NEW};\n", {})
    assert gateway_config.render("#: a note ${NAME}\nlisten ${A};\n", {"A": "1"}) == "listen 1;\n"


@pytest.mark.parametrize("gateway", sorted(SHIPPED))
def test_the_shipped_file_is_the_rendering_in_the_environment_it_documents(
    gateway: str, capsys: pytest.CaptureFixture[str]
) -> None:
    shipped = SHIPPED[gateway].read_text()
    env = documented_environment(shipped)
    assert env["TRACEGATE_AUTHZ_DIALECT"] == gateway and "TRACEGATE_AUTHZ_LISTEN" in env
    code, out, err = run([gateway], env, capsys)
    assert (code, err) == (0, "")
    assert out == shipped


# What deploy/nginx's header documents for each of its {{NAME}} placeholders, with our value.
NGINX_DOCUMENTED = {
    "LISTEN_HTTP": "0.0.0.0:4318",
    "LISTEN_GRPC": "0.0.0.0:4317",
    "AUTHZ_ADDRESS": "127.0.0.1:4319",
    "AUTHZ_CACHE": "tracegate_authz",
    "CACHE_DIR": "/run/nginx/tracegate-authz",
    "UPSTREAM_SCHEME": "https",
    "UPSTREAM_SERVER": "ingest.lightstep.com:443",
    "UPSTREAM_HOST": "ingest.lightstep.com",
    "GRPC_SCHEME": "grpcs",
    "GRPC_SERVER": "ingest.lightstep.com:443",
    "CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt",
}


def directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_nginx_defaults_are_what_the_deploy_template_documents(capsys: pytest.CaptureFixture[str]) -> None:
    """The deploy/ template filled with its header's documented values (no secret: "empty for
    none") has exactly the directives of ``gateway-config nginx`` with the defaults."""
    template = DEPLOY_NGINX.read_text()
    header = "\n".join(line for line in template.splitlines() if line.startswith("#"))
    for name, value in NGINX_DOCUMENTED.items():
        assert re.search(rf"#   {name} .*(?<![\w.]){re.escape(value)}\b", header), (name, value)
    paths = dict(zip(("TRACES", "METRICS", "LOGS"), re.findall(r"/\w+/otlp/v0\.9", header), strict=True))
    documented = {
        **NGINX_DOCUMENTED,
        **{f"UPSTREAM_PATH_{s}": p for s, p in paths.items()},
        "AUTHZ_SECRET": "",
        "ERRORS_DIR": str(DEPLOY_ERRORS),
    }
    code, out, err = run(["nginx", "--errors-dir", str(DEPLOY_ERRORS)], {}, capsys)
    assert (code, err) == (0, "")
    assert directives(out) == directives(render_deploy_nginx(template, documented))


def test_the_packaged_error_bodies_are_deploys() -> None:
    names = sorted(p.name for p in DEPLOY_ERRORS.iterdir())
    assert names == sorted(p.name for p in NGINX_ERRORS.iterdir()) and len(names) == 6
    _, mismatch, errors = filecmp.cmpfiles(DEPLOY_ERRORS, NGINX_ERRORS, names, shallow=False)
    assert (mismatch, errors) == ([], [])


def test_a_missing_value_names_the_placeholder_the_flag_and_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["nginx"], {}, capsys)
    assert code == 2 and out == ""
    assert err.startswith("tracegate: no value for ${TRACEGATE_GATEWAY_ERRORS_DIR}")
    assert "--errors-dir DIR" in err and "TRACEGATE_GATEWAY_ERRORS_DIR" in err and str(NGINX_ERRORS) in err
    # Given by the variable instead of the flag, it renders.
    assert run(["nginx"], {"TRACEGATE_GATEWAY_ERRORS_DIR": "/srv/errors"}, capsys)[0] == 0


ERRORS = ["--errors-dir", "/srv/errors"]
REFUSED = [
    ("nginx", [*ERRORS, "--listen-http", "0.0.0.0:4318; include /etc/shadow"], {}, "--listen-http="),
    ("nginx", [*ERRORS, "--listen-http", "127.0.0.1:0"], {}, "a fixed port"),
    ("nginx", ERRORS, {"TRACEGATE_AUTHZ_LISTEN": "0.0.0.0:4319"}, "TRACEGATE_AUTHZ_LISTEN='0.0.0.0:4319'"),
    ("envoy", ["--authz-address", "[::]:4319"], {}, "--authz-address="),
    ("nginx", [*ERRORS, "--upstream", "https://x.example/a b"], {}, "--upstream="),
    ("nginx", [*ERRORS, "--upstream", "http://collector.example:4318"], {}, "must use https"),
    ("nginx", [*ERRORS, "--upstream-path-logs", 'v1/logs"'], {}, "--upstream-path-logs="),
    ("nginx", ["--errors-dir", "deploy/nginx/errors"], {}, "an absolute path"),
    ("nginx", [*ERRORS, "--cache", "maybe"], {}, "on or off"),
    ("nginx", [*ERRORS, "--authz-key-header", "x key"], {}, "--authz-key-header="),
    ("envoy", ["--errors-dir", "/srv/errors"], {}, "--errors-dir does not apply to envoy"),
    ("traefik", ["--authz-secret", "env:S"], {}, "--authz-secret does not apply to traefik"),
    ("nginx", ERRORS, {"TRACEGATE_AUTHZ_DIALECT": "envoy"}, "TRACEGATE_AUTHZ_DIALECT=nginx"),
    ("envoy", [], {"TRACEGATE_TLS_CERT": "/tls/cert.pem"}, "TRACEGATE_TLS_CERT is set"),
    ("traefik", [], {"TRACEGATE_AUTHZ_SECRET": "file:/run/secrets/authz"}, "mTLS"),
    ("nginx", ERRORS, {"TRACEGATE_AUTHZ_SECRET": "file:/run/secrets/authz"}, "--authz-secret file:/PATH"),
    ("envoy", [], {"TRACEGATE_AUTHZ_SECRET": "file:/run/secrets/authz"}, "--authz-secret env:NAME"),
    ("envoy", [], {"TRACEGATE_AUTHZ_SECRET": "hunter2"}, "TRACEGATE_AUTHZ_SECRET (its value not shown)"),
    ("nginx", [*ERRORS, "--authz-secret", "env:S"], {}, "nginx cannot read environment variables"),
    ("nginx", [*ERRORS, "--authz-secret", "file:secret.conf"], {}, "expected file:/PATH"),
    ("envoy", ["--authz-secret", "file:/run/secrets/authz"], {}, "expected env:NAME"),
    ("envoy", [], {"TRACEGATE_UPSTREAM": "http://127.0.0.1:4318"}, "speaks TLS to its upstreams"),
    ("envoy", [], {"TRACEGATE_AUTHZ_KEY_HEADER": "x-ls-key"}, "keep TRACEGATE_AUTHZ_KEY_HEADER"),
    ("envoy", ["--authz-path-prefix", "authz"], {}, "--authz-path-prefix="),
]


@pytest.mark.parametrize(("gateway", "argv", "env", "says"), REFUSED)
def test_an_unusable_value_is_exit_2_naming_it(
    gateway: str, argv: list[str], env: dict[str, str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run([gateway, *argv], env, capsys)
    assert (code, out) == (2, "")
    assert err.startswith("tracegate: ") and says in err, err
    assert "hunter2" not in err


def test_no_secret_value_is_ever_rendered(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    secret = "s3cr3t-value-0123456789"
    (tmp_path / "authz").write_text(secret)
    env = {"TRACEGATE_AUTHZ_SECRET": "env:AUTHZ_SHARED_SECRET", "AUTHZ_SHARED_SECRET": secret}
    code, out, _ = run(["envoy"], env, capsys)
    assert code == 0 and secret not in out
    [added] = yaml.safe_load(out)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "http_filters"
    ][1]["typed_config"]["http_service"]["authorization_request"]["headers_to_add"]
    assert added == {"key": SECRET_HEADER.lower(), "value": "%ENVIRONMENT(AUTHZ_SHARED_SECRET)%"}
    env = {"TRACEGATE_AUTHZ_SECRET": f"file:{tmp_path / 'authz'}"}
    code, out, _ = run(["nginx", *ERRORS, "--authz-secret", "file:/etc/nginx/authz.conf"], env, capsys)
    assert code == 0 and secret not in out
    assert out.count("include /etc/nginx/authz.conf;") == 2 and SECRET_HEADER not in "".join(directives(out))


def nginx_main(prefix: Path, rendered: Path) -> str:
    """A minimal main config under ``prefix`` that includes the rendered file in ``http { }``."""
    user = "user root root;\n" if os.geteuid() == 0 else ""  # as root nginx would run workers as nobody
    return (
        f"{user}daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
        "events { worker_connections 64; }\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {prefix}/body;\n  proxy_temp_path {prefix}/proxy;\n"
        f"  fastcgi_temp_path {prefix}/fastcgi;\n  uwsgi_temp_path {prefix}/uwsgi;\n  scgi_temp_path {prefix}/scgi;\n"
        f"  include {rendered};\n}}\n"
    )


def nginx_t(nginx: str, prefix: Path, rendered: str) -> subprocess.CompletedProcess[bytes]:
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "tracegate.conf").write_text(rendered)
    (prefix / "nginx.conf").write_text(nginx_main(prefix, prefix / "tracegate.conf"))
    return subprocess.run(
        [nginx, "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf")], capture_output=True, check=False
    )


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="defaults"),
        pytest.param(["--cache", "off", "--authz-key-header", "x-ls-key", "--authz-secret", "file:SNIPPET"], id="more"),
    ],
)
def test_the_nginx_rendering_passes_nginx_t(
    extra: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defaults but the ports (chosen here) and the upstream (a name that resolves offline);
    then with the cache off, another key header and the secret included from a file."""
    nginx = require_program("nginx", "nginx", "/usr/sbin/nginx")
    snippet = tmp_path / "secret.conf"
    snippet.write_text(f'proxy_set_header {SECRET_HEADER} "s3cr3t";\n')
    ports = [free_port() for _ in range(4)]
    argv = [
        "nginx",
        *("--listen-http", f"127.0.0.1:{ports[0]}", "--listen-grpc", f"127.0.0.1:{ports[1]}"),
        *("--upstream", f"https://localhost:{ports[2]}", "--grpc-upstream", f"localhost:{ports[3]}"),
        *("--errors-dir", str(DEPLOY_ERRORS), "--cache-dir", str(tmp_path / "cache")),
        *(a.replace("SNIPPET", str(snippet)) for a in extra),
    ]
    code, out, err = run(argv, {}, capsys)
    assert (code, err) == (0, "")
    assert f"listen 127.0.0.1:{ports[0]};" in out and f"listen 127.0.0.1:{ports[1]} http2;" in out
    result = nginx_t(nginx, tmp_path / "prefix", out)
    assert result.returncode == 0, result.stderr.decode()
    assert b"test is successful" in result.stderr


@dataclass
class RenderedNginx(NginxGateway):
    """nginx running the file ``gateway-config nginx`` printed (not the deploy/ template)."""

    rendered: str = ""

    def config(self) -> str:
        self.prefix.mkdir(parents=True, exist_ok=True)
        (self.prefix / "tracegate.conf").write_text(self.rendered)
        return nginx_main(self.prefix, self.prefix / "tracegate.conf")


async def test_the_rendered_nginx_carries_a_request_with_the_secret_from_its_file(
    tmp_path: Path,
    start_tracegate: Callable[..., Any],
    issuer: StandInIssuer,
    sink: Sink,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """tracegate requires the shared secret; nginx rendered with ``--authz-secret file:…``
    sends it from that file and the export reaches the sink with the account's key. The same
    config rendered without it (another environment) is refused as an unauthenticated gateway."""
    nginx = require_program("nginx", "nginx", "/usr/sbin/nginx")
    secret = "gw-secret-0123456789abcdef"
    tg: Tracegate = await start_tracegate(
        policy_yaml(issuer.url),
        env={**environ(), "AUTHZ_SHARED_SECRET": secret},
        authz_listen="127.0.0.1:0",
        authz_dialect="nginx",
        authz_secret="env:AUTHZ_SHARED_SECRET",
    )
    await tg.keys_ready()
    snippet = tmp_path / "authz-secret.conf"
    snippet.write_text(f'proxy_set_header {SECRET_HEADER} "{secret}";\n')
    gateways = []
    for name, extra, env in (
        ("with", ["--authz-secret", f"file:{snippet}"], {"TRACEGATE_AUTHZ_SECRET": "env:AUTHZ_SHARED_SECRET"}),
        ("without", [], {}),
    ):
        http_port, grpc_port = free_port(), free_port()
        argv = [
            "nginx",
            *("--listen-http", f"127.0.0.1:{http_port}", "--listen-grpc", f"127.0.0.1:{grpc_port}"),
            *("--authz-address", f"127.0.0.1:{tg.runners[2].addresses[0][1]}", "--upstream", sink.url),
            *("--grpc-upstream", f"http://127.0.0.1:{free_port()}", "--cache", "off"),
            *("--errors-dir", str(DEPLOY_ERRORS), "--cache-dir", str(tmp_path / f"cache-{name}"), *extra),
        ]
        env = {**env, "TRACEGATE_UPSTREAM_PATH_TRACES": "/v1/traces", "TRACEGATE_AUTHZ_DIALECT": "nginx"}
        code, out, err = run(argv, env, capsys)
        assert (code, err) == (0, "") and secret not in out
        gw = RenderedNginx(nginx, tmp_path / f"nginx-{name}", "", "", "", rendered=out)
        gw.http_port, gw.grpc_port = http_port, grpc_port
        gateways.append(gw)
    try:
        for gw in gateways:
            await asyncio.to_thread(gw.start)
        headers = {"authorization": f"Bearer {issuer.mint()}", "content-type": "application/x-protobuf"}
        async with client.post(gateways[0].url + "/v1/traces", data=b"\x0a\x00", headers=headers) as resp:
            assert resp.status == 200
        [got] = sink.received
        assert got.path == "/v1/traces" and got.headers.getall("lightstep-access-token") == [PAYMENTS_KEY]
        assert SECRET_HEADER not in got.headers
        async with client.post(gateways[1].url + "/v1/traces", data=b"\x0a\x00", headers=headers) as resp:
            assert resp.status == 403
        assert len(sink.received) == 1
        reasons = [r["reason"] for r in tg.audit() if r["event"] == "authz"]
        assert reasons == ["authorized", "authz-gateway-unauthenticated"]
    finally:
        for gw in gateways:
            await asyncio.to_thread(gw.stop)
    for gw in gateways:
        assert "[emerg]" not in gw.error_log() and "[alert]" not in gw.error_log()


def test_tracegate_cli_runs_gateway_config(capsys: pytest.CaptureFixture[str]) -> None:
    """Registered in proxy/cli.py: ``tracegate gateway-config`` parses and exits as documented."""
    from proxy.cli import main as cli_main

    assert cli_main(["gateway-config", "traefik"], environ={}) == 0
    assert capsys.readouterr().out == SHIPPED["traefik"].read_text()
    assert cli_main(["gateway-config", "nginx"], environ={}) == 2
    assert "--errors-dir" in capsys.readouterr().err
