"""tracegate's own answers to OTLP clients: ``google.rpc.Status`` in the request's encoding.

OTLP/HTTP says a failed export is answered with a ``google.rpc.Status`` body encoded like
the request (protobuf or JSON); clients such as otel-cli reject anything else. The message
is generic on purpose: the precise reason goes to the audit log and the metrics only.
The protobuf encoding is written out here (two fields) rather than pulling in protobuf.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

# google.rpc.Code values.
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNAVAILABLE = 14
UNAUTHENTICATED = 16

_BY_STATUS = {
    400: (INVALID_ARGUMENT, "bad request"),
    408: (DEADLINE_EXCEEDED, "request body arrived too slowly"),
    401: (UNAUTHENTICATED, "the request's token is missing or invalid"),
    403: (PERMISSION_DENIED, "this token may not send this telemetry"),
    413: (RESOURCE_EXHAUSTED, "request body too large"),
    415: (INVALID_ARGUMENT, "this encoding is not accepted by the account's backend; send protobuf"),
    429: (RESOURCE_EXHAUSTED, "quota exceeded; retry after the Retry-After delay"),
    502: (UNAVAILABLE, "upstream unavailable"),
    503: (UNAVAILABLE, "identity provider keys not yet available; retry"),
    504: (DEADLINE_EXCEEDED, "upstream timed out"),
}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def status_protobuf(code: int, message: str) -> bytes:
    """``google.rpc.Status{code, message}`` in protobuf wire format."""
    text = message.encode()
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text


def wants_json(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == "application/json"


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer to an OTLP/HTTP client, whichever server writes it: ``headers`` carries the
    Content-Type; ``close`` asks that the connection be closed after it."""

    status: int
    body: bytes
    headers: Mapping[str, str]
    close: bool = False


def refusal_answer(
    status: int, request_content_type: str | None, *, retry_after: int | None = None, close: bool = False
) -> Answer:
    """A refusal. 401 carries ``WWW-Authenticate: Bearer error="invalid_token"``."""
    code, message = _BY_STATUS[status]
    if wants_json(request_content_type):
        headers = {"Content-Type": "application/json"}
        body = json.dumps({"code": code, "message": message}).encode()
    else:
        headers = {"Content-Type": "application/x-protobuf"}
        body = status_protobuf(code, message)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return Answer(status, body, headers, close)


def response(answer: Answer) -> web.Response:
    """``answer`` as an aiohttp response."""
    out = web.Response(status=answer.status, body=answer.body, headers=answer.headers)
    if answer.close:
        out.force_close()
    return out


def refusal(status: int, request_content_type: str | None, *, retry_after: int | None = None) -> web.Response:
    """:func:`refusal_answer` as an aiohttp response."""
    return response(refusal_answer(status, request_content_type, retry_after=retry_after))
