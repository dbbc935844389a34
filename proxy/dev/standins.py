"""Local stand-ins for tracegate's peers: an OIDC issuer and an OTLP sink.

Used by ``tracegate demo``, ``tracegate dev`` and the test suite; never imported by the
request path. Both are real HTTP servers on loopback with real keys: the issuer serves OIDC
discovery (or, like an Okta authorization server, only OAuth 2.0 metadata) and a JWKS of
freshly generated RSA and EC keys, under a path if asked (Forgejo's issuer is
``<instance>/api/actions``), and mints GitLab CI-shaped ID tokens (or GitHub/Forgejo
Actions-shaped ones: :func:`github_claims`, :func:`forgejo_claims`); the sink records every request it receives
(headers and raw body) and answers like an OTLP receiver; the gRPC sink does the same for
OTLP/gRPC calls (method, metadata and the raw message bytes). Not for production use.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpc import aio
from multidict import CIMultiDict


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a server started just after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gitlab_claims(issuer: str, audience: str = "tracegate", **overrides: Any) -> dict[str, Any]:
    """Claims shaped like a GitLab CI ID token (``id_tokens:``), valid for 5 minutes."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "namespace_id": "72",
        "namespace_path": "payments",
        "project_id": "4242",
        "project_path": "payments/api",
        "user_id": "17",
        "user_login": "alice",
        "user_email": "alice@example.com",
        "pipeline_id": "99001",
        "pipeline_source": "push",
        "job_id": "880011",
        "ref": "main",
        "ref_type": "branch",
        "ref_path": "refs/heads/main",
        "ref_protected": "true",
        "environment": "production",
        "environment_protected": "true",
        "deployment_tier": "production",
        "sha": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b",
        "runner_id": 1,
        "jti": str(uuid.uuid4()),
        "iss": issuer,
        "iat": now,
        "nbf": now - 5,
        "exp": now + 300,
        "sub": "project_path:payments/api:ref_type:branch:ref:main",
        "aud": audience,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def mint_with_key(private_key_pem: bytes, kid: str, claims: dict[str, Any]) -> str:
    """An RS256 token signed with a stand-in issuer's saved key (``tracegate dev token``,
    which mints for the issuer a running ``tracegate dev`` serves)."""
    return jwt.encode(claims, private_key_pem, algorithm="RS256", headers={"kid": kid})


