"""Property-based tests: token parsing, claim matching, header cleaning and the policy
loader hold their contracts for arbitrary input."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import string
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.backends.profiles import BackendSpec, Route, build_backend
from proxy.errors import AuthError, PolicyLoadError
from proxy.identity.identify import TokenVerifier
from proxy.identity.keys import KeySource
from proxy.observe.metrics import Metrics
from proxy.policy import load_policy
from proxy.policy.matchers import Matcher
from proxy.policy.model import Policy
from proxy.secrets import Secret, SecretRef
from proxy.upstream.headers import FORWARDED, NEVER, HeaderPolicy

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

POLICY = """\
issuers:
  gitlab:
    issuer: http://127.0.0.1:9
    audiences: [tracegate]
    algorithms: [RS256, ES256]
service_accounts:
  a:
    access_token: {env: K}
rules:
  - {name: r, issuer: gitlab, when: {project_path: "payments/*"}, service_account: a}
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    root = tmp_path_factory.mktemp("p")
    (root / "p.yaml").write_text(POLICY)
    return load_policy(root, environ={"K": "key"})


@pytest.fixture(scope="module")
def verify(policy: Policy) -> Iterator[object]:
    """verify(token) on a real verifier whose issuer (port 9) never answers."""
    loop = asyncio.new_event_loop()
    session = loop.run_until_complete(_session())
    metrics = Metrics()
    source = KeySource(policy.issuers["gitlab"], session, metrics, clock=loop.time, min_refetch_interval=3600)
    verifier = TokenVerifier(policy, {"gitlab": source}, metrics, clock=lambda: 1_800_000_000.0)
    yield lambda token: loop.run_until_complete(verifier.verify(token))
    loop.run_until_complete(session.close())
    loop.close()


async def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
headers_json = st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "b64", "x"]), json_values, max_size=4)
claims_json = st.dictionaries(
    st.sampled_from(["iss", "aud", "exp", "iat", "nbf", "sub", "project_path"]), json_values, max_size=7
)


@FAST
@given(token=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_arbitrary_strings_are_refused_with_a_reason(verify, token: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AuthError) as info:
        verify(token)
    assert re.fullmatch(r"[a-z]+(-[a-z]+)*", info.value.reason)


@FAST
@given(header=headers_json, claims=claims_json, signature=st.binary(max_size=300))
def test_structured_but_unsigned_tokens_are_refused(verify, header, claims, signature) -> None:  # type: ignore[no-untyped-def]
    token = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(signature)}"
    with pytest.raises(AuthError) as info:
        verify(token)
    assert info.value.reason != "rule-allowed"


def reference_glob(pattern: str, text: str) -> bool:
    """Independent reference: ``*`` matches any run of characters; all else is literal."""
    parts = pattern.split("*")
    if len(parts) == 1:
        return pattern == text
    if not text.startswith(parts[0]) or not text.endswith(parts[-1]) or len(text) < len(parts[0]) + len(parts[-1]):
        return False
    position, end = len(parts[0]), len(text) - len(parts[-1])
    for middle in parts[1:-1]:
        found = text.find(middle, position, end)
        if found < 0:
            return False
        position = found + len(middle)
    return True


alphabet = st.sampled_from([*list("ab/*.-_ "), "\n", "é"])


@settings(max_examples=1000, deadline=None)
@given(pattern=st.text(alphabet, max_size=10), text=st.text(alphabet.filter(lambda c: c != "*"), max_size=12))
def test_glob_matching_agrees_with_the_reference(pattern: str, text: str) -> None:
    assert Matcher([pattern]).match_text(text) == reference_glob(pattern, text)


@settings(max_examples=300, deadline=None)
@given(patterns=st.lists(st.text(alphabet, max_size=6), min_size=1, max_size=3), claim=json_values)
def test_matching_any_claim_shape_never_raises(patterns: list[str], claim: object) -> None:
    result = Matcher(patterns).match(claim)
    assert isinstance(result, bool)
    if isinstance(claim, dict) or claim is None or isinstance(claim, float):
        assert result is False


header_names = st.one_of(
    st.sampled_from(
        [
            "Authorization",
            "authorization",
            "AUTHORIZATION",
            "Lightstep-Access-Token",
            "X-Honeycomb-Team",
            "x-honeycomb-dataset",
            "LIGHTSTEP-ACCESS-TOKEN",
            "lightstep_access_token",
            "Cookie",
            "Forwarded",
            "X-Forwarded-For",
            "X_Forwarded_For",
            "Connection",
            "Upgrade",
            "TE",
            "Proxy-Authorization",
            "Content-Type",
            "Content-Encoding",
            "User-Agent",
            "X-Custom",
            "Keep-Alive",
            "Transfer-Encoding",
        ]
    ),
    st.text(string.ascii_letters + "-_", min_size=1, max_size=12),
)


REF = SecretRef("env", "KEY")
ROUTES = [
    build_backend(BackendSpec(name, options, {"access_token": REF, **extra}), creds).routes["metrics"]
    for name, options, extra, creds in (
        ("lightstep", {}, {}, {"access_token": Secret("account-key")}),
        (
            "honeycomb",
            {"region": "api.honeycomb.io", "dataset": "ci"},
            {},
            {"access_token": Secret("account-key")},
        ),
        (
            "grafana-cloud",
            {"region": "prod-eu-west-2"},
            {"instance_id": "12345"},
            {"access_token": Secret("account-key"), "instance_id": Secret("12345")},
        ),
    )
]


@settings(max_examples=500, deadline=None)
@given(
    pairs=st.lists(st.tuples(header_names, st.text(string.printable.strip(), max_size=20)), max_size=12),
    route=st.sampled_from(ROUTES),
)
def test_header_cleaning_forwards_only_the_allowlist_and_one_key(pairs: list[tuple[str, str]], route: Route) -> None:
    """Whatever the client sends, the upstream gets the allowlisted headers not named by
    Connection, then exactly the route's own (one of each: the account's credential)."""
    incoming = CIMultiDictProxy(CIMultiDict(pairs))
    out = HeaderPolicy().upstream(incoming, route)
    for name, value in route.reveal():
        assert out.getall(name) == [value]
    connection_named = {n.strip().lower() for v in incoming.getall("Connection", ()) for n in v.split(",")}
    for name in out:
        lower = name.lower()
        assert lower in route.names or (lower in FORWARDED and lower not in connection_named)
        assert "_" not in name
        assert lower not in NEVER or lower in route.names


yaml_documents = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "issuers",
                    "service_accounts",
                    "rules",
                    "webhooks",
                    "name",
                    "issuer",
                    "when",
                    "audiences",
                    "access_token",
                    "env",
                    "file",
                    "effect",
                    "service_account",
                    "signals",
                    "x",
                ]
            )
            | st.text(max_size=6),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=yaml_documents, garbage=st.text(max_size=80))
def test_policy_loader_loads_or_raises_its_own_error(tmp_path: Path, document: object, garbage: str) -> None:
    for text in (yaml.safe_dump(document), garbage):
        (tmp_path / "p.yaml").write_text(text)
        try:
            load_policy(tmp_path, environ={"K": "v"})
        except PolicyLoadError as exc:
            assert exc.problems
