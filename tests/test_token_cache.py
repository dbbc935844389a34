"""The verified-token cache holds nothing the cycle collector walks, and still expires at
``exp`` and stays within its size; the per-identity work made at verification (numbered
decisions, audit fields) matches what the request path would otherwise compute.

Real tokens signed by the stand-in issuer's keys, fetched over loopback; the clock is
injected. No timings here: bench/trim.py measures the speed and the memory."""

from __future__ import annotations

import gc
import hashlib
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.dev.standins import StandInIssuer, gitlab_claims
from proxy.errors import AuthError
from proxy.gate.runtime import Gate
from proxy.identity.identify import Identity, TokenVerifier
from proxy.identity.keys import KeySource
from proxy.identity.token_cache import BUCKET_SECONDS, KEY_LENGTH, ExpiringCache
from proxy.observe.audit import AUDITED_CLAIMS, AuditLog, claims_fields
from proxy.observe.metrics import Metrics
from proxy.policy import Policy, decide, load_policy
from proxy.policy.memo import SLOTS, DecisionBook
from tests.conftest import policy_yaml

LEEWAY = 60.0


@dataclass
class Verifying:
    verifier: TokenVerifier
    gate: Gate
    metrics: Metrics
    issuer: StandInIssuer
    now: list[float]

    def mint(self, exp_in: float = 300, **claims: Any) -> str:
        now = int(self.now[0])
        return self.issuer.mint(gitlab_claims(self.issuer.url, iat=now, nbf=now - 5, exp=now + exp_in, **claims))

    def count(self, result: str) -> float:
        return self.metrics.registry.get_sample_value("tracegate_token_cache_total", {"result": result}) or 0.0


async def _verifying(tmp_path: Path, issuer: StandInIssuer, cache_size: int) -> AsyncIterator[Verifying]:
    (tmp_path / "p.yaml").write_text(policy_yaml(issuer.url))
    policy: Policy = load_policy(tmp_path, environ={"LS_TOKEN_PAYMENTS": "k1", "LS_TOKEN_DOCS": "k2"})
    metrics = Metrics()
    now = [1_800_000_000.0]
    async with aiohttp.ClientSession() as session:
        source = KeySource(policy.issuers["gitlab"], session, metrics, clock=lambda: now[0], min_refetch_interval=0)
        book = DecisionBook(policy)
        verifier = TokenVerifier(
            policy,
            {"gitlab": source},
            metrics,
            clock=lambda: now[0],
            leeway=LEEWAY,
            cache_size=cache_size,
            decisions=book.numbers,
        )
        yield Verifying(verifier, Gate(policy, verifier, book), metrics, issuer, now)
        await source.close()


@pytest.fixture
async def verifying(tmp_path: Path, issuer: StandInIssuer) -> AsyncIterator[Verifying]:
    async for v in _verifying(tmp_path, issuer, cache_size=1000):
        yield v


@pytest.fixture
async def small(tmp_path: Path, issuer: StandInIssuer) -> AsyncIterator[Verifying]:
    async for v in _verifying(tmp_path, issuer, cache_size=3):
        yield v


def _atoms(value: object) -> bool:
    if isinstance(value, tuple):
        return all(_atoms(item) for item in value)
    return isinstance(value, (str, bytes, int, float))


async def test_cache_entries_are_untracked_tuples_of_atoms(verifying: Verifying) -> None:
    tokens = [verifying.mint(job_id=str(n), project_path=path) for n, path in enumerate(["payments/api", "docs/site"])]
    tokens.append(verifying.mint(exp_in=3600.5, project_path="payments/forks/x"))
    for token in tokens:
        await verifying.verifier.verify(token)
    entries = list(verifying.verifier.cache.values())
    assert len(entries) == 3
    # A new tuple is tracked until a collection sees it holds only untracked items; an inner
    # tuple the collector reaches later in that pass leaves the outer one for the next.
    gc.collect()
    gc.collect()
    for entry in entries:
        assert type(entry) is tuple and _atoms(entry)
        assert gc.is_tracked(entry) is False
        assert gc.is_tracked(entry[-1]) is False  # the decision numbers


async def test_a_hit_is_the_identity_that_was_verified(verifying: Verifying) -> None:
    token = verifying.mint(exp_in=600, project_path="payments/api")
    first = await verifying.verifier.verify(token)
    second = await verifying.verifier.verify(token)
    assert (verifying.count("miss"), verifying.count("hit")) == (1, 1)
    assert second == first and isinstance(second, Identity)
    assert second.issuer == "gitlab"
    assert second.exp == verifying.now[0] + 600 and second.expires_at == second.exp + LEEWAY
    assert second.claims["project_path"] == "payments/api"
    with pytest.raises(TypeError):
        second.claims["project_path"] = "x"  # type: ignore[index]


async def test_entry_expires_at_exp_plus_leeway(verifying: Verifying) -> None:
    token = verifying.mint(exp_in=300)
    identity = await verifying.verifier.verify(token)
    verifying.now[0] = identity.expires_at - 0.001
    await verifying.verifier.verify(token)
    assert verifying.count("hit") == 1
    verifying.now[0] = identity.expires_at  # at expiry: gone (verified afresh, not kept)
    await verifying.verifier.verify(token)
    assert (verifying.count("hit"), verifying.count("miss")) == (1, 2)
    assert len(verifying.verifier.cache) == 0
    verifying.now[0] += 0.001  # past it: refused
    with pytest.raises(AuthError) as info:
        await verifying.verifier.verify(token)
    assert info.value.reason == "token-expired"
    assert len(verifying.verifier.cache) == 0