def github_claims(issuer: str, audience: str = "tracegate", **overrides: Any) -> dict[str, Any]:
    """Claims shaped like a GitHub Actions OIDC token (``permissions: id-token: write``),
    with the immutable ``sub`` (``repo:owner@id/name@id:…``) of repositories created after
    2026-07-15. Ids are strings, as GitHub sends them."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "jti": str(uuid.uuid4()),
        "sub": "repo:payments-org@2020/api@424242:ref:refs/heads/main",
        "aud": audience,
        "ref": "refs/heads/main",
        "sha": "c040cae0f0dc81641728557b80f09cfa23b83fe5",
        "repository": "payments-org/api",
        "repository_owner": "payments-org",
        "repository_owner_id": "2020",
        "repository_id": "424242",
        "repository_visibility": "private",
        "run_id": "22259804324",
        "run_number": "42",
        "run_attempt": "1",
        "runner_environment": "github-hosted",
        "actor": "alice",
        "actor_id": "1001",
        "workflow": "CI",
        "workflow_ref": "payments-org/api/.github/workflows/ci.yml@refs/heads/main",
        "workflow_sha": "c040cae0f0dc81641728557b80f09cfa23b83fe5",
        "job_workflow_ref": "payments-org/api/.github/workflows/ci.yml@refs/heads/main",
        "job_workflow_sha": "c040cae0f0dc81641728557b80f09cfa23b83fe5",
        "check_run_id": "90000001",
        "event_name": "push",
        "ref_protected": "true",
        "ref_type": "branch",
        "environment": "production",
        "iss": issuer,
        "nbf": now - 5,
        "exp": now + 300,
        "iat": now,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def forgejo_claims(issuer: str, audience: str = "tracegate", **overrides: Any) -> dict[str, Any]:
    """Claims shaped like a Forgejo Actions ID token (``enable-openid-connect: true``),
    issuer ``<instance>/api/actions``; the immutable-id ``sub`` of newer repositories
    (``repo:owner-<id>/name-<id>:…``). No ``job_workflow_ref``/``check_run_id``."""
    claims = github_claims(
        issuer,
        audience,
        sub="repo:platform-7/gateway-315:ref:refs/heads/main",
        repository="platform/gateway",
        repository_owner="platform",
        repository_owner_id="7",
        repository_id="315",
        run_id="3705365",
        actor_id="12",
        workflow="ci.yml",
        workflow_ref="platform/gateway/.forgejo/workflows/ci.yml@refs/heads/main",
        job_workflow_ref=None,
        job_workflow_sha=None,
        check_run_id=None,
        runner_environment=None,
        repository_visibility=None,
        environment=None,
    )
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


class _Server:
    def __init__(self) -> None:
        self.app = web.Application()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, auto_decompress=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class StandInIssuer(_Server):
    """An OIDC issuer on loopback. ``available`` False answers 503; ``jwks_body`` replaces
    the JWKS document with raw bytes (garbage, empty sets, huge documents). ``path`` puts
    the issuer below the origin (``/api/actions``); ``metadata`` says which document it
    publishes: ``openid`` (OIDC discovery), ``oauth`` (``{issuer}/.well-known/
    oauth-authorization-server``, as Okta does) or ``rfc8414`` (inserted after the host)."""

    def __init__(self, *, path: str = "", metadata: str = "openid") -> None:
        super().__init__()
        self.path = path
        self.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec_key = ec.generate_private_key(ec.SECP256R1())
        self.rsa_kid = "rsa-" + uuid.uuid4().hex[:8]
        self.ec_kid = "ec-" + uuid.uuid4().hex[:8]
        self.available = True
        self.jwks_body: bytes | None = None
        self.jwks_uri_override: str | None = None
        self.cache_control = "max-age=300"
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        where = {
            "openid": f"{path}/.well-known/openid-configuration",
            "oauth": f"{path}/.well-known/oauth-authorization-server",
            "rfc8414": f"/.well-known/oauth-authorization-server{path}",
        }[metadata]
        self.app.router.add_get(where, self._discovery)
        self.app.router.add_get(f"{path}/oauth/discovery/keys", self._jwks)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa_key.public_key()))
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec_key.public_key()))
        rsa_jwk.update(kid=self.rsa_kid, use="sig", alg="RS256")
        ec_jwk.update(kid=self.ec_kid, use="sig", alg="ES256")
        return {"keys": [rsa_jwk, ec_jwk]}

    def private_key_pem(self) -> bytes:
        """The RSA signing key (PKCS#8 PEM, unencrypted), for :func:`mint_with_key`."""
        return self.rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def rotate(self) -> None:
        """New RSA key and kid, as after a key rotation at the issuer."""
        self.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa_kid = "rsa-" + uuid.uuid4().hex[:8]

    def mint(
        self,
        claims: dict[str, Any] | None = None,
        *,
        alg: str = "RS256",
        headers: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> str:
        body = claims if claims is not None else gitlab_claims(self.url, **overrides)
        if alg.startswith("ES"):
            key: Any = self.ec_key
            kid = self.ec_kid
        else:
            key, kid = self.rsa_key, self.rsa_kid
        fields = {k: v for k, v in {"kid": kid, **(headers or {})}.items() if v is not None}
        return jwt.encode(body, key, algorithm=alg, headers=fields)

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_fetches += 1
        if not self.available:
            return web.Response(status=503)
        return web.json_response(
            {
                "issuer": self.url,
                "jwks_uri": self.jwks_uri_override or self.url + "/oauth/discovery/keys",
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        if not self.available:
            return web.Response(status=503)
        body = self.jwks_body if self.jwks_body is not None else json.dumps(self.jwks()).encode()
        return web.Response(body=body, content_type="application/json", headers={"Cache-Control": self.cache_control})


@dataclass
class Received:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes


class Sink(_Server):
    """An OTLP receiver that records requests. ``status``/``retry_after``/``delay`` shape
    its answers; by default 200 with an empty Export*ServiceResponse."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Received] = []
        self.status = 200
        self.delay = 0.0
        self.retry_after: str | None = None
        self.answer = b""
        #: Called with each request once recorded (``tracegate dev`` prints it).
        self.on_receive: Callable[[Received], None] | None = None
        self.app.router.add_route("*", "/{tail:.*}", self._record)

    async def _record(self, request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except (ConnectionError, web.HTTPException):
            # The sender gave up mid-body (as tracegate does when its client's body breaks a
            # limit): nothing complete arrived, so nothing is recorded.
            return web.Response(status=400)
        if self.delay:
            await asyncio.sleep(self.delay)
        self.received.append(Received(request.method, request.path, CIMultiDict(request.headers), body))
        if self.on_receive is not None:
            self.on_receive(self.received[-1])
        headers = {"Retry-After": self.retry_after} if self.retry_after else {}
        content_type = request.headers.get("Content-Type", "application/x-protobuf")
        return web.Response(status=self.status, body=self.answer, headers={"Content-Type": content_type, **headers})


@dataclass
class GrpcReceived:
    method: str
    metadata: tuple[tuple[str, str | bytes], ...]
    body: bytes
    #: Seconds left of the caller's deadline when the call arrived (None: no deadline).
    time_remaining: float | None = None

    def values(self, name: str) -> list[str | bytes]:
        return [v for k, v in self.metadata if k == name]


class GrpcSink:
    """An OTLP/gRPC receiver on loopback (plaintext, or TLS) that records every call, whatever the
    method, with no deserializer: ``body`` is the message's bytes as they arrived.
    ``code``/``details``/``trailers`` shape its answer (OK with ``answer`` bytes by default);
    ``delay`` slows it down; ``cancelled`` counts calls abandoned by their caller mid-delay."""

    def __init__(self) -> None:
        self.received: list[GrpcReceived] = []
        self.code = grpc.StatusCode.OK
        self.details = ""
        self.trailers: tuple[tuple[str, str | bytes], ...] = ()
        self.delay = 0.0
        self.answer = b""
        self.cancelled = 0
        self.port = 0
        self._server: aio.Server | None = None
        self.tls = False

    @property
    def target(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def _record(self, method: str, request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
        metadata = tuple(context.invocation_metadata() or ())
        self.received.append(GrpcReceived(method, metadata, request, context.time_remaining()))
        if self.delay:
            try:
                await asyncio.sleep(self.delay)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.code is not grpc.StatusCode.OK:
            await context.abort(self.code, self.details, self.trailers)
        return self.answer

    async def start(self, port: int = 0, *, credentials: grpc.ServerCredentials | None = None) -> None:
        """Listen on 127.0.0.1; with ``credentials``, over TLS (``target`` is then https://)."""
        sink = self

        class _Any(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes]:
                method: str = details.method

                async def record(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
                    return await sink._record(method, request, context)

                return grpc.unary_unary_rpc_method_handler(record)

        server = aio.server(handlers=[_Any()], options=[("grpc.so_reuseport", 0)])
        address = f"127.0.0.1:{port}"
        self.tls = credentials is not None
        self.port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        await server.start()
        self._server = server

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
