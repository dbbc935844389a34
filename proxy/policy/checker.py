"""Collecting policy problems while a loader walks one file: each problem pinned to the
file and line it was written at, every check's wording in one place. Used by the loader
and by each section's parser (``webhooks.py``, ``stamps.py``), which import it and nothing
of the loader: the loader imports the sections, never the other way round."""

from __future__ import annotations

from typing import Any

from proxy.errors import PolicyProblem
from proxy.policy.matchers import claim_text
from proxy.policy.model import Where
from proxy.policy.source import LDict, LList
from proxy.secrets import SecretRef, parse_ref
from proxy.urls import check_grpc_target, check_url


class Checker:
    """Collects problems while the loader walks one file. Shared with the webhook section."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[PolicyProblem] = []

    def add(self, line: int, message: str) -> None:
        self.problems.append(PolicyProblem(self.file, line, message))

    def where(self, line: int) -> Where:
        return Where(self.file, line)

    def mapping(self, value: Any, line: int, what: str) -> LDict | None:
        if isinstance(value, LDict):
            return value
        self.add(line, f"{what} must be a mapping (key: value), not {_kind(value)}")
        return None

    def named_entries(self, section: Any, line: int, kind: str, not_a_list: str) -> list[tuple[LDict, str, str]]:
        """The entries of a list section (``rules:``, ``webhooks:``), each a mapping with its
        name (``<kind at line N>`` when it has none) and the words messages call it by
        (``kind 'name'``). A section that is not a list (``not_a_list`` says so) or an item
        that is not a mapping is a problem; an absent section has no entries."""
        if section is None:
            return []
        if not isinstance(section, LList):
            self.add(line, not_a_list)
            return []
        out = []
        for raw, item_line in zip(section, section.item_lines, strict=True):
            entry = self.mapping(raw, item_line, f"a {kind}")
            if entry is not None:
                name = self.string(entry, "name", kind) or f"<{kind} at line {item_line}>"
                out.append((entry, name, f"{kind} {name!r}"))
        return out

    def keys(
        self, entry: LDict, allowed: tuple[str, ...], required: tuple[str, ...], what: str, line: int | None = None
    ) -> None:
        for key in entry:
            if key not in allowed:
                self.add(entry.line_of(key), f"unknown key {key!r} in {what}; allowed: {', '.join(allowed)}")
        for key in required:
            if key not in entry:
                self.add(line or entry.line, f"{what} is missing {key!r}")

    def string(self, entry: LDict, key: str, what: str) -> str | None:
        value = entry.get(key)
        if value is None:
            return None
        if isinstance(value, str) and value:
            return value
        self.add(entry.line_of(key), f"{what}.{key} must be a non-empty string, not {_kind(value)}")
        return None

    def strings(self, entry: LDict, key: str, what: str, *, scalars: bool = False) -> tuple[str, ...] | None:
        """A string or a list of strings; with ``scalars``, booleans and numbers become
        their claim text (``true``, ``42``)."""
        value = entry.get(key)
        if value is None:
            return None
        items = list(value) if isinstance(value, list) else [value]
        out: list[str] = []
        for item in items:
            text = claim_text(item) if scalars else item if isinstance(item, str) else None
            if not text:
                self.add(entry.line_of(key), f"{what}.{key} must hold non-empty strings, not {_kind(item)}")
                return None
            out.append(text)
        if not out:
            self.add(entry.line_of(key), f"{what}.{key} must not be empty")
            return None
        return tuple(out)

    def secret_ref(self, value: Any, line: int, what: str) -> SecretRef | None:
        ref = parse_ref(value, what)  # its messages never echo the value: it may be the secret itself
        if isinstance(ref, str):
            self.add(line, ref)
            return None
        return ref

    def url(self, entry: LDict, key: str, what: str) -> str | None:
        value = self.string(entry, key, what)
        if value is None:
            return None
        problem = check_url(value)
        if problem:
            self.add(entry.line_of(key), f"{what}.{key}: {problem}")
            return None
        return value

    def grpc_target(self, entry: LDict, key: str, what: str) -> str | None:
        value = self.string(entry, key, what)
        if value is None:
            return None
        problem = check_grpc_target(value)
        if problem:
            self.add(entry.line_of(key), f"{what}.{key}: {problem}")
            return None
        return value


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {LDict: "a mapping", LList: "a list", bool: "a boolean"}.get(type(value), type(value).__name__)
