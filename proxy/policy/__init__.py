"""Policies: YAML files parsed into a typed model, then evaluated against verified claims.

Stages, each its own module: :mod:`.source` (YAML with line numbers) → :mod:`.loader`
(checks, builds :mod:`.model`) → :mod:`.evaluate` (claims in, :class:`Decision` out).
"""

from proxy.policy.evaluate import Decision, decide
from proxy.policy.loader import load_policy
from proxy.policy.model import Issuer, Policy, Rule, ServiceAccount, Signal

__all__ = [
    "Decision",
    "Issuer",
    "Policy",
    "Rule",
    "ServiceAccount",
    "Signal",
    "decide",
    "load_policy",
]
