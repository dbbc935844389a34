"""Secrets held in a masked type from the moment they are read.

Policies never hold a secret's value, only a reference to it: ``{env: NAME}`` or
``{file: /path}``. :func:`resolve` turns a reference into a :class:`Secret`, whose ``repr``
and ``str`` are masked so that no log line, exception or metric can print it by accident.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


class Secret:
    """A secret value; only :meth:`reveal` gives it back, everything else masks it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself: call it only where the value leaves for its one destination."""
        return self._value

    def redacted(self) -> str:
        """A hint safe to show a person: the first 4 characters and the length."""
        return f"{self._value[:4]}…(redacted, {len(self._value)} chars)"

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class SecretRef:
    """Where a secret lives: an environment variable or a file (read whole, one trailing
    newline removed, as Docker and Kubernetes secrets are written)."""

    kind: Literal["env", "file"]
    name: str

    def __str__(self) -> str:
        return f"{{{self.kind}: {self.name}}}"


class SecretUnavailable(Exception):
    """A reference that names nothing usable; the message names the reference, never a value."""


def resolve(ref: SecretRef, environ: Mapping[str, str]) -> Secret:
    """Read a secret now. Raises :class:`SecretUnavailable` if it is missing, empty or
    would not fit in an HTTP header (CR, LF or NUL in it)."""
    if ref.kind == "env":
        value = environ.get(ref.name)
        if value is None:
            raise SecretUnavailable(f"environment variable {ref.name} is not set")
    else:
        try:
            value = Path(ref.name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SecretUnavailable(f"secret file {ref.name} cannot be read ({type(exc).__name__})") from None
        if value.endswith("\n"):
            value = value[:-1]
            if value.endswith("\r"):
                value = value[:-1]
    if not value:
        raise SecretUnavailable(f"{ref} is empty")
    if any(c in value for c in "\r\n\0"):
        raise SecretUnavailable(f"{ref} holds a line break or NUL; it cannot be sent as a header")
    return Secret(value)
