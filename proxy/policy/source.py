"""Reading policy YAML with the line of every key, so that errors can name file:line.

Safe loading only. Aliases are refused (a policy is short; aliases are how "billion laughs"
documents grow without bound), and so are duplicate keys, which plain YAML silently drops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from proxy.errors import PolicyProblem

#: A policy file larger than this is refused before parsing (bytes).
MAX_FILE_BYTES = 1 << 20


class LDict(dict[str, Any]):
    """A YAML mapping that remembers its own line and the line of each key (1-based)."""

    line: int = 0
    key_lines: dict[str, int]

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class LList(list[Any]):
    """A YAML sequence that remembers its own line and the line of each item."""

    line: int = 0
    item_lines: list[int]


class _DocumentError(Exception):
    def __init__(self, line: int, message: str) -> None:
        self.line = line
        self.message = message


class _Loader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise _DocumentError(
                event.start_mark.line + 1,
                "YAML aliases (*name) are not supported in policy files; write the value out",
            )
        return super().compose_node(parent, index)


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> LDict:
    loader.flatten_mapping(node)
    result = LDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise _DocumentError(line, f"keys must be strings, not {type(key).__name__}")
        if key in result:
            raise _DocumentError(line, f"duplicate key {key!r} (first at line {result.key_lines[key]}); keep one")
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> LList:
    result = LList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def read_document(path: Path, shown_as: str) -> tuple[Any, list[PolicyProblem]]:
    """Parse one file. Returns (document or None, problems); never raises for bad content."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, [PolicyProblem(shown_as, 1, f"cannot read the file ({exc.strerror})")]
    if len(raw) > MAX_FILE_BYTES:
        return None, [PolicyProblem(shown_as, 1, f"file is over {MAX_FILE_BYTES} bytes; split it")]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [PolicyProblem(shown_as, 1, f"not UTF-8 (byte {exc.start}); save it as UTF-8")]
    try:
        docs = list(yaml.load_all(text, Loader=_Loader))
    except _DocumentError as exc:
        return None, [PolicyProblem(shown_as, exc.line, exc.message)]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        what = exc.problem or exc.context or "invalid YAML"
        return None, [PolicyProblem(shown_as, line, f"invalid YAML: {what}; fix the syntax")]
    except (yaml.YAMLError, RecursionError, ValueError, OverflowError) as exc:
        return None, [PolicyProblem(shown_as, 1, f"invalid YAML ({type(exc).__name__}); fix the syntax")]
    docs = [d for d in docs if d is not None]
    if len(docs) > 1:
        return None, [PolicyProblem(shown_as, 1, "one YAML document per file; remove the '---' separators")]
    return (docs[0] if docs else None), []
