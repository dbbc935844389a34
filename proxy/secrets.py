"""Secrets held in a masked type from the moment they are read.

Policies never hold a secret's value, only a reference to it: ``{env: NAME}``, ``{file: /path}``
or, kept in a secret store, ``{aws_secret: NAME-OR-ARN, key?: FIELD, region?: REGION}`` (AWS
Secrets Manager) and ``{vault: PATH, key: FIELD, mount?: MOUNT}`` (Vault's KV v2).
:func:`resolve` turns a reference into a :class:`Secret`, whose ``repr`` and ``str`` are masked
so that no log line, exception or metric can print it by accident. A store reference is read
through the :class:`SecretEnviron` it is resolved in (the runtime's, which reaches the stores:
proxy/settings/secret_stores.py); any other environment refuses it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


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


Kind = Literal["env", "file", "aws_secret", "vault"]
#: The kinds read over the network from a secret store rather than from this machine.
STORE_KINDS: tuple[Kind, ...] = ("aws_secret", "vault")


@dataclass(frozen=True)
class SecretRef:
    """Where a secret lives: an environment variable; a file (read whole, one trailing newline
    removed, as Docker and Kubernetes secrets are written); a secret of AWS Secrets Manager
    (its whole string, or the string field ``key`` of its JSON; ``region``: else the ARN's, else
    AWS_REGION); or the field ``key`` of a Vault KV v2 secret at ``name`` under ``mount``."""

    kind: Kind
    name: str
    key: str | None = None
    region: str | None = None
    mount: str | None = None

    @property
    def in_store(self) -> bool:
        return self.kind in STORE_KINDS

    def __str__(self) -> str:
        fields = (("key", self.key), ("region", self.region), ("mount", self.mount))
        more = "".join(f", {k}: {v}" for k, v in fields if v)
        return f"{{{self.kind}: {self.name}{more}}}"


class SecretUnavailable(Exception):
    """A reference that names nothing usable; the message names the reference, never a value."""


class SecretEnviron(Mapping[str, str]):
    """The environment secrets are resolved in: the process's variables, plus ``read_store``,
    which answers a store reference (blocking: a network read, or the value last read)."""

    def __init__(self, variables: Mapping[str, str], read_store: Callable[[SecretRef], Secret]) -> None:
        self._variables = variables
        self.read_store = read_store

    def __getitem__(self, name: str) -> str:
        return self._variables[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._variables)

    def __len__(self) -> int:
        return len(self._variables)


def resolve(ref: SecretRef, environ: Mapping[str, str]) -> Secret:
    """Read a secret now. Raises :class:`SecretUnavailable` if it is missing, empty or
    would not fit in an HTTP header (CR, LF or NUL in it)."""
    if ref.in_store:
        if not isinstance(environ, SecretEnviron):
            raise SecretUnavailable(f"{ref} is kept in a secret store, which only a running tracegate reads")
        return environ.read_store(ref)
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
    return checked(ref, value)


def checked(ref: SecretRef, value: str) -> Secret:
    """``value`` as a Secret, if it can be sent as a header: not empty, no CR, LF or NUL."""
    if not value:
        raise SecretUnavailable(f"{ref} is empty")
    if any(c in value for c in "\r\n\0"):
        raise SecretUnavailable(f"{ref} holds a line break or NUL; it cannot be sent as a header")
    return Secret(value)


#: What a reference may be, for the messages that refuse one.
SHAPES = "{env: NAME} or {file: /path}, or in a store {aws_secret: NAME-OR-ARN, key?, region?} or {vault: PATH, key}"
_STORE_KEYS: dict[str, tuple[str, ...]] = {"aws_secret": ("key", "region"), "vault": ("key", "mount")}
_AWS_NAME = re.compile(r"[A-Za-z0-9/_+=.@!-]{1,512}")
_AWS_ARN = re.compile(r"arn:aws[a-z-]*:secretsmanager:([a-z0-9-]+):\d{12}:secret:[A-Za-z0-9/_+=.@!-]{1,512}")
_AWS_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d{1,2}")
_VAULT_SEGMENT = re.compile(r"[A-Za-z0-9_@+=:,~-][A-Za-z0-9_.@+=:,~-]*")


def parse_ref(value: Any, what: str) -> SecretRef | str:
    """A secret reference as a policy writes it, or the message saying why ``value`` is not one
    (never echoing a value: an inline string may be the secret itself)."""
    if isinstance(value, str):
        return f"{what} is written inline; secrets are references: {{env: NAME}} or {{file: /path}}"
    kinds = [k for k in ("env", "file", *STORE_KINDS) if isinstance(value, Mapping) and k in value]
    if not isinstance(value, Mapping) or len(kinds) != 1 or (kinds[0] in ("env", "file") and len(value) != 1):
        return f"{what} must be exactly one of {SHAPES}"
    kind: Kind = kinds[0]
    name = value[kind]
    if not isinstance(name, str) or not name.strip():
        return f"{what}: {{{kind}: …}} needs a non-empty name"
    if kind == "env":
        return SecretRef("env", name)
    if kind == "file":
        return SecretRef("file", name) if name.startswith("/") else f"{what}: {{file: {name}}} must be an absolute path"
    problem = _store_problem(kind, name, value)
    if problem:
        return f"{what} must be exactly one of {SHAPES}: {problem}"
    fields = {k: value[k] for k in _STORE_KEYS[kind] if k in value}
    if kind == "vault":
        return SecretRef("vault", name.strip("/"), fields["key"], mount=fields.get("mount", "secret").strip("/"))
    arn = _AWS_ARN.fullmatch(name)
    return SecretRef("aws_secret", name, fields.get("key"), fields.get("region") or (arn.group(1) if arn else None))


def _store_problem(kind: Kind, name: str, value: Mapping[str, Any]) -> str | None:
    allowed = _STORE_KEYS[kind]
    extra = next((k for k in value if k != kind and k not in allowed), None)
    if extra is not None:
        return f"unknown key {str(extra)[:40]!r} in {{{kind}: …}}; allowed: {', '.join(allowed)}"
    for field in allowed:
        if field in value and (not isinstance(value[field], str) or not value[field].strip()):
            return f"{{{kind}: …}}'s {field} must be a non-empty string"
    if kind == "vault":
        if "key" not in value:
            return "{vault: …} needs key: FIELD (the field of the KV v2 secret to send)"
        for part, text in (("path", name), ("mount", value.get("mount", "secret"))):
            segments = text.strip("/").split("/")
            if not all(_VAULT_SEGMENT.fullmatch(s) for s in segments):
                return f"{{vault: …}}'s {part} must be segments of letters, digits and _.@+=:,~- joined by /"
        return None
    arn = _AWS_ARN.fullmatch(name)
    if name.startswith("arn:") and arn is None:
        return "{aws_secret: arn:…} must be a Secrets Manager ARN: arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME"
    if arn is None and not _AWS_NAME.fullmatch(name):
        return "{aws_secret: …} must be a secret's name (letters, digits and /_+=.@!-, at most 512) or its ARN"
    region = value.get("region")
    if region is not None and not _AWS_REGION.fullmatch(region):
        return f"region {region[:40]!r} is not an AWS region name (such as eu-west-1)"
    if region is not None and arn is not None and region != arn.group(1):
        return f"region {region} contradicts the ARN's region {arn.group(1)}; remove region"
    return None
