"""Logging set-up: operational logs as JSON lines on stderr (audit lines go to stdout
through :mod:`proxy.observe.audit`, not through logging).

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

from proxy.untrusted import log_text

#: The longest log message written (a message quotes outside text only through log_text).
MAX_MESSAGE_CHARS = 1024
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        data["msg"] = log_text(record.getMessage(), MAX_MESSAGE_CHARS)
        if record.exc_info and record.exc_info[0] is not None:
            data["error"] = record.exc_info[0].__name__
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value if value is None or isinstance(value, (bool, int, float)) else log_text(value)
        return json.dumps(data)


class RedactAiohttp(logging.Filter):
    """Strips exception details and arguments from aiohttp's own log records: a malformed
    request's error can quote raw header bytes, and those may hold a token. Installed on
    aiohttp's loggers (not a handler) so it applies to every handler, tests' included."""

    def filter(self, record: logging.LogRecord) -> bool:
        # The format without its arguments: cut at the first placeholder, so that no
        # literal ``%s`` is left in the message (the arguments are what we drop).
        message = str(record.msg).split("%", 1)[0].strip() if record.args else str(record.msg)
        message = message.removesuffix(" from") or "aiohttp event"
        if record.exc_info and record.exc_info[0] is not None:
            message = f"{message} ({record.exc_info[0].__name__})"
        record.msg = message
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
