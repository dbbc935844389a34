"""One JSON line per decision: the audit log.

Only names and claims that identify a pipeline are written — never a token, a signature,
an access key or a request body. Every text value (claims, and whatever a door adds: a
repository name from an unsigned webhook, a delivery id) is cut to
:data:`proxy.untrusted.MAX_LOGGED_CHARS` with control characters escaped, whichever code
path writes it, so that no request can fill the log or forge a line.

Lines are buffered and written in batches (at most ``flush_interval`` seconds, or 64 KiB,
apart) rather than one write per request: per-request writes through ``logging`` were
~15% of tracegate's CPU per forwarded request in the benchmark profile. The batch is
flushed on shutdown; a SIGKILL can lose at most the last ``flush_interval`` of lines.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

from proxy.untrusted import log_text

#: GitLab CI ID token claims that go into each audit line.
AUDITED_CLAIMS = ("project_path", "pipeline_id", "job_id", "ref", "user_login", "jti")
_MAX_BUFFER = 64 * 1024


def _field(value: Any) -> str | int | float | bool | None:
    """A value fit for an audit field: numbers and booleans as they are, text bounded,
    anything else (a list, an object from a claim) by its type name only."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    return log_text(value if isinstance(value, str) else type(value).__name__)


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class AuditLog:
    """Call it with the facts of one decision. ``write`` receives whole lines, batched."""

    def __init__(self, write: Callable[[str], object] = _stdout, *, flush_interval: float = 0.1) -> None:
        self._write = write
        self._interval = flush_interval
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def __call__(
        self,
        *,
        kind: str,
        decision: str,
        reason: str,
        issuer: str | None = None,
        claims: Mapping[str, Any] | None = None,
        service_account: str | None = None,
        rule: str | None = None,
        signal: str | None = None,
        bytes_in: int = 0,
        upstream_status: int | str | None = None,
        **extra: str | int | None,
    ) -> None:
        record: dict[str, Any] = {
            "event": kind,
            "decision": decision,
            "reason": reason,
            "issuer": issuer,
            "signal": signal,
            "service_account": service_account,
            "rule": rule,
            "bytes": bytes_in,
            "upstream_status": upstream_status,
        }
        claims = claims or {}
        for name in AUDITED_CLAIMS:
            record[name] = claims.get(name)
        record.update(extra)
        for name, value in record.items():
            if value is not None and not isinstance(value, (bool, int)):
                record[name] = _field(value)
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=True) + "\n"
        if self._interval <= 0:
            self._write(line)
            return
        self._lines.append(line)
        self._size += len(line)
        if self._size >= _MAX_BUFFER:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines:
            text = "".join(self._lines)
            self._lines.clear()
            self._size = 0
            self._write(text)
