"""Which request headers travel upstream, and which answer headers travel back.

An allowlist, built once: the upstream never sees a header tracegate did not choose to
send. The client's ``Accept-Encoding`` is forwarded, or ``identity`` when it sent none, so
the upstream never compresses an answer for a client that did not ask (the HTTP client
underneath would otherwise offer its own). Everything else the client sent —
Authorization, Proxy-Authorization, every spelling
of lightstep-access-token, Cookie, Forwarded, X-Forwarded-*, X-Real-IP, hop-by-hop headers
(Connection and the headers it names, Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade)
and any name with ``_`` (which some servers fold into ``-``) — is dropped. The upstream
request then carries the headers of the account's backend profile — for Lightstep exactly
one ``lightstep-access-token``, the service account's.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from functools import lru_cache

from multidict import CIMultiDict, CIMultiDictProxy, istr

from proxy.backends.profiles import Route

#: End-to-end headers an OTLP exporter sends that the upstream needs. Lower case.
FORWARDED = frozenset({"content-type", "content-encoding", "content-length", "user-agent", "accept", "accept-encoding"})
#: Upstream answer headers relayed to the client.
RELAYED = ("Content-Type", "Content-Encoding", "Retry-After")
#: Names that may never be forwarded, even when configured as extra headers.
NEVER = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "lightstep-access-token",
        "cookie",
        "set-cookie",
        "forwarded",
        "x-real-ip",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "expect",
    }
)

#: Names looked up per request, made case-insensitive once (a plain str is folded per lookup).
_CONNECTION = istr("Connection")
_ACCEPT_ENCODING = istr("Accept-Encoding")


@lru_cache(maxsize=256)
def _named(connection: str) -> frozenset[str]:
    """The header names one ``Connection`` value lists, lower case. Clients send the same
    few values (``keep-alive``, ``close``) on every request: split once."""
    return frozenset(name.strip().lower() for name in connection.split(","))


class HeaderPolicy:
    def __init__(self, extra: Iterable[str] = ()) -> None:
        extra_names = {name.strip().lower() for name in extra if name.strip()}
        bad = sorted(n for n in extra_names if n in NEVER or "_" in n or n.startswith("x-forwarded-"))
        if bad:
            raise ValueError(f"these headers can never be forwarded: {', '.join(bad)}")
        self.forwarded = FORWARDED | extra_names

    def upstream(self, incoming: CIMultiDictProxy[str], route: Route) -> CIMultiDict[str]:
        """The upstream request's headers: the allowed ones of the client's, then the route's
        (the account's credential and the backend's own headers, e.g. Lightstep's one
        ``lightstep-access-token``). A name the route sets is never taken from the client."""
        connection = incoming.getall(_CONNECTION, ())
        named_by_connection: Collection[str] = ()
        if connection:
            named_by_connection = (
                _named(connection[0]) if len(connection) == 1 else frozenset().union(*map(_named, connection))
            )
        forwarded = self.forwarded
        sets = route.names
        out: CIMultiDict[str] = CIMultiDict()
        add = out.add
        for name, value in incoming.items():
            lower = name.lower()
            if lower in forwarded and lower not in named_by_connection and lower not in sets:
                add(name, value)
        if _ACCEPT_ENCODING not in out:
            # The client asked for no compression; say so, or the HTTP client underneath
            # would offer its own (aiohttp: gzip, deflate) and the answer could come back in
            # an encoding this client never said it reads.
            add(_ACCEPT_ENCODING, "identity")
        for name, value in route.reveal():
            add(name, value)
        return out
