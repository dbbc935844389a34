"""One JSON line per decision, on the ``tracegate.audit`` logger.

Only names and claims that identify a pipeline are written — never a token, a signature,
an access key or a request body. Claims are passed through :func:`_claim` so that a
hostile token cannot fill the log with a megabyte of nested JSON.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("tracegate.audit")

#: GitLab CI ID token claims that go into each audit line.
AUDITED_CLAIMS = ("project_path", "pipeline_id", "job_id", "ref", "user_login", "jti")
_MAX_CLAIM_CHARS = 256


def _claim(value: Any) -> str | int | bool | None:
    if value is None or isinstance(value, (bool, int)):
        return value
    text = value if isinstance(value, str) else type(value).__name__
    return text[:_MAX_CLAIM_CHARS]


def audit(
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
        record[name] = _claim(claims.get(name))
    record.update(extra)
    log.info(json.dumps(record, separators=(",", ":"), ensure_ascii=True))
