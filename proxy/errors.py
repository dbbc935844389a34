"""The one exception tree of tracegate.

Every error tracegate raises on purpose derives from :class:`TracegateError`::

    TracegateError
    ├── ConfigError            settings or policy that cannot be used; names file:line
    │   └── PolicyLoadError    one or more policy problems, each a PolicyProblem
    ├── AuthError              the request's credential is missing or bad   -> 401
    │   └── KeysUnavailable    the issuer's keys could not be had yet       -> 503
    ├── BodyError              the request body broke the limits           -> 413 / 400
    │   └── StampError         the body cannot be stamped (see stamp.py)   -> 400 / 413
    ├── UpstreamError          the upstream could not be reached in time   -> 502 / 504
    └── OutboxUnavailable      the outbox's database cannot take a write    -> 503

Each error that reaches a client carries a stable kebab-case ``reason`` that goes to the
audit log and the metrics. ``str()`` of an error never contains a token, a signature
secret or an access key: callers pass only names, claims and reasons into them.
"""

from __future__ import annotations

from dataclasses import dataclass


class TracegateError(Exception):
    """Root of every error tracegate raises on purpose."""


class ConfigError(TracegateError):
    """Configuration that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class PolicyProblem:
    """One thing wrong with a policy repository, pinned to a file and line (1-based)."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class PolicyLoadError(ConfigError):
    """A policy repository that failed to load; ``problems`` lists every error found."""

    def __init__(self, problems: list[PolicyProblem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.message))
        super().__init__("\n".join(str(p) for p in self.problems))


class AuthError(TracegateError):
    """The request carries no usable credential. ``reason`` is the stable code."""

    status = 401

    def __init__(self, reason: str, *, issuer: str | None = None) -> None:
        self.reason = reason
        self.issuer = issuer
        super().__init__(reason)


class KeysUnavailable(AuthError):
    """The token's issuer has not served usable keys yet; the client should retry."""

    status = 503


class BodyError(TracegateError):
    """The request body broke a limit (``status`` 413) or was cut off (400)."""

    def __init__(self, reason: str, status: int) -> None:
        self.reason = reason
        self.status = status
        super().__init__(reason)


class UpstreamError(TracegateError):
    """The upstream was unreachable (502) or too slow (504)."""

    def __init__(self, reason: str, status: int) -> None:
        self.reason = reason
        self.status = status
        super().__init__(reason)


class StampError(BodyError):
    """A body that cannot be stamped with verified attributes: unparseable (400), of a
    type or encoding tracegate cannot stamp (400), or too large once decompressed (413).
    Such a body is refused, never forwarded unstamped."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason, status)


class OutboxUnavailable(TracegateError):
    """The outbox's store could not be reached or could not commit: nothing was stored, and
    the webhook is answered 503 so that its sender retries. ``reason`` names the failure's
    class, never the connection string."""

    status = 503

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
