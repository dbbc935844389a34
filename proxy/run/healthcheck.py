"""``python -m proxy.run.healthcheck``: the container's HEALTHCHECK. Asks ``/healthz`` on the
admin listener that ``TRACEGATE_ADMIN_LISTEN`` names (a wildcard address is asked on
loopback), so the probe follows the setting instead of a hard-coded port. Exit 0 on a 200,
1 otherwise: refused, no connection or no answer within 2 s (each), any other status, a
malformed setting.

Standard library only, on purpose: it runs every 15 s for the life of the container, so
importing ``proxy.settings`` (dataclasses, typing, the TLS and secrets modules) and
``urllib.request`` (its proxy, cookie and auth handlers, tempfile, email) was start-up paid
on every probe. It reads the variable by the rules of ``host_port`` in
``proxy.settings.values``; ``tests/test_container.py`` holds the two to the same answers and
the same default, and fails if the probe imports anything outside the standard library. ``http.client``
also means the probe never goes through an ``HTTP_PROXY`` set in the container's
environment, as ``urllib`` would have (``no_proxy`` aside), and treats a redirect as
unhealthy rather than following it.

Start-up, measured with ``python -X importtime -m proxy.run.healthcheck`` against a local
HTTP server (CPython 3.11 on a shared 2-core machine, 30 runs each, medians), with tracegate
installed from its wheel as in the image: the imports from ``proxy`` on took 63 ms over 110
modules before (``proxy.settings`` and ``urllib.request``) and 34 ms over 61 modules now; the
whole probe process, 94 ms before and 61 ms now.
"""

from __future__ import annotations

import http.client
import os
import sys
from collections.abc import Mapping

ENV = "TRACEGATE_ADMIN_LISTEN"
DEFAULT = "127.0.0.1:9464"  # proxy.settings.config's default; a test keeps the two equal
TIMEOUT = 2.0  # seconds, for the connect and for each read; the HEALTHCHECK allows 3
_WILDCARDS = {"", "0.0.0.0", "::"}  # noqa: S104 - names of the wildcard address, not a bind


def admin_address(environ: Mapping[str, str]) -> tuple[str, int]:
    """Where to ask: ``host_port``'s parse of the setting, a wildcard host turned into
    loopback. ``ValueError`` for a value that is not ``HOST:PORT``."""
    host, sep, port = environ.get(ENV, DEFAULT).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{ENV}: expected HOST:PORT, for example 0.0.0.0:9464")
    host = host.strip("[]")
    return ("127.0.0.1" if host in _WILDCARDS else host), int(port)


def healthz_url(environ: Mapping[str, str]) -> str:
    host, port = admin_address(environ)
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/healthz"


def main(environ: Mapping[str, str] = os.environ) -> int:
    try:
        host, port = admin_address(environ)
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        try:
            conn.request("GET", "/healthz")
            return 0 if conn.getresponse().status == 200 else 1
        finally:
            conn.close()
    except (OSError, ValueError, http.client.HTTPException):
        return 1


if __name__ == "__main__":
    sys.exit(main())
