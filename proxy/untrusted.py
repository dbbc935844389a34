"""Values from outside — request bodies, tokens, headers — on their way into tracegate.

Two rules, applied wherever such a value is parsed or written down:

* JSON is parsed without the non-standard constants Python's parser accepts by default
  (``NaN``, ``Infinity``, ``-Infinity``): a signed ``"exp": NaN`` compares false with
  every number and would never expire. Such a document is a ``ValueError``, like any
  other malformed JSON — and so is one whose ``\ud800``-style escapes leave a lone
  surrogate, which is no character: it cannot be encoded, stored or sent on.
* Text that reaches a log line, an audit line or an answer is cut to a bound and its
  control characters escaped, so that no single request can fill a log or forge a line.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: The longest piece of outside text written into one log or audit field.
MAX_LOGGED_CHARS = 256
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


class NonFiniteNumber(ValueError):
    """The document holds ``NaN`` or ``±Infinity``: not JSON (RFC 8259 §6)."""


def _no_constant(name: str) -> Any:
    raise NonFiniteNumber(f"non-finite number {name} is not JSON")


def _escape(char: str) -> str:
    code = ord(char)
    return _CONTROL.get(code) or (f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")


def decode(data: bytes | bytearray) -> str:
    """JSON bytes as the text ``json.loads`` would parse (its encoding detection,
    ``surrogatepass``). Raises ValueError (UnicodeDecodeError)."""
    return bytes(data).decode(json.detect_encoding(data), "surrogatepass")


def loads(data: str | bytes | bytearray) -> Any:
    """``json.loads`` that refuses NaN, ±Infinity and lone surrogates. Raises ValueError
    (or RecursionError for absurd nesting; callers catch both). Bytes are decoded once, as
    ``json.loads`` would (:func:`decode`), and the text is then both parsed and searched."""
    text = data if isinstance(data, str) else decode(data)
    value = json.loads(text, parse_constant=_no_constant)
    if _MAY_HOLD_SURROGATE.search(text):  # rare: only then walk the document
        _check_text(value)
    return value


#: A ``\uD800``–``\uDFFF`` escape, or a surrogate written raw (UTF-8 bytes ED A0–BF xx).
_MAY_HOLD_SURROGATE = re.compile("\\\\u[dD][89a-fA-F]|[\ud800-\udfff]")


def _check_text(value: Any) -> None:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a string holds a lone surrogate") from None
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def log_text(value: object, limit: int = MAX_LOGGED_CHARS) -> str:
    """``value`` as text fit for one log field: at most ``limit`` characters (a cut one
    ends with ``…``), control characters escaped as ``\\xNN``."""
    text = value if isinstance(value, str) else str(value)
    if not text.isprintable():  # C0/C1 controls, bidi overrides, line separators…
        text = "".join(c if c.isprintable() else _escape(c) for c in text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text
