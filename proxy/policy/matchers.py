"""Claim matchers, compiled once at load time.

A pattern is an exact string or a glob in which ``*`` stands for any run of characters,
``/`` included (``payments/*`` matches ``payments/api`` and ``payments/a/b``). No other
character is special. Claims compare as strings: YAML booleans are written ``true`` /
``false`` and numbers in decimal, as GitLab sends them.

Globs are matched without a regular expression: the literal pieces between the stars are
found left to right with ``str.find``, which is linear in the text. (A regex with one
``.*`` per star backtracks: ``*-*-*-*-api`` against a 512-character name took 12 s, and
the names come from unsigned webhook bodies and from branch names a job's author picks.)
"""

from __future__ import annotations

from collections.abc import Iterable


def claim_text(value: object) -> str | None:
    """A scalar claim as the string a pattern compares with; None for anything else."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int)):
        return str(value)
    return None


def _glob_match(parts: tuple[str, ...], text: str) -> bool:
    """``text`` matches the glob whose literal pieces between stars are ``parts`` (at least
    two). The first piece is a prefix, the last a suffix, and each middle piece is taken at
    its leftmost place after the previous one — which is a correct match whenever any is."""
    first, last = parts[0], parts[-1]
    end = len(text) - len(last)
    if end < len(first) or not text.startswith(first) or not text.endswith(last):
        return False
    position = len(first)
    for piece in parts[1:-1]:
        found = text.find(piece, position, end)
        if found < 0:
            return False
        position = found + len(piece)
    return True


class Matcher:
    """One or more patterns; matches a claim if any pattern matches it (or, for a
    list-valued claim, any of its elements). ``case_insensitive`` compares casefolded
    text (``when: {project_path: {match: "payments/*", case: insensitive}}``): GitLab and
    GitHub resolve paths without regard to case, so a deny rule should too."""

    __slots__ = ("_exact", "_globs", "case_insensitive", "patterns")

    def __init__(self, patterns: Iterable[str], *, case_insensitive: bool = False) -> None:
        self.patterns = tuple(patterns)
        self.case_insensitive = case_insensitive
        folded = tuple(p.casefold() for p in self.patterns) if case_insensitive else self.patterns
        self._exact = frozenset(p for p in folded if "*" not in p)
        self._globs = tuple(tuple(p.split("*")) for p in folded if "*" in p)

    @property
    def matches_everything(self) -> bool:
        return any(p and set(p) == {"*"} for p in self.patterns)

    def match_text(self, text: str) -> bool:
        if self.case_insensitive:
            text = text.casefold()
        if text in self._exact:
            return True
        return any(_glob_match(parts, text) for parts in self._globs)

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
