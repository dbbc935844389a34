"""The state directory that ``tracegate dev`` shares with ``tracegate dev token``.

It holds ``state.json`` (the dev issuer's URL, key id, audience, token lifetime,
addresses, and the dev process's pid) and ``signing-key.pem`` (the issuer's RSA key),
both mode 0600 in a 0700 directory, written when ``dev`` is ready and removed when it
stops. ``dev token`` signs with that key, so the running issuer (which serves the public
half) vouches for the token; it refuses when the pid that wrote the state is gone.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULT_STATE = ".tracegate-dev"
DEFAULT_TTL = 3600
AUDIENCE = "tracegate"
#: The default dev token's project id; the dev rule allows it (as the starter policy would).
DEV_PROJECT_ID = "4242"


def parse_claims(items: list[str]) -> dict[str, str | None]:
    """``NAME=VALUE`` pairs; an empty VALUE means "remove this claim" (None)."""
    out: dict[str, str | None] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--claim {item!r}: expected NAME=VALUE, for example project_path=group/project")
        out[name] = value if value else None
    return out


def dev_claims(issuer: str, overrides: Mapping[str, str | None], ttl: int) -> dict[str, Any]:
    """GitLab-shaped claims for the dev issuer, with ``overrides`` applied and the claims
    GitLab derives from them kept consistent (namespace_path, sub, ref_path)."""
    from proxy.dev.standins import gitlab_claims

    now = int(time.time())
    claims = gitlab_claims(issuer, AUDIENCE, project_id=DEV_PROJECT_ID, iat=now, nbf=now - 5, exp=now + ttl)
    given = dict(overrides)
    if "project_path" in given and "namespace_path" not in given and given["project_path"]:
        given["namespace_path"] = str(given["project_path"]).rpartition("/")[0] or None
    claims.update(given)
    if "ref_path" not in given and ("ref" in given or "ref_type" in given):
        prefix = "refs/tags/" if claims.get("ref_type") == "tag" else "refs/heads/"
        claims["ref_path"] = f"{prefix}{claims.get('ref', '')}"
    if "sub" not in given:
        claims["sub"] = (
            f"project_path:{claims.get('project_path')}:ref_type:{claims.get('ref_type')}:ref:{claims.get('ref')}"
        )
    return {k: v for k, v in claims.items() if v is not None}


def mint(state: Path, overrides: Mapping[str, str | None], ttl: int | None) -> str:
    """A token for the issuer of the ``tracegate dev`` whose state directory is ``state``."""
    from proxy.dev.standins import mint_with_key

    info = read_state(state)
    try:
        key = (state / "signing-key.pem").read_bytes()
    except OSError:
        raise ValueError(f"{state}/signing-key.pem: not readable; is `tracegate dev` running?") from None
    claims = dev_claims(info["issuer"], overrides, ttl or info.get("ttl", DEFAULT_TTL))
    return mint_with_key(key, info["kid"], claims)


def read_state(state: Path) -> dict[str, Any]:
    """The running dev process's ``state.json``. Raises ValueError (with what to do)."""
    try:
        info = json.loads((state / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ValueError(
            f"{state}/state.json: no running `tracegate dev` here; start one, or pass --state DIR"
        ) from None
    if not isinstance(info, dict) or not _alive(info.get("pid")):
        raise ValueError(f"{state}: the `tracegate dev` that wrote it is gone; start it again")
    return info


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare(state: Path) -> None:
    """Create the state directory (0700) and refuse one a live dev process is using."""
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    if state.is_symlink() or state.stat().st_uid != os.getuid():
        raise ValueError(f"{state}: not a directory of yours; pass --state DIR")
    state.chmod(0o700)
    try:
        info = read_state(state)
    except ValueError:
        return  # nobody is using it
    raise ValueError(f"{state}: another `tracegate dev` (pid {info['pid']}) uses it; stop it or pass --state DIR")


def write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
