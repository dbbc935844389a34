"""A policy's decisions, numbered, so that a cached identity remembers its decisions as a
tuple of small ints.

A verified token's decision for a signal never changes while its policy serves (a reload
builds a new verifier, and with it a new cache and a new book). So the decisions for the
signals every door asks about (:data:`SLOTS`) are made once, when the token is verified,
and kept *in the cache entry* — as numbers into this book, not as references to
:class:`Decision` objects: a tuple of ints is an atom the cycle collector never walks
(see :mod:`proxy.identity.token_cache`), a tuple holding a Decision is walked on every full
collection. The book itself holds one Decision per distinct outcome — bounded by the
policy's rules and accounts, not by the number of tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.policy.evaluate import Decision, decide
from proxy.policy.model import Policy

#: The signals decided when a token is verified; position = index in an identity's numbers.
#: ``None`` is "no signal check" (deployment markers). Any other signal is decided per request.
SLOTS: tuple[str | None, ...] = ("traces", "metrics", "logs", None)
_SLOT_OF: dict[str | None, int] = {signal: n for n, signal in enumerate(SLOTS)}


class DecisionBook:
    """Numbers for one policy's decisions (without explain traces)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._decisions: list[Decision] = []
        self._numbers: dict[tuple[bool, str, int, int], int] = {}
        self._rows: dict[tuple[int, ...], tuple[int, ...]] = {}

    def numbers(self, issuer: str, claims: Mapping[str, Any]) -> tuple[int, ...]:
        """The numbered decisions of a verified token, one per slot of :data:`SLOTS`. Equal
        tuples are shared: most tokens of a pipeline get the same one."""
        row = tuple(self._number(decide(self.policy, issuer, claims, signal)) for signal in SLOTS)
        return self._rows.setdefault(row, row)

    def _number(self, decision: Decision) -> int:
        # Rules and accounts live as long as the policy this book holds: their ids are stable.
        rule, account = decision.rule, decision.account
        key = (
            decision.allowed,
            decision.reason,
            0 if rule is None else id(rule),
            0 if account is None else id(account),
        )
        number = self._numbers.get(key)
        if number is None:
            number = self._numbers[key] = len(self._decisions)
            self._decisions.append(decision)
        return number

    def decision(self, numbers: tuple[int, ...], signal: str | None) -> Decision | None:
        """The decision numbered in ``numbers`` for ``signal``; None when the signal has no
        slot (or the identity carries no numbers): the caller decides it afresh."""
        slot = _SLOT_OF.get(signal)
        if slot is None or not numbers:
            return None
        return self._decisions[numbers[slot]]
