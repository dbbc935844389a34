"""One JSON line per decision: the audit log.

Only names and claims that identify a pipeline are written — never a token, a signature,
an access key or a request body. Every text value (claims, and whatever a door adds: a
repository name from an unsigned webhook, a delivery id) is cut to
:data:`proxy.untrusted.MAX_LOGGED_CHARS` with control characters escaped, whichever code
path writes it, so that no request can fill the log or forge a line.

The request path writes its lines through :meth:`AuditLog.decision`, which yields exactly
the line ``__call__`` would (same fields, order, bounds and escaping) without building a
dict and encoding it per request: the identity fields of a verified token are bounded,
escaped and encoded once per token (:meth:`AuditLog.identity_fields`), and the fields a
door's decision shares with its other requests (kind, outcome, reason, issuer, signal,
account, rule, transport) once per distinct combination.

The identity fields (:data:`AUDITED_CLAIMS`) have one name each whichever forge minted the
token; which claim fills each is :mod:`proxy.identity.forges`' business, not this module's
(docs/audit.md shows them side by side).

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

#: The identity fields of each audit line, in order: the same names whichever forge minted
#: the token (GitLab's claim names, which the line has always used). They are filled from
#: the claim each forge names the fact by (:func:`proxy.identity.forges.audit_identity`;
#: the table is in docs/audit.md): ``project_path`` is a GitHub token's ``repository``,
#: ``pipeline_id`` its ``run_id``, ``user_login`` its ``actor``, and so on.
AUDITED_CLAIMS = (
    "forge",
    "project_path",
    "project_id",
    "namespace_id",
    "pipeline_id",
    "job_id",
    "ref",
    "user_login",
    "user_id",
    "sub",
    "jti",
)
_MAX_BUFFER = 64 * 1024
#: Distinct (kind, outcome, reason, issuer, signal, account, rule, transport) heads kept by
#: :meth:`AuditLog.decision`; the values are policy names and reason codes, so a policy has
#: far fewer — the bound only caps what unexpected values could make it hold.
_MAX_HEADS = 4096


def _field(value: Any) -> str | int | float | bool | None:
    """A value fit for an audit field: numbers and booleans as they are, text bounded,
    anything else (a list, an object from a claim) by its type name only."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    return log_text(value if isinstance(value, str) else type(value).__name__)


def _json(value: Any) -> str:
    """One audit field's value as ``json.dumps(record)`` writes it inside the line."""
    if value is None:
        return "null"
    if type(value) is int:
        return int.__repr__(value)
    if not isinstance(value, (bool, int)):
        value = _field(value)
    return json.dumps(value, ensure_ascii=True)


def claims_fields(claims: Mapping[str, Any] | None) -> str:
    """The identity fields (:data:`AUDITED_CLAIMS`, by name) as the members of an audit
    line's JSON object (``"forge":"…","project_path":"…",…``), bounded and escaped as
    ``AuditLog`` writes them. A verified token's are made once and reused by each of its
    requests."""
    claims = claims or {}
    return ",".join(f'"{name}":{_json(claims.get(name))}' for name in AUDITED_CLAIMS)


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
        self._heads: dict[tuple[str | None, ...], tuple[str, str]] = {}

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
        self._emit(json.dumps(record, separators=(",", ":"), ensure_ascii=True) + "\n")

    def decision(
        self,
        kind: str,
        decision: str,
        reason: str,
        issuer: str | None,
        signal: str | None,
        service_account: str | None,
        rule: str | None,
        bytes_in: int,
        upstream_status: int | str | None,
        claims: str,
        transport: str,
    ) -> None:
        """The line ``self(kind=…, …, claims=…, transport=transport)`` writes, with the
        claims given as :func:`claims_fields` made of them."""
        key = (kind, decision, reason, issuer, signal, service_account, rule, transport)
        parts = self._heads.get(key)
        if parts is None:
            if len(self._heads) >= _MAX_HEADS:
                self._heads.clear()
            head = (
                f'{{"event":{_json(kind)},"decision":{_json(decision)},"reason":{_json(reason)},'
                f'"issuer":{_json(issuer)},"signal":{_json(signal)},"service_account":{_json(service_account)},'
                f'"rule":{_json(rule)},"bytes":'
            )
            parts = self._heads[key] = (head, f',"transport":{_json(transport)}}}\n')
        status = "null" if upstream_status is None else _json(upstream_status)
        self._emit(f'{parts[0]}{_json(bytes_in)},"upstream_status":{status},{claims}{parts[1]}')

    def _emit(self, line: str) -> None:
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
