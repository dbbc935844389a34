"""AWS IAM callers (issue 23, item 1): presigned ``sts:GetCallerIdentity`` requests, signed
for real by botocore with credentials that moto's STS issued, checked by tracegate and then
by moto's STS in server mode with its signature checks on (``/moto-api/reset-auth``): a
request altered after signing is refused by STS, as AWS would refuse it.

moto runs as its own process on a port chosen here; tracegate reaches it through
:class:`StsRecorder`, a stand-in that forwards each request unchanged and records it, so a
test can say how many STS calls tracegate made (none for a request it refuses itself).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import grpc
import pytest
from aiohttp import web
from botocore.credentials import ReadOnlyCredentials
from multidict import CIMultiDict

from proxy.cli import main
from proxy.dev.standins import GrpcSink, Sink, free_port
from proxy.errors import AuthError, PolicyLoadError
from proxy.identity import aws
from proxy.identity.identify import TokenVerifier
from proxy.observe.metrics import Metrics
from proxy.policy import load_policy
from tests.conftest import PAYMENTS_KEY, Tracegate, environ
from tests.grpc_clients import call
from tests.test_stamp import _spans

AWS_DOC = Path(__file__).parent.parent / "docs" / "ci-aws.md"
ACCOUNT = "123456789012"
OTHER_ACCOUNT = "222222222222"
SERVER_ID = "tracegate.test"


# --- moto's STS, with signature checks on --------------------------------------------------


@dataclass
class Moto:
    url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def start_moto() -> Moto:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url + "/moto-api/", timeout=1):
                return Moto(url, process)
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.05)


def assume(moto: Moto, account: str, role: str, session: str) -> ReadOnlyCredentials:
    """Credentials of ``role`` in ``account``, issued by moto's STS (before its checks are on)."""
    sts = boto3.client(
        "sts", endpoint_url=moto.url, region_name="us-east-1", aws_access_key_id="AKIA0000000000000000",
        aws_secret_access_key="setup",
    )  # fmt: skip
    got = sts.assume_role(RoleArn=f"arn:aws:iam::{account}:role/{role}", RoleSessionName=session)["Credentials"]
    return ReadOnlyCredentials(got["AccessKeyId"], got["SecretAccessKey"], got["SessionToken"])


