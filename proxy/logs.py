"""Logging set-up: operational logs as JSON lines on stderr (audit lines go to stdout
through :mod:`proxy.audit`, not through logging).

aiohttp's own loggers are kept, but :class:`RedactAiohttp` cuts their records to the
message and the exception type: a malformed request's error can quote raw header bytes.
Our JSON formatter never prints tracebacks either, only the exception's type.
aiohttp's access log is off (it would print query strings); the audit line replaces it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        data["msg"] = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            data["error"] = record.exc_info[0].__name__
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        return json.dumps(data, default=str)


class RedactAiohttp(logging.Filter):
    """Strips exception details and arguments from aiohttp's own log records: a malformed
    request's error can quote raw header bytes, and those may hold a token. Installed on
    aiohttp's loggers (not a handler) so it applies to every handler, tests' included."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None:
            record.msg = f"{record.msg} ({record.exc_info[0].__name__})"
        elif record.args:
            record.msg = str(record.msg).split("%", 1)[0].strip() or "aiohttp event"
        record.args = None
        record.exc_info = None
        record.exc_text = None
        return True


AIOHTTP_LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal", "aiohttp.client")


def redact_aiohttp() -> None:
    for name in AIOHTTP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactAiohttp) for f in logger.filters):
            logger.addFilter(RedactAiohttp())


def configure(level: str = "INFO") -> None:
    root = logging.getLogger()
    root.handlers.clear()
    errors = logging.StreamHandler(sys.stderr)
    errors.setFormatter(JsonFormatter())
    root.addHandler(errors)
    root.setLevel(level)
    redact_aiohttp()
