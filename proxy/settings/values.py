"""How each setting's text becomes a value: one parser per kind of value, each raising
ValueError with what is allowed (``config.Settings.load`` names the setting and its source
around it). Pure functions of the text: no environment, no files."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from proxy.secrets import SecretRef
from proxy.urls import check_grpc_target, check_url


def host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT, for example 0.0.0.0:4318")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - a listener, configured on purpose


def listener_beside(value: str) -> tuple[str, int] | None:
    """``HOST:PORT``, ``off`` (None), or ``:PORT``: the host left empty for ``Settings.load``
    to fill with the ingest listener's, so that narrowing ``--listen`` to loopback narrows
    this listener too (it never listens wider than the ingest unless told to)."""
    text = value.strip()
    if text.lower() == "off":
        return None
    host, sep, port = text.rpartition(":")
    if sep and not host and port.isdigit() and 0 <= int(port) <= 65535:
        return "", int(port)
    try:
        return host_port(text)
    except ValueError:
        raise ValueError("expected HOST:PORT, :PORT (on TRACEGATE_LISTEN's host) or off") from None


def grpc_target(value: str) -> str:
    problem = check_grpc_target(value)
    if problem:
        raise ValueError(problem)
    return value.rstrip("/")


def url(value: str) -> str:
    problem = check_url(value)
    if problem:
        raise ValueError(problem)
    return value.rstrip("/")


def path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must start with /")
    return value


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        number = kind(value)
        if number <= 0:
            raise ValueError("must be greater than 0")
        return number

    return parse


def non_negative(value: str) -> float:
    number = float(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def names(value: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in value.split(",") if n.strip())


def optional_host_port(value: str) -> tuple[str, int] | None:
    return host_port(value) if value else None


def optional_path(value: str) -> str:
    return path(value).rstrip("/") if value else ""


#: The gateways whose check requests the authorization listener understands.
DIALECTS = ("nginx", "envoy", "traefik")


def dialect(value: str) -> str:
    if value and value not in DIALECTS:
        raise ValueError(f"expected one of {', '.join(DIALECTS)}")
    return value


def header_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9-]+", value) or value.lower() in ("authorization", "host", "content-length"):
        raise ValueError("expected an HTTP header name of letters, digits and dashes (not authorization/host)")
    return value.lower()


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = int(value)
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}")
        return number

    return parse


def secret_ref(value: str) -> SecretRef | None:
    """``env:NAME`` or ``file:/path`` — where a secret is, never the secret itself."""
    if not value:
        return None
    kind, sep, name = value.partition(":")
    if not sep or kind not in ("env", "file") or not name:
        raise ValueError("expected env:NAME or file:/path (a reference to the secret, not the secret)")
    return SecretRef("env" if kind == "env" else "file", name)
