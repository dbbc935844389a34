"""``python -m proxy.run.healthcheck``: the container's HEALTHCHECK. Asks ``/healthz`` on the
admin listener that ``TRACEGATE_ADMIN_LISTEN`` names (a wildcard address is asked on
loopback), so the probe follows the setting instead of a hard-coded port. Exit 0 healthy,
1 not. Standard library only: it runs every few seconds and must start fast."""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Mapping

from proxy.settings.config import OPTIONS
from proxy.settings.values import host_port

_WILDCARDS = {"", "0.0.0.0", "::"}  # noqa: S104 - names of the wildcard address, not a bind


def healthz_url(environ: Mapping[str, str]) -> str:
    default = next(o.default for o in OPTIONS if o.field == "admin_listen")
    host, port = host_port(environ.get("TRACEGATE_ADMIN_LISTEN", default))
    host = "127.0.0.1" if host in _WILDCARDS else host
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/healthz"


def main() -> int:
    try:
        with urllib.request.urlopen(healthz_url(os.environ), timeout=2) as resp:  # noqa: S310 - http to ourselves
            return 0 if resp.status == 200 else 1
    except (OSError, ValueError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
