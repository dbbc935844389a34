"""Values from outside — request bodies, tokens, headers — on their way into tracegate.

Two rules, applied wherever such a value is parsed or written down:

* JSON is parsed without the non-standard constants Python's parser accepts by default
  (``NaN``, ``Infinity``, ``-Infinity``): a signed ``"exp": NaN`` compares false with
  every number and would never expire. Such a document is a ``ValueError``, like any
  other malformed JSON.
* Text that reaches a log line, an audit line or an answer is cut to a bound and its
  control characters escaped, so that no single request can fill a log or forge a line.
"""

from __future__ import annotations

import json
from typing import Any

#: The longest piece of outside text written into one log or audit field.
MAX_LOGGED_CHARS = 256
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


class NonFiniteNumber(ValueError):
    """The document holds ``NaN`` or ``±Infinity``: not JSON (RFC 8259 §6)."""


def _no_constant(name: str) -> Any:
    raise NonFiniteNumber(f"non-finite number {name} is not JSON")


def loads(data: str | bytes | bytearray) -> Any:
    """``json.loads`` that refuses NaN and ±Infinity. Raises ValueError (or RecursionError
    for absurd nesting; callers catch both)."""
    return json.loads(data, parse_constant=_no_constant)


def log_text(value: object, limit: int = MAX_LOGGED_CHARS) -> str:
    """``value`` as text fit for one log field: at most ``limit`` characters (a cut one
    ends with ``…``), control characters escaped as ``\\xNN``."""
    text = value if isinstance(value, str) else str(value)
    if not text.isprintable():
        text = text.translate(_CONTROL)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text
