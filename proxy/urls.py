"""The one rule for every URL tracegate fetches from or sends to.

https only, so that keys and tokens travel encrypted and the peer is authenticated; plain
http is allowed for loopback hosts alone (tests, the demo, a sidecar on the same host).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(value: str) -> str | None:
    """None if ``value`` is a usable base URL, else what is wrong with it and what to do."""
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return f"{value!r} is not a valid URL"
    if parts.scheme not in ("https", "http") or not host:
        return f"{value!r} must be an https:// URL with a host"
    if parts.scheme == "http" and not is_loopback(host):
        return f"{value!r} must use https (plain http only for loopback hosts)"
    if parts.username or parts.password or parts.query or parts.fragment:
        return f"{value!r} must not carry credentials, a query or a fragment"
    return None


def same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


def grpc_address(value: str) -> tuple[str, int, bool]:
    """``(host, port, tls)`` of a gRPC upstream written ``HOST:PORT`` or ``https://HOST[:PORT]``
    (TLS, verified) or ``http://HOST:PORT`` (plaintext). Raises ValueError saying what is wrong."""
    text = value.strip().rstrip("/")
    scheme = "https"
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme not in ("https", "http"):
            raise ValueError(f"{value!r}: use HOST:PORT, https://HOST[:PORT] or http://HOST:PORT (loopback)")
    try:
        parts = urlsplit("//" + text)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        raise ValueError(f"{value!r} is not HOST:PORT") from None
    if not host or parts.path or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{value!r} must be HOST:PORT with nothing else (no path, query or credentials)")
    if port is None:
        if scheme == "http":
            raise ValueError(f"{value!r}: http:// needs a port")
        port = 443
    if scheme == "http" and not is_loopback(host):
        raise ValueError(f"{value!r} must use TLS (plaintext http:// only for loopback hosts)")
    return host, port, scheme == "https"


def check_grpc_target(value: str) -> str | None:
    """None if ``value`` is a usable gRPC upstream, else what is wrong with it and what to do."""
    try:
        grpc_address(value)
    except ValueError as exc:
        return str(exc)
    return None