async def test_expired_entries_leave_when_others_arrive(verifying: Verifying) -> None:
    short = [verifying.mint(exp_in=100, job_id=str(n)) for n in range(5)]
    long = verifying.mint(exp_in=10_000)
    for token in [*short, long]:
        await verifying.verifier.verify(token)
    assert len(verifying.verifier.cache) == 6
    verifying.now[0] += 100 + LEEWAY + BUCKET_SECONDS
    await verifying.verifier.verify(verifying.mint(exp_in=300, job_id="new"))
    assert len(verifying.verifier.cache) == 2  # the five expired ones left without being asked for


async def test_size_is_bounded_and_a_token_in_use_stays(small: Verifying) -> None:
    hot = small.mint(job_id="hot")
    await small.verifier.verify(hot)
    for n in range(10):  # a new token between each use of the hot one: never dropped
        await small.verifier.verify(small.mint(job_id=str(n)))
        await small.verifier.verify(hot)
        assert len(small.verifier.cache) <= 3
    assert (small.count("miss"), small.count("hit")) == (11, 10)


def _k(name: object) -> str:
    """A cache key: 64 hex characters, as a SHA-256 hex digest."""
    return hashlib.sha256(str(name).encode()).hexdigest()


def test_expiring_cache_drops_the_oldest_unused_entry() -> None:
    cache = ExpiringCache(4, lambda: 0.0)
    for key in "abcd":
        cache.put(_k(key), (1.0, key))
    assert cache.get(_k("a")) is not None  # used since the rotation: kept
    cache.put(_k("e"), (1.0, "e"))
    cache.put(_k("f"), (1.0, "f"))
    assert [key for key in "abcdef" if cache.get(_k(key)) is not None] == ["a", "d", "e", "f"]
    for n in range(1000):
        cache.put(_k(n), (1.0, n))
        assert len(cache) <= 4
    one = ExpiringCache(1, lambda: 0.0)
    one.put(_k("x"), (1.0,))
    one.put(_k("y"), (1.0,))
    assert (one.get(_k("x")), one.get(_k("y")), len(one)) == (None, (1.0,), 1)
    with pytest.raises(ValueError):
        one.put("short", (1.0,))
    with pytest.raises(ValueError):
        ExpiringCache(0, lambda: 0.0)


def test_expiring_cache_bookkeeping_stays_bounded() -> None:
    now = [0.0]
    cache = ExpiringCache(10, lambda: now[0])
    for n in range(10_000):  # far more insertions than room, and the same keys again and again
        cache.put(_k(n % 37), (1e9 + n, n))
        cache.get(_k((n * 7) % 37))
        assert len(cache) <= 10
    assert cache._bucketed <= 2 * 10 + 16
    assert len(cache._young_order) <= KEY_LENGTH * (2 * 10 + 16)
    cache.put(_k("late"), (-1.0, "already expired"))
    assert cache.get(_k("late")) is None and len(cache) == 10


def test_expired_entries_leave_within_a_bucket() -> None:
    now = [1000.0]
    cache = ExpiringCache(100, lambda: now[0])
    for n in range(50):
        cache.put(_k(n), (1100.0 + n, n))
    cache.put(_k("long"), (1e6, "long"))
    now[0] = 1100.0 + 50 + BUCKET_SECONDS  # every short one expired, and its bucket is past
    cache.put(_k("new"), (now[0] + 300, "new"))
    assert sorted(e[1] for e in cache.values()) == ["long", "new"]
    assert cache._bucketed == 2


async def test_gate_decisions_are_the_policy_decisions(verifying: Verifying) -> None:
    cases = [
        {"project_path": "payments/api", "ref_protected": "true"},
        {"project_path": "payments/api", "ref_protected": "false"},
        {"project_path": "payments/forks/api", "ref_protected": "true"},
        {"project_path": "docs/site"},
        {"project_path": "elsewhere/x"},
    ]
    for n, claims in enumerate(cases):
        identity = await verifying.verifier.verify(verifying.mint(job_id=str(n), **claims))
        for signal in (*SLOTS, "profiles"):
            expected = decide(verifying.gate.policy, "gitlab", identity.claims, signal)
            assert verifying.gate.decide(identity, signal) == expected


# --- the audit line: AuditLog.decision writes exactly what AuditLog.__call__ writes ------------

text = st.text(max_size=300) | st.sampled_from(["", "a\nb", "\x1b[31m", "\u202e", "é" * 300, "\ud800"])
claim = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | text
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)
field = st.none() | text


@settings(max_examples=300, deadline=None)
@given(
    claims=st.none() | st.dictionaries(st.sampled_from([*AUDITED_CLAIMS, "other"]), claim),
    heads=st.tuples(text, text, text, field, field, field, field, text),
    bytes_in=st.integers(min_value=0),
    status=st.none() | st.integers(100, 599) | text,
)
def test_decision_line_is_the_call_line(
    claims: dict[str, Any] | None,
    heads: tuple[Any, ...],
    bytes_in: int,
    status: int | str | None,
) -> None:
    kind, outcome, reason, issuer, signal, account, rule, transport = heads
    called: list[str] = []
    fast: list[str] = []
    AuditLog(called.append, flush_interval=0)(
        kind=kind,
        decision=outcome,
        reason=reason,
        issuer=issuer,
        claims=claims,
        service_account=account,
        rule=rule,
        signal=signal,
        bytes_in=bytes_in,
        upstream_status=status,
        transport=transport,
    )
    log = AuditLog(fast.append, flush_interval=0)
    for _ in range(2):  # the second line comes from the remembered head
        log.decision(
            kind, outcome, reason, issuer, signal, account, rule, bytes_in, status, claims_fields(claims), transport
        )
    assert fast == called * 2
    record = json.loads(fast[0])
    assert all(v is None or not isinstance(v, float) or math.isfinite(v) for v in record.values())