def check_signatures(moto: Moto) -> None:
    """From now on moto's STS verifies every SigV4 signature (as AWS does)."""
    request = urllib.request.Request(
        moto.url + "/moto-api/reset-auth", data=b"0", headers={"Content-Type": "text/plain"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=5):
        pass


@dataclass
class Principals:
    ci: ReadOnlyCredentials  # assumed role ci-deploy in ACCOUNT, session job-42
    other_account: ReadOnlyCredentials  # assumed role ci-deploy in OTHER_ACCOUNT
    app: ReadOnlyCredentials  # assumed role app-server in ACCOUNT
    user: ReadOnlyCredentials  # IAM user /ci/builder in ACCOUNT


@pytest.fixture(scope="module")
def moto() -> Iterator[tuple[Moto, Principals]]:
    server = start_moto()
    try:
        iam = boto3.client(
            "iam", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="AKIA0000000000000000",
            aws_secret_access_key="setup",
        )  # fmt: skip
        iam.create_user(UserName="builder", Path="/ci/")
        key = iam.create_access_key(UserName="builder")["AccessKey"]
        principals = Principals(
            assume(server, ACCOUNT, "ci-deploy", "job-42"),
            assume(server, OTHER_ACCOUNT, "ci-deploy", "job-43"),
            assume(server, ACCOUNT, "app-server", "i-0abc"),
            ReadOnlyCredentials(key["AccessKeyId"], key["SecretAccessKey"], None),
        )
        check_signatures(server)
        yield server, principals
    finally:
        server.stop()


class StsRecorder:
    """Forwards every request to ``target`` as it came (its Host header too, so that the
    signature moto checks is over what was signed) and records it. ``fail_with``: answer
    that HTTP status instead (an STS having a bad day)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.received: list[dict[str, str]] = []
        self.fail_with: int | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._session = aiohttp.ClientSession(auto_decompress=False)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(dict(request.headers))
        if self.fail_with is not None:
            return web.Response(status=self.fail_with, text="<ErrorResponse/>")
        assert self._session is not None
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() != "content-length")
        async with self._session.request(
            request.method, self.target + request.path_qs, data=body, headers=headers, skip_auto_headers=("Accept",)
        ) as resp:
            return web.Response(
                status=resp.status, body=await resp.read(), content_type=resp.content_type or "text/xml"
            )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def sts(moto: tuple[Moto, Principals]) -> AsyncIterator[StsRecorder]:
    recorder = StsRecorder(moto[0].url)
    await recorder.start()
    yield recorder
    await recorder.stop()


# --- tracegate with an aws issuer ----------------------------------------------------------


def aws_policy(*endpoints: str, server_id: str = SERVER_ID, max_age: int = 900) -> str:
    return textwrap.dedent(f"""\
        issuers:
          aws:
            kind: aws
            server_id: {server_id}
            sts_endpoints: [{", ".join(endpoints)}]
            max_age: {max_age}
        service_accounts:
          payments-ci:
            access_token: {{env: LS_TOKEN_PAYMENTS}}
        rules:
          - name: ci-roles
            issuer: aws
            when: {{account: "{ACCOUNT}", role: "ci-*"}}
            service_account: payments-ci
          - name: builders
            issuer: aws
            when: {{arn: "arn:aws:iam::{ACCOUNT}:user/ci/*"}}
            service_account: payments-ci
        """)


@pytest.fixture
async def aws_tg(start_tracegate: Callable[..., Any], sts: StsRecorder) -> Tracegate:
    tg: Tracegate = await start_tracegate(aws_policy(sts.url))
    return tg


def edit(token: str, change: Callable[[dict[str, Any]], None]) -> str:
    """The token with its signed request changed after signing (as an attacker could)."""
    encoded = token.removeprefix(aws.TOKEN_PREFIX)
    document = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    change(document)
    raw = base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()
    return aws.TOKEN_PREFIX + raw


async def post_traces(client: aiohttp.ClientSession, tg: Tracegate, token: str) -> aiohttp.ClientResponse:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    raw = encode_spans(_spans()).SerializeToString()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-protobuf"}
    async with client.post(tg.url + "/v1/traces", data=raw, headers=headers) as resp:
        await resp.read()
        return resp


def decisions(tg: Tracegate) -> list[dict[str, Any]]:
    return [r for r in tg.audit() if r.get("event") != "authz"]


def logged(caplog: pytest.LogCaptureFixture) -> str:
    """Every log record of the test, extras included, but botocore's: the test's own signer,
    which at DEBUG logs what it signs."""
    return "\n".join(
        f"{r.getMessage()} {r.__dict__}" for r in caplog.get_records("call") if not r.name.startswith("botocore")
    )


def assert_nothing_leaked(text: str, token: str, *credentials: ReadOnlyCredentials) -> None:
    """No part of a signed request or of the credentials that signed it in ``text``."""
    encoded = token.removeprefix(aws.TOKEN_PREFIX)
    document = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    signature = document["headers"]["Authorization"].rsplit("Signature=", 1)[1]
    for secret in (encoded[:64], encoded[-64:], signature):
        assert secret not in text
    for creds in credentials:
        for part in (creds.access_key, creds.secret_key, creds.token):
            if part:
                assert part not in text and part[:40] not in text


# --- the tests -------------------------------------------------------------------------------


async def test_an_allowed_role_exports_under_its_account_and_is_cached(
    moto: tuple[Moto, Principals],
    sts: StsRecorder,
    aws_tg: Tracegate,
    sink: Sink,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = aws.presign(moto[1].ci, server_id=SERVER_ID, endpoint=sts.url)
    for _ in range(3):
        resp = await post_traces(client, aws_tg, token)
        assert resp.status == 200
    assert len(sink.received) == 3
    assert all(r.headers["lightstep-access-token"] == PAYMENTS_KEY for r in sink.received)
    assert len(sts.received) == 1  # verified once, then from the cache
    assert sts.received[0]["X-Tracegate-Server-ID"] == SERVER_ID
    assert aws_tg.metric("tracegate_token_cache_total", result="hit") == 2
    line = decisions(aws_tg)[0]
    assert (line["decision"], line["reason"], line["issuer"], line["service_account"], line["rule"]) == (
        "allowed",
        "forwarded",
        "aws",
        "payments-ci",
        "ci-roles",
    )
    assert line["sub"] == f"arn:aws:sts::{ACCOUNT}:assumed-role/ci-deploy/job-42"
    assert_nothing_leaked(logged(caplog) + "".join(aws_tg.audit_lines), token, moto[1].ci)


async def test_the_claims_are_sts_answer_and_policies_match_them_like_any_claim(
    moto: tuple[Moto, Principals], sts: StsRecorder, tmp_path: Path
) -> None:
    (tmp_path / "p.yaml").write_text(aws_policy(sts.url))
    policy = load_policy(tmp_path, environ=environ())
    verifier = TokenVerifier(policy, {}, Metrics(), clock=time.time, sts=aws.StsClient())
    role = await verifier.verify(aws.presign(moto[1].ci, server_id=SERVER_ID, endpoint=sts.url))
    claims = dict(role.claims)
    assert claims.pop("user_id").endswith(":job-42")
    assert claims == {
        "iss": "aws:aws",
        "aud": SERVER_ID,
        "sub": f"arn:aws:sts::{ACCOUNT}:assumed-role/ci-deploy/job-42",
        "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/ci-deploy/job-42",
        "account": ACCOUNT,
        "role": "ci-deploy",
        "session": "job-42",
    }
    user = await verifier.verify(aws.presign(moto[1].user, server_id=SERVER_ID, endpoint=sts.url))
    assert (user.claims["arn"], user.claims["user"]) == (f"arn:aws:iam::{ACCOUNT}:user/ci/builder", "builder")
    assert "role" not in user.claims
    from proxy.policy import decide

    assert decide(policy, "aws", role.claims, "traces").rule.name == "ci-roles"  # type: ignore[union-attr]
    assert decide(policy, "aws", user.claims, "traces").rule.name == "builders"  # type: ignore[union-attr]
    app = await verifier.verify(aws.presign(moto[1].app, server_id=SERVER_ID, endpoint=sts.url))
    assert decide(policy, "aws", app.claims, "traces").reason == "no-rule-matched"


async def test_another_account_with_the_same_role_name_is_denied_by_policy(
    moto: tuple[Moto, Principals], sts: StsRecorder, aws_tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    token = aws.presign(moto[1].other_account, server_id=SERVER_ID, endpoint=sts.url)
    resp = await post_traces(client, aws_tg, token)
    assert resp.status == 403
    assert sink.received == []
    line = decisions(aws_tg)[0]
    assert (line["decision"], line["reason"], line["issuer"]) == ("denied", "no-rule-matched", "aws")
    assert line["sub"] == f"arn:aws:sts::{OTHER_ACCOUNT}:assumed-role/ci-deploy/job-43"


@pytest.mark.parametrize(
    ("server_id", "reason"),
    [("vault.example.com", "aws-audience-mismatch"), ("tracegate.other", "aws-audience-mismatch")],
    ids=["another-service", "another-tracegate"],
)
async def test_a_request_signed_for_another_server_id_is_refused_without_asking_sts(
    moto: tuple[Moto, Principals],
    sts: StsRecorder,
    aws_tg: Tracegate,
    sink: Sink,
    client: aiohttp.ClientSession,
    server_id: str,
    reason: str,
) -> None:
    token = aws.presign(moto[1].ci, server_id=server_id, endpoint=sts.url)
    resp = await post_traces(client, aws_tg, token)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert decisions(aws_tg)[0]["reason"] == reason
    assert sts.received == [] and sink.received == []


async def test_a_request_replayed_with_its_server_id_rewritten_is_refused_by_sts(
    moto: tuple[Moto, Principals], sts: StsRecorder, aws_tg: Tracegate, sink: Sink, client: aiohttp.ClientSession
) -> None:
    """Signed for another tracegate, the header then rewritten to ours: tracegate's own checks
    pass, the signature no longer does — STS refuses it, and so does tracegate."""
    signed_elsewhere = aws.presign(moto[1].ci, server_id="tracegate.other", endpoint=sts.url)
    replayed = edit(signed_elsewhere, lambda d: d["headers"].update({"X-Tracegate-Server-ID": SERVER_ID}))
    resp = await post_traces(client, aws_tg, replayed)
    assert resp.status == 401
    assert decisions(aws_tg)[0]["reason"] == "aws-signature-rejected"
    assert len(sts.received) == 1 and sink.received == []
    # Remembered: the same replay costs no second STS call.
    assert (await post_traces(client, aws_tg, replayed)).status == 401
    assert len(sts.received) == 1


def _unsigned_audience(document: dict[str, Any]) -> None:
    auth = document["headers"]["Authorization"]
    document["headers"]["Authorization"] = auth.replace(";x-tracegate-server-id", "")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_unsigned_audience, "aws-audience-unsigned"),
        (lambda d: d["headers"].pop("X-Tracegate-Server-ID"), "aws-audience-unsigned"),
        (lambda d: d.update(body="Action=AssumeRole&Version=2011-06-15"), "aws-action-not-allowed"),
        (lambda d: d.update(method="GET"), "aws-action-not-allowed"),
        (lambda d: d.update(url=d["url"] + "?Action=GetCallerIdentity"), "aws-action-not-allowed"),
        (lambda d: d.update(url=d["url"] + "admin"), "aws-action-not-allowed"),
        (lambda d: d["headers"].update({"X-Amz-Date": "20200101T000000Z"}), "aws-request-malformed"),
        (lambda d: d["headers"].update({"Host": "sts.amazonaws.com"}), "aws-request-malformed"),
        (lambda d: d["headers"].update({"X-Evil": "a\r\nb"}), "aws-request-malformed"),
        (lambda d: d.update(extra=1), "aws-request-malformed"),
    ],
    ids=[
        "audience-not-signed",
        "audience-missing",
        "other-action",
        "get",
        "query",
        "other-path",
        "date-not-the-scope's",
        "host-not-the-url's",
        "header-injection",
        "unknown-field",
    ],
)
async def test_tracegate_refuses_what_it_can_check_itself_before_sts_is_asked(
    moto: tuple[Moto, Principals],
    sts: StsRecorder,
    aws_tg: Tracegate,
    client: aiohttp.ClientSession,
    change: Callable[[dict[str, Any]], None],
    reason: str,
) -> None:
    token = edit(aws.presign(moto[1].ci, server_id=SERVER_ID, endpoint=sts.url), change)
    assert (await post_traces(client, aws_tg, token)).status == 401
    assert decisions(aws_tg)[0]["reason"] == reason
    assert sts.received == []


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (aws.TOKEN_PREFIX + "!!!", "aws-request-malformed"),
        (aws.TOKEN_PREFIX + base64.urlsafe_b64encode(b"[1,2]").decode(), "aws-request-malformed"),
        (aws.TOKEN_PREFIX + "A" * 8000, "token-too-large"),
    ],
    ids=["not-base64", "not-an-object", "too-large"],
)
async def test_malformed_tokens_are_refused(
    aws_tg: Tracegate, sts: StsRecorder, client: aiohttp.ClientSession, token: str, reason: str
) -> None:
    assert (await post_traces(client, aws_tg, token)).status == 401
    assert decisions(aws_tg)[0]["reason"] == reason
    assert sts.received == []


async def test_an_expired_request_is_refused_and_a_cached_one_expires_by_the_injected_clock(
    moto: tuple[Moto, Principals], sts: StsRecorder, tmp_path: Path
) -> None:
    (tmp_path / "p.yaml").write_text(aws_policy(sts.url, max_age=300))
    policy = load_policy(tmp_path, environ=environ())
    token = aws.presign(moto[1].ci, server_id=SERVER_ID, endpoint=sts.url)
    signed_at = aws.parse_token(token).signed_at
    now = [signed_at + 301]
    verifier = TokenVerifier(policy, {}, Metrics(), clock=lambda: now[0], sts=aws.StsClient())
    with pytest.raises(AuthError) as refused:
        await verifier.verify(token)
    assert (refused.value.reason, refused.value.issuer, refused.value.status) == ("aws-request-expired", "aws", 401)
    assert sts.received == []

    fresh = aws.presign(moto[1].user, server_id=SERVER_ID, endpoint=sts.url)  # another signature
    now[0] = aws.parse_token(fresh).signed_at + 299
    assert (await verifier.verify(fresh)).exp == aws.parse_token(fresh).signed_at + 300
    assert (await verifier.verify(fresh)).issuer == "aws" and len(sts.received) == 1  # cached
    now[0] += 2  # past X-Amz-Date + max_age: the cache lets go, and the request is now too old
    with pytest.raises(AuthError, match="aws-request-expired"):
        await verifier.verify(fresh)
    assert len(sts.received) == 1

    now[0] = aws.parse_token(fresh).signed_at - 120  # signed two minutes ahead of tracegate's clock
    ahead = TokenVerifier(policy, {}, Metrics(), clock=lambda: now[0], sts=aws.StsClient())
    with pytest.raises(AuthError, match="aws-request-in-future"):
        await ahead.verify(fresh)


async def test_an_sts_endpoint_not_on_the_list_is_never_called(
    moto: tuple[Moto, Principals], sts: StsRecorder, aws_tg: Tracegate, client: aiohttp.ClientSession
) -> None:
    decoy = StsRecorder(moto[0].url)  # forwards to the same moto: a working STS, just not listed
    await decoy.start()
    try:
        for endpoint in (decoy.url, "https://sts.eu-west-1.amazonaws.com", "https://sts.amazonaws.com"):
            token = aws.presign(moto[1].ci, server_id=SERVER_ID, endpoint=endpoint)
            assert (await post_traces(client, aws_tg, token)).status == 401
        assert [r["reason"] for r in decisions(aws_tg)] == ["aws-endpoint-not-allowed"] * 3
        assert decoy.received == [] and sts.received == []
    finally:
        await decoy.stop()


async def test_sts_down_or_failing_is_503_with_retry_after_and_never_an_allow(
    moto: tuple[Moto, Principals],
    start_tracegate: Callable[..., Any],
    sts: StsRecorder,
    sink: Sink,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    own = await asyncio.to_thread(start_moto)
    try:
        creds = await asyncio.to_thread(assume, own, ACCOUNT, "ci-deploy", "job-44")
    finally:
        own.stop()  # STS is down from here on
    tg: Tracegate = await start_tracegate(aws_policy(own.url, sts.url))
    token = aws.presign(creds, server_id=SERVER_ID, endpoint=own.url)
    for _ in range(2):  # not remembered as a refusal: each attempt asks again
        resp = await post_traces(client, tg, token)
        assert (resp.status, resp.headers["Retry-After"]) == (503, "5")
    sts.fail_with = 500  # listed, reachable, answering 500
    failing = aws.presign(moto[1].ci, server_id=SERVER_ID, endpoint=sts.url)
    resp = await post_traces(client, tg, failing)
    assert (resp.status, resp.headers["Retry-After"]) == (503, "5")
    sts.fail_with = 400  # STS says no, without saying it is the signature
    resp = await post_traces(client, tg, aws.presign(moto[1].app, server_id=SERVER_ID, endpoint=sts.url))
    assert resp.status == 401
    assert [r["reason"] for r in decisions(tg)] == ["sts-unavailable"] * 3 + ["aws-request-rejected"]
    assert {r["decision"] for r in decisions(tg)} == {"refused"}
    assert sink.received == []
    assert "sts call failed" in caplog.text
    assert_nothing_leaked(logged(caplog) + "".join(tg.audit_lines), token, creds)


async def test_every_door_takes_the_aws_identity_grpc_and_the_gateway_check(
    moto: tuple[Moto, Principals], start_tracegate: Callable[..., Any], sts: StsRecorder, client: aiohttp.ClientSession
) -> None:
    grpc_sink = GrpcSink()
    await grpc_sink.start()
    try:
        tg: Tracegate = await start_tracegate(
            aws_policy(sts.url),
            grpc_listen="127.0.0.1:0",
            grpc_upstream=grpc_sink.target,
            authz_listen="127.0.0.1:0",
            authz_dialect="traefik",
        )
        assert tg.runtime.grpc_address is not None
        token = aws.presign(moto[1].ci, server_id=SERVER_ID, endpoint=sts.url)
        outcome = await call(tg.runtime.grpc_address[1], [("authorization", f"Bearer {token}")], b"exact bytes")
        assert outcome.code is grpc.StatusCode.OK
        assert grpc_sink.received[0].values("lightstep-access-token") == [PAYMENTS_KEY]
        other = aws.presign(moto[1].other_account, server_id=SERVER_ID, endpoint=sts.url)
        outcome = await call(tg.runtime.grpc_address[1], [("authorization", f"Bearer {other}")])
        assert outcome.code is grpc.StatusCode.PERMISSION_DENIED
        authz = f"http://127.0.0.1:{tg.runners[2].addresses[0][1]}/traefik-check"
        forwarded = {"X-Forwarded-Method": "POST", "X-Forwarded-Uri": "/v1/traces"}
        async with client.get(authz, headers={"Authorization": f"Bearer {token}", **forwarded}) as resp:
            assert (resp.status, resp.headers["lightstep-access-token"]) == (200, PAYMENTS_KEY)
        assert len(sts.received) == 2  # one per signed request, whichever door it came through
    finally:
        await grpc_sink.stop()


def test_the_aws_token_command_signs_with_the_default_credential_chain(
    moto: tuple[Moto, Principals], tmp_path: Path
) -> None:
    creds = moto[1].ci
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "AWS_ACCESS_KEY_ID": creds.access_key,
        "AWS_SECRET_ACCESS_KEY": creds.secret_key,
        "AWS_SESSION_TOKEN": creds.token,
    }
    endpoint = moto[0].url
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "aws-token", "--server-id", SERVER_ID, "--sts-endpoint", endpoint],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr
    header = done.stdout.strip()
    assert header.startswith("Bearer aws-sts.")
    request = aws.parse_token(header.removeprefix("Bearer "))
    assert request.server_id == SERVER_ID and request.url == endpoint + "/"
    assert dict(request.headers)["X-Amz-Security-Token"] == creds.token
    for name in ("AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        del env[name]
    env.update(AWS_CONFIG_FILE="/none", AWS_SHARED_CREDENTIALS_FILE="/none", AWS_EC2_METADATA_DISABLED="true")
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "aws-token", "--server-id", SERVER_ID],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert "no AWS credentials found" in done.stderr


async def test_the_documented_boto3_snippet_makes_a_token_tracegate_accepts(
    moto: tuple[Moto, Principals], sts: StsRecorder, aws_tg: Tracegate, client: aiohttp.ClientSession
) -> None:
    section = AWS_DOC.read_text()
    snippet = section[section.index("```python\n") + 10 : section.index("```", section.index("```python\n") + 10)]
    session = boto3.Session(
        aws_access_key_id=moto[1].ci.access_key,
        aws_secret_access_key=moto[1].ci.secret_key,
        aws_session_token=moto[1].ci.token,
    )
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "docs/ci-aws.md snippet", "exec"), namespace)  # our own documentation
    header = namespace["tracegate_aws_header"](SERVER_ID, endpoint=sts.url, session=session)
    assert (await post_traces(client, aws_tg, header.removeprefix("Bearer "))).status == 200


# --- the policy: kind aws, checked at load ----------------------------------------------------


def _problems(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(PolicyLoadError) as caught:
        load_policy(tmp_path, environ=environ(), resolve_secrets=False)
    return [p.message for p in caught.value.problems]


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ('account: "123456789012", ', "", "without pinning their AWS account"),
        ('account: "123456789012"', 'account: "1234*"', "without pinning their AWS account"),
        ("max_age: 900", "max_age: 3600", "max_age must be whole seconds from 1 to 900"),
        ("[http://127.0.0.1:1]", "[http://sts.example.com]", "must use https"),
        ("[http://127.0.0.1:1]", "[https://sts.amazonaws.com/x]", "without a path"),
        ("server_id: tracegate.test", "server_id: has space", "visible ASCII"),
        ("kind: aws", "kind: azure", "kind must be oidc (the default) or aws"),
        ("kind: aws", "kind: aws\n    audiences: [x]", "unknown key 'audiences'"),
    ],
    ids=["no-account", "account-glob", "max-age", "http", "path", "server-id", "kind", "oidc-key"],
)
def test_an_aws_issuer_and_its_rules_are_checked_at_load(
    tmp_path: Path, before: str, after: str, expected: str
) -> None:
    text = aws_policy("http://127.0.0.1:1")
    assert before in text
    problems = _problems(tmp_path, text.replace(before, after, 1))
    assert any(expected in p for p in problems), problems


def test_two_aws_issuers_may_not_share_a_server_id_and_names_stay_unique(tmp_path: Path) -> None:
    text = aws_policy("http://127.0.0.1:1").replace(
        "service_accounts:", "  aws-b:\n    kind: aws\n    server_id: tracegate.test\nservice_accounts:"
    )
    assert any("same server_id as 'aws'" in p for p in _problems(tmp_path, text))


def test_check_and_explain_understand_an_aws_issuer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(aws_policy("https://sts.amazonaws.com", "https://sts.eu-west-1.amazonaws.com"))
    assert main(["check", str(policies)], environ={}) == 0
    assert "ok: 1 file(s), 1 issuer(s), 1 service account(s), 2 rule(s)" in capsys.readouterr().out
    claims = tmp_path / "claims.json"
    arn = f"arn:aws:sts::{ACCOUNT}:assumed-role/ci-deploy/job-42"
    claims.write_text(
        json.dumps({"iss": "aws:aws", "aud": SERVER_ID, "arn": arn, "account": ACCOUNT, "role": "ci-deploy"})
    )
    assert main(["explain", str(policies), "--claims", str(claims), "--signal", "traces"], environ={}) == 0
    out = capsys.readouterr().out
    assert "issuer: aws (aws:aws)" in out and "allowed (rule-allowed): rule 'ci-roles'" in out
    claims.write_text(json.dumps({"iss": "aws:aws", "aud": SERVER_ID, "account": OTHER_ACCOUNT, "role": "ci-deploy"}))
    assert main(["explain", str(policies), "--claims", str(claims)], environ={}) == 1
    assert "denied (no-rule-matched)" in capsys.readouterr().out


async def test_an_aws_caller_on_the_ci_endpoints_is_a_clear_refusal_never_a_500(
    moto: tuple[Moto, Principals], sts: StsRecorder, aws_tg: Tracegate, client: aiohttp.ClientSession
) -> None:
    """/v1/traceparent and /v1/deployments read a CI job's claims from the token's issuer;
    an AWS identity has no OIDC issuer (it was a KeyError: a 500)."""
    token = aws.presign(moto[1].ci, server_id=SERVER_ID, endpoint=sts.url)
    headers = {"Authorization": f"Bearer {token}"}
    async with client.get(aws_tg.url + "/v1/traceparent", headers=headers) as resp:
        assert resp.status == 400
    body = b'{"service": "payments-api"}'
    async with client.post(
        aws_tg.url + "/v1/deployments", data=body, headers={**headers, "Content-Type": "application/json"}
    ) as resp:
        assert resp.status < 500
    assert aws_tg.metric("tracegate_unhandled_errors_total") in (None, 0)
