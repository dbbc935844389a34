"""Logging set-up: operational logs as JSON lines on stderr (audit lines go to stdout
through :mod:`proxy.audit`, not through logging).

aiohttp's own loggers are kept, but exception details from them are cut to the exception
type: a malformed request's message can quote raw header bytes, and those may hold a token.
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
        if record.name.startswith("aiohttp"):
            data["msg"] = record.msg if isinstance(record.msg, str) and not record.args else "aiohttp event"
            if record.exc_info and record.exc_info[0] is not None:
                data["error"] = record.exc_info[0].__name__
        else:
            data["msg"] = record.getMessage()
            if record.exc_info and record.exc_info[0] is not None:
                data["error"] = record.exc_info[0].__name__
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        return json.dumps(data, default=str)


def configure(level: str = "INFO") -> None:
    root = logging.getLogger()
    root.handlers.clear()
    errors = logging.StreamHandler(sys.stderr)
    errors.setFormatter(JsonFormatter())
    root.addHandler(errors)
    root.setLevel(level)
