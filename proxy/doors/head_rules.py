"""What a request head must be before the ingest's own connection serves it or hands it to
aiohttp: the refusals that make :mod:`proxy.doors.ingest_conn` at least as strict as the
aiohttp server it replaced, input by input (SECURITY.md, "The two HTTP/1.1 legs").

Every head that ends there is checked before it is served *or handed off*, so nothing
reaches aiohttp unchecked but what its own parser refuses. A refusal is the status phrase
alone, as aiohttp refuses, written in its turn after the answers owed; it closes the connection, is counted in
``tracegate_protocol_errors_total{kind}`` and goes nowhere else:

* an HTTP/1 request line of a version but 1.0 or 1.1 (``HTTP/2.0``, ``HTTP/0.9``, which
  aiohttp answers as HTTP/1): 505, RFC 9110 §15.6.6 (``bad-http-version``);
* HTTP/1.1 without ``Host``, or two ``Host`` fields: 400, RFC 9112 §3.2; so is any field
  aiohttp takes once (its ``SINGLETON_HEADERS``) given twice (``bad-message``);
* a transfer coding but one final ``chunked``: a coding before it (``gzip, chunked``, whose
  gzip aiohttp ignores) is a 501, RFC 9112 §6.1 and §7; ``chunked`` not last, a 400, RFC
  9112 §6.3 (``bad-transfer-encoding``);
* HTTP/1.0 with Transfer-Encoding: served, then the connection closes, RFC 9112 §6.1 (aiohttp
  keeps it open, so one that is not an export is refused, 400, rather than handed off);
* a head whose reads pass ``ingest_conn.HEAD_LIMIT``: 431, RFC 6585 §5 (``head-too-large``).

Nothing after a request that closes the connection is read (RFC 9112 §9.6); in HTTP/1.0,
``Connection: close`` wins over ``keep-alive`` (llhttp lets keep-alive win; RFC 9112 §9.3).
No status line is written but a final 200–599 (RFC 9110 §15; a 1xx is interim): any other
answer becomes a 502 with a generic body.
"""

from __future__ import annotations

from http import HTTPStatus

from aiohttp import hdrs
from aiohttp.http_parser import SINGLETON_HEADERS
from multidict import CIMultiDict, istr

from proxy.answers import Answer

_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_HOST, TRANSFER_ENCODING = istr(hdrs.HOST), istr(hdrs.TRANSFER_ENCODING)
#: Fields aiohttp refuses to see twice (Host among them: RFC 9112 §3.2).
_SINGLETONS = tuple(istr(name) for name in sorted(SINGLETON_HEADERS))
#: Refusals at the door: the phrase alone, as aiohttp (protocol.EdgeRequestHandler) answers.
REFUSALS = {
    status: Answer(status, _REASONS[status], {"Content-Type": "text/plain; charset=utf-8"}, close=True)
    for status in (400, 431, 501, 505)
}
_BAD_MESSAGE, BAD_CODING = (400, "bad-message"), (400, "bad-transfer-encoding")


class Limits:
    """The listener's header limits (aiohttp's, so a head over them is handed to aiohttp,
    which refuses it with the same answer and protocol-error kind as always)."""

    def __init__(self, max_line: int, max_field: int, max_headers: int, idle_timeout: float) -> None:
        self.max_line, self.max_field, self.max_headers = max_line, max_field, max_headers
        self.idle_timeout = idle_timeout


def refusal_of(headers: CIMultiDict[str], http10: bool) -> tuple[int, str] | None:
    """The status and kind a head is refused with here, whatever it asks for; None: none."""
    if not http10 and _HOST not in headers:
        return _BAD_MESSAGE
    for name in _SINGLETONS:
        if len(headers.getall(name, ())) > 1:
            return _BAD_MESSAGE
    if hdrs.SEC_WEBSOCKET_KEY1 in headers:  # aiohttp: the old WebSocket draft is refused
        return 400, "invalid-header"
    value = headers.get(TRANSFER_ENCODING)
    if value is None or value == "chunked":
        return None
    codings = [coding for coding in (part.strip().lower() for part in value.split(",")) if coding]
    if not codings or codings[-1] != "chunked" or codings.count("chunked") > 1:
        return BAD_CODING  # the body's length cannot be known (RFC 9112 §6.3)
    return (501, "bad-transfer-encoding") if len(codings) > 1 else None


def says_close(headers: CIMultiDict[str]) -> bool:
    """Whether the Connection field names the ``close`` option."""
    return any(
        option.strip().lower() == "close" for value in headers.getall("Connection", ()) for option in value.split(",")
    )
