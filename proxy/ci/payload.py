"""Reading a webhook's JSON: lookups that answer None for a missing or mistyped value
instead of raising, so no payload shape can turn into an unhandled error. Shared by every
forge's event reader (Gitea pushes, Gitea Actions runs, GitLab pipelines and jobs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Skip:
    """An authentic event that draws nothing; ``reason`` goes to the answer and the audit."""

    reason: str


def get(node: Any, *path: str) -> Any:
    """``node[path[0]][path[1]]…``, or None where a step is missing or not an object."""
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def text(value: Any, limit: int | None = 256) -> str | None:
    """A non-empty string cut to ``limit`` characters (None: whole), else None."""
    if not isinstance(value, str) or not value:
        return None
    return value if limit is None else value[:limit]


def positive_id(value: Any) -> str | None:
    """A positive integer id as its decimal text (forges send numbers; claims carry them as
    strings), else None. Booleans are not ids, and neither is anything past int64 (OTLP
    attributes are int64: such a value would make the export one the upstream refuses)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isdecimal() and len(value) <= 20:
        value = int(value)
    if isinstance(value, int) and 0 < value <= MAX_ID:
        return str(value)
    return None


#: The largest id an OTLP int64 attribute holds.
MAX_ID = (1 << 63) - 1
