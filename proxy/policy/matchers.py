"""Claim matchers, compiled once at load time.

A pattern is an exact string or a glob in which ``*`` stands for any run of characters,
``/`` included (``payments/*`` matches ``payments/api`` and ``payments/a/b``). No other
character is special. Claims compare as strings: YAML booleans are written ``true`` /
``false`` and numbers in decimal, as GitLab sends them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def claim_text(value: object) -> str | None:
    """A scalar claim as the string a pattern compares with; None for anything else."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int)):
        return str(value)
    return None


class Matcher:
    """One or more patterns; matches a claim if any pattern matches it (or, for a
    list-valued claim, any of its elements)."""

    __slots__ = ("_exact", "_regex", "patterns")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        self._exact = frozenset(p for p in self.patterns if "*" not in p)
        globs = [p for p in self.patterns if "*" in p]
        self._regex = (
            re.compile("|".join(f"(?:{'.*'.join(map(re.escape, g.split('*')))})" for g in globs), re.S)
            if globs
            else None
        )

    @property
    def matches_everything(self) -> bool:
        return any(p and set(p) == {"*"} for p in self.patterns)

    def match_text(self, text: str) -> bool:
        if text in self._exact:
            return True
        return self._regex is not None and self._regex.fullmatch(text) is not None

    def match(self, claim: object) -> bool:
        """A missing (None) or structured claim never matches."""
        if isinstance(claim, list):
            return any(self.match(item) for item in claim if not isinstance(item, list))
        text = claim_text(claim)
        return text is not None and self.match_text(text)

    def __repr__(self) -> str:
        return f"Matcher({list(self.patterns)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Matcher) and other.patterns == self.patterns

    def __hash__(self) -> int:
        return hash(self.patterns)
