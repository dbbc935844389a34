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
    list-valued claim, any of its elements). ``case_insensitive`` compares casefolded
    text (``when: {project_path: {match: "payments/*", case: insensitive}}``): GitLab and
    GitHub resolve paths without regard to case, so a deny rule should too."""

    __slots__ = ("_exact", "_regex", "case_insensitive", "patterns")

    def __init__(self, patterns: Iterable[str], *, case_insensitive: bool = False) -> None:
        self.patterns = tuple(patterns)
        self.case_insensitive = case_insensitive
        folded = tuple(p.casefold() for p in self.patterns) if case_insensitive else self.patterns
        self._exact = frozenset(p for p in folded if "*" not in p)
        globs = [p for p in folded if "*" in p]
        self._regex = (
            re.compile("|".join(f"(?:{'.*'.join(map(re.escape, g.split('*')))})" for g in globs), re.S)
            if globs
            else None
        )

    @property
    def matches_everything(self) -> bool:
        return any(p and set(p) == {"*"} for p in self.patterns)

    def match_text(self, text: str) -> bool:
        if self.case_insensitive:
            text = text.casefold()
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
        case = ", case_insensitive=True" if self.case_insensitive else ""
        return f"Matcher({list(self.patterns)!r}{case})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Matcher)
            and other.patterns == self.patterns
            and other.case_insensitive == self.case_insensitive
        )

    def __hash__(self) -> int:
        return hash((self.patterns, self.case_insensitive))
