"""Policy evaluation: verified claims + signal → :class:`Decision` with a stable reason.

Order: a matching deny rule wins over any allow; otherwise the first matching allow rule
(in file order, files sorted by name) decides; no match is a denial. An account that does
not allow the signal turns the allow into a denial. Pure and synchronous: no I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.policy.model import Policy, Rule, ServiceAccount

#: Reason codes a decision carries; also the ``reason`` label of the request metrics.
ALLOWED = "rule-allowed"
RULE_DENIED = "rule-denied"
NO_RULE = "no-rule-matched"
SIGNAL_NOT_ALLOWED = "signal-not-allowed"
UNKNOWN_ISSUER = "unknown-issuer"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rule: Rule | None = None
    account: ServiceAccount | None = None
    #: For explain: why each rule of the issuer did or did not match.
    trace: tuple[str, ...] = ()


def first_mismatch(rule: Rule, claims: Mapping[str, Any]) -> str | None:
    """The first condition of ``rule`` the claims fail, as a sentence; None if all match."""
    for claim, matcher in rule.when:
        value = claims.get(claim)
        if value is None:
            return f"claim {claim!r} is missing"
        if not matcher.match(value):
            return f"claim {claim!r} does not match {list(matcher.patterns)}"
    return None


def decide(
    policy: Policy, issuer: str, claims: Mapping[str, Any], signal: str | None, *, explain: bool = False
) -> Decision:
    """Decide for a token of ``issuer`` (the policy's issuer name). ``signal`` None skips the
    signal check (deployment markers and explain without a signal)."""
    if not policy.knows_issuer(issuer):
        return Decision(False, UNKNOWN_ISSUER)
    trace: list[str] = []
    allow: Rule | None = None
    for rule in policy.rules:
        if rule.issuer != issuer:
            continue
        if rule.effect == "allow" and allow is not None:
            continue  # the first allow already decided; only denies can still change it
        mismatch = first_mismatch(rule, claims)
        if explain:
            trace.append(f"{rule.where} {rule.effect} rule {rule.name!r}: " + (mismatch or "matches"))
        if mismatch is not None:
            continue
        if rule.effect == "deny":
            return Decision(False, RULE_DENIED, rule, None, tuple(trace))
        allow = rule
    if allow is None or allow.service_account is None:
        return Decision(False, NO_RULE, None, None, tuple(trace))
    account = policy.service_accounts[allow.service_account]
    if signal is not None and signal not in account.signals:
        return Decision(False, SIGNAL_NOT_ALLOWED, allow, account, tuple(trace))
    return Decision(True, ALLOWED, allow, account, tuple(trace))
