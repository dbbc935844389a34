"""tracegate's own gRPC answers: which status a refusal or an HTTP upstream's answer becomes.

The OTLP specification's gRPC rules decide the codes: a token problem is
``UNAUTHENTICATED``; a policy denial ``PERMISSION_DENIED``; anything worth retrying
(issuer keys not yet fetched, an upstream that cannot be reached or throttles) is
``UNAVAILABLE``, with a ``google.rpc.RetryInfo`` in ``grpc-status-details-bin`` when a delay
is known; an upstream timeout is ``DEADLINE_EXCEEDED``; a message over the size limit is
``RESOURCE_EXHAUSTED`` *without* RetryInfo, which OTLP clients treat as final, while a
quota refusal (HTTP 429) is ``RESOURCE_EXHAUSTED`` *with* RetryInfo — OTLP's sign that it
may be retried after the delay — and gRPC's own ``grpc-retry-pushback-ms`` (milliseconds),
which a gRPC retry policy honours.

Messages are generic on purpose: the precise reason goes to the audit log and metrics.
``google.rpc.Status`` is written out by hand (four small messages) rather than pulling
protobuf into the request path.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from proxy.answers import _varint

#: Trailing metadata an upstream's error may carry that the client needs to retry right.
RETRY_TRAILERS = frozenset({"grpc-status-details-bin", "grpc-retry-pushback-ms"})
_RETRY_INFO_URL = b"type.googleapis.com/google.rpc.RetryInfo"

_REFUSALS: dict[int, tuple[grpc.StatusCode, str]] = {
    400: (grpc.StatusCode.INVALID_ARGUMENT, "bad request"),
    408: (grpc.StatusCode.DEADLINE_EXCEEDED, "request message arrived too slowly"),
    401: (grpc.StatusCode.UNAUTHENTICATED, "the request's token is missing or invalid"),
    403: (grpc.StatusCode.PERMISSION_DENIED, "this token may not send this telemetry"),
    413: (grpc.StatusCode.RESOURCE_EXHAUSTED, "request message too large"),
    415: (grpc.StatusCode.INVALID_ARGUMENT, "this encoding is not accepted by the account's backend"),
    429: (grpc.StatusCode.RESOURCE_EXHAUSTED, "quota exceeded; retry after the pushback delay"),
    502: (grpc.StatusCode.UNAVAILABLE, "upstream unavailable"),
    503: (grpc.StatusCode.UNAVAILABLE, "identity provider keys not yet available; retry"),
    504: (grpc.StatusCode.DEADLINE_EXCEEDED, "upstream timed out"),
}

#: An HTTP upstream's answer (bridge mode) as a gRPC status: gRPC's own HTTP mapping,
#: except that 400 is the client's bad data (not retryable) and 413 is too large.
_FROM_HTTP: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.UNIMPLEMENTED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.UNAVAILABLE,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.UNAVAILABLE,
}

Trailers = tuple[tuple[str, str | bytes], ...]


@dataclass(frozen=True)
class GrpcAnswer:
    """How a gRPC call ends: ``code`` with ``details`` and ``trailers``; ``body`` is the
    response message's bytes (only with OK). ``reason`` is the audit/metric reason code;
    ``outcome`` is ``allowed`` when the upstream answered, ``failed`` when it could not."""

    code: grpc.StatusCode
    details: str
    reason: str
    body: bytes = b""
    trailers: Trailers = ()
    outcome: str = "allowed"


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def status_details(code: grpc.StatusCode, message: str, retry_after: float | None) -> bytes:
    """``google.rpc.Status{code, message, details: [RetryInfo{retry_delay}]}``, serialized:
    the value of ``grpc-status-details-bin``."""
    text = message.encode()
    out = b"\x08" + _varint(code.value[0]) + _field(2, text)
    if retry_after is not None:
        seconds = max(0, int(retry_after))
        nanos = int((retry_after - int(retry_after)) * 1e9) if retry_after > 0 else 0
        duration = (b"\x08" + _varint(seconds) if seconds else b"") + (b"\x10" + _varint(nanos) if nanos else b"")
        retry_info = _field(1, duration)
        out += _field(3, _field(1, _RETRY_INFO_URL) + _field(2, retry_info))
    return out


def failure(
    code: grpc.StatusCode, message: str, reason: str, retry_after: float | None = None, *, outcome: str = "allowed"
) -> GrpcAnswer:
    trailers: Trailers = ()
    if retry_after is not None:
        trailers = (("grpc-status-details-bin", status_details(code, message, retry_after)),)
    return GrpcAnswer(code, message, reason, trailers=trailers, outcome=outcome)


def refusal(status: int, reason: str, retry_after: float | None = None) -> GrpcAnswer:
    """A refusal by admission or a failure tracegate saw (HTTP-style ``status``) as gRPC."""
    code, message = _REFUSALS[status]
    if status == 429 and retry_after is not None:  # a quota: retryable, after the delay
        answer = failure(code, message, reason, retry_after, outcome="failed")
        pushback = ("grpc-retry-pushback-ms", str(max(0, round(retry_after * 1000))))
        return GrpcAnswer(code, message, reason, trailers=(*answer.trailers, pushback), outcome="failed")
    delay = retry_after if code is grpc.StatusCode.UNAVAILABLE else None
    return failure(code, message, reason, delay, outcome="failed")


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After given in seconds; an HTTP date or garbage gives None (no RetryInfo)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(min(int(value.strip()), 3600))


def from_http(status: int, body: bytes, content_type: str | None, retry_after: str | None) -> GrpcAnswer:
    """An OTLP/HTTP upstream's answer (bridge mode) as the gRPC answer to the client. A 2xx
    relays the ``Export*ServiceResponse`` bytes (``partial_success`` included)."""
    if 200 <= status < 300:
        protobuf = (content_type or "").split(";")[0].strip().lower() == "application/x-protobuf"
        return GrpcAnswer(grpc.StatusCode.OK, "", "forwarded", body if protobuf else b"")
    code = _FROM_HTTP.get(status, grpc.StatusCode.UNKNOWN)
    delay = retry_after_seconds(retry_after) if code is grpc.StatusCode.UNAVAILABLE else None
    return failure(code, f"upstream answered HTTP {status}", f"upstream-{status}", delay)
