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
