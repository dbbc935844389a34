"""Stamping: set verified resource attributes on an OTLP export.

A service account with ``stamp:`` gets, on every resource of every export it sends, the
attributes its policy names, with values taken only from the verified token's claims. A
value the client sent for a stamped key is removed first (replaced, never duplicated); a
stamped key whose claim the token lacks is removed and not set, so the client cannot
supply what the token does not say.

Transport-neutral: bytes in, bytes out, :class:`~proxy.errors.StampError` (a
``BodyError`` with a reason code and an HTTP status: 400, or 413 for a body that grows
past the limit when decompressed) for anything that cannot be stamped; nothing is ever
forwarded unstamped. When ``admitted.account.stamp`` is non-empty a door calls
``stamp_protobuf(message, stamp_for(admitted.account, admitted.identity))`` (gRPC: the
message bytes; 400 maps to ``INVALID_ARGUMENT``) or :func:`stamp_http_body` (OTLP/HTTP).

* Protobuf (:func:`stamp_protobuf`): the export is spliced, not decoded. Only the
  top-level repeated field 1 (``ResourceSpans``/``ResourceMetrics``/``ResourceLogs``)
  and, inside each, field 1 (``Resource``) are walked; the Resource's attribute list is
  re-encoded without the stamped keys and with the verified ``KeyValue``\\s appended.
  Every other byte range (scopes, spans, metric points, log records, unknown fields) is
  copied untouched. The three export requests share that layout, so one function serves
  traces, metrics and logs — and the gRPC door, whose messages are these same bytes.
* JSON (:func:`stamp_json`): OTLP/JSON is decoded, set, and re-encoded. Field names are
  accepted in lowerCamelCase and in the proto's own names (the proto3 JSON mapping).
* gzip (:func:`stamp_http_body`): decompressed with the body limit applied to the
  decompressed size (a zip bomb is refused 413), stamped, recompressed with gzip at level
  1 so the upstream request keeps the client's ``Content-Encoding`` and stays small.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from proxy.errors import StampError
from proxy.identity.identify import Identity, decode_claims
from proxy.policy.matchers import claim_text
from proxy.policy.model import ServiceAccount

#: (attribute key, value) pairs to set; value None removes the key without setting it.
Stamp = tuple[tuple[str, str | None], ...]

#: Reason codes (audit ``reason``, metric label).
BAD_PROTOBUF = "stamp-bad-protobuf"
BAD_JSON = "stamp-bad-json"
BAD_GZIP = "stamp-bad-gzip"
UNSUPPORTED_TYPE = "stamp-unsupported-content-type"
UNSUPPORTED_ENCODING = "stamp-unsupported-content-encoding"
TOO_LARGE = "body-too-large"

GZIP_LEVEL = 1


def stamp_for(account: ServiceAccount, identity: Identity) -> Stamp:
    """What ``account`` stamps for ``identity``. Empty for an account without ``stamp:``;
    otherwise kept for the last few thousand (spec, claims) pairs, so one token's requests
    share one stamp (the claims text is the cache entry's own string, whose hash Python
    keeps: a repeated lookup costs no decoding and no rehashing)."""
    if not account.stamp:
        return ()
    return _stamp_of_payload(account.stamp, identity.payload)


@lru_cache(maxsize=4096)
def _stamp_of_payload(spec: tuple[tuple[str, tuple[str, ...]], ...], payload: str) -> Stamp:
    return stamp_values(spec, decode_claims(payload))


def stamp_values(spec: Iterable[tuple[str, Sequence[str]]], claims: Mapping[str, Any]) -> Stamp:
    """The attributes to stamp: for each key, the first of its claims the token carries
    (as claim text: numbers in decimal, booleans ``true``/``false``), else None."""
    out: list[tuple[str, str | None]] = []
    for key, names in spec:
        value = None
        for name in names:
            value = claim_text(claims.get(name))
            if value is not None:
                break
        out.append((key, value))
    return tuple(out)


# --- protobuf ------------------------------------------------------------------------


_SMALL_VARINTS = tuple(bytes((n,)) for n in range(0x80))


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise StampError(BAD_PROTOBUF)
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


MAX_FIELD_NUMBER = (1 << 29) - 1


def _fields(buf: memoryview, pos: int, end: int) -> Iterable[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, field end) of each field of the
    message in ``buf[pos:end]``. Length-delimited values are bounds-checked, not decoded.
    One-byte tags and lengths (nearly all of them) are read inline."""
    while pos < end:
        start = pos
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _read_varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        # Field numbers are 1 … 2^29-1 in a tag of at most 5 bytes. A longer tag is not
        # protobuf — and parsers that keep only its low 32 bits (protobuf-java, gogo) would
        # read a field this walk calls something else: a client value for a stamped key
        # disguised as an unknown field. Refuse it.
        if number == 0 or number > MAX_FIELD_NUMBER or pos - start > 5:
            raise StampError(BAD_PROTOBUF)
        value = pos
        if wire == 2:
            if pos >= end:
                raise StampError(BAD_PROTOBUF)
            length = buf[pos]
            if length < 0x80:
                value = pos + 1
            else:
                length, value = _read_varint(buf, pos, end)
            pos = value + length
        elif wire == 0:
            _, pos = _read_varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:  # groups (3, 4) are not used by OTLP; refuse rather than guess
            raise StampError(BAD_PROTOBUF)
        if pos > end:
            raise StampError(BAD_PROTOBUF)
        yield number, wire, start, value, pos


def _key_value(key: str, value: str) -> bytes:
    """``KeyValue{key, value: AnyValue{string_value}}`` in wire format."""
    k, v = key.encode(), value.encode()
    any_value = b"\x0a" + _varint(len(v)) + v
    return b"\x0a" + _varint(len(k)) + k + b"\x12" + _varint(len(any_value)) + any_value


@lru_cache(maxsize=4096)
def encoded_stamp(stamp: Stamp) -> tuple[frozenset[bytes], bytes]:
    """The stamped keys (UTF-8) and the ``KeyValue`` fields (Resource field 1) to append;
    computed once per distinct stamp (a pipeline's requests share one)."""
    keys = frozenset(k.encode() for k, _ in stamp)
    appended = b"".join(b"\x0a" + _varint(len(kv)) + kv for kv in (_key_value(k, v) for k, v in stamp if v is not None))
    return keys, appended


Parts = list["bytes | memoryview"]


def _kv_key(buf: memoryview, start: int, end: int) -> bytes | None:
    # The common shape, read directly: key (tag 0x0a, length < 128), then value (tag
    # 0x12, length < 128) ending the message. Anything else takes the general walk.
    if end - start >= 4 and buf[start] == 0x0A and buf[start + 1] < 0x80:
        after = start + 2 + buf[start + 1]
        if after + 2 <= end and buf[after] == 0x12 and buf[after + 1] < 0x80 and after + 2 + buf[after + 1] == end:
            return bytes(buf[start + 2 : after])
    key = None
    for number, wire, _, value, stop in _fields(buf, start, end):
        if number == 1:
            if wire != 2:
                raise StampError(BAD_PROTOBUF)
            key = bytes(buf[value:stop])  # the last occurrence wins, as when the receiver decodes
    return key


def _resource(buf: memoryview, start: int, end: int, keys: frozenset[bytes], appended: bytes, out: Parts) -> int:
    """One ``Resource`` message's content, stamped, appended to ``out``; returns its length."""
    size = 0
    copy_from = pos = start
    while pos < end:
        field_start = pos
        if buf[pos] == 0x0A and pos + 1 < end and buf[pos + 1] < 0x80:  # an attribute under 128 bytes
            value = pos + 2
            pos = value + buf[pos + 1]
            if pos > end:
                raise StampError(BAD_PROTOBUF)
        else:
            number, wire, _, value, pos = next(iter(_fields(buf, pos, end)))
            if number != 1:
                continue
            if wire != 2:
                raise StampError(BAD_PROTOBUF)
        if _kv_key(buf, value, pos) in keys:
            out.append(buf[copy_from:field_start])
            size += field_start - copy_from
            copy_from = pos
    out.append(buf[copy_from:end])
    out.append(appended)
    return size + end - copy_from + len(appended)


def _resource_entry(buf: memoryview, start: int, end: int, keys: frozenset[bytes], appended: bytes, out: Parts) -> int:
    """One ``ResourceSpans``/``ResourceMetrics``/``ResourceLogs`` content, stamped, appended
    to ``out``; returns its length. The verified attributes go into its last ``resource``
    occurrence (protobuf merges repeated occurrences, so they end up last in the decoded
    list); with none, one is added."""
    resources = []
    for number, wire, field_start, value, stop in _fields(buf, start, end):
        if number == 1:
            if wire != 2:
                raise StampError(BAD_PROTOBUF)
            resources.append((field_start, value, stop))
    if not resources:
        out.append(buf[start:end])
        if not appended:
            return end - start
        header = b"\x0a" + _varint(len(appended))
        out += (header, appended)
        return end - start + len(header) + len(appended)
    size = 0
    copy_from = start
    last = len(resources) - 1
    for i, (field_start, value, stop) in enumerate(resources):
        content: Parts = []
        length = _resource(buf, value, stop, keys, appended if i == last else b"", content)
        header = b"\x0a" + _varint(length)
        out += (buf[copy_from:field_start], header)
        out += content
        size += field_start - copy_from + len(header) + length
        copy_from = stop
    out.append(buf[copy_from:end])
    return size + end - copy_from


def stamp_protobuf(body: bytes, stamp: Stamp) -> bytes:
    """Stamp an ``Export{Trace,Metrics,Logs}ServiceRequest`` in protobuf wire format.
    Raises StampError(``stamp-bad-protobuf``) for a body whose walked framing is broken.
    Byte ranges are sliced as memoryviews and joined once: one copy of the body."""
    keys, appended = encoded_stamp(stamp)
    buf = memoryview(body)
    out: Parts = []
    copy_from = 0
    end = len(body)
    for number, wire, field_start, value, stop in _fields(buf, 0, end):
        if number != 1:
            continue
        if wire != 2:
            raise StampError(BAD_PROTOBUF)
        content: Parts = []
        length = _resource_entry(buf, value, stop, keys, appended, content)
        out += (buf[copy_from:field_start], b"\x0a" + _varint(length))
        out += content
        copy_from = stop
    out.append(buf[copy_from:end])
    return b"".join(out)


# --- JSON ----------------------------------------------------------------------------

#: Top-level lists of resource entries, in both spellings the proto3 JSON mapping allows.
_ENTRY_LISTS = (
    "resourceSpans",
    "resource_spans",
    "resourceMetrics",
    "resource_metrics",
    "resourceLogs",
    "resource_logs",
)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _is_attribute(value: object) -> bool:
    """A ``KeyValue`` object whose key is a string (or null, the proto3 JSON default)."""
    return isinstance(value, dict) and isinstance(value.get("key", ""), (str, type(None)))


def stamp_json(body: bytes, stamp: Stamp) -> bytes:
    """Stamp an OTLP/JSON export. Raises StampError(``stamp-bad-json``) for whatever the
    client sent that is not a JSON text of the export's shape, at either end:

    * reading: invalid UTF-8, malformed JSON, ``NaN``/``Infinity`` or a number that
      overflows a double, an integer past Python's digit limit (4300), nesting past the
      recursion limit (about 990 levels), a top level, entry list, entry, resource or
      attribute list of the wrong type, an attribute key that is not a string;
    * writing: a ``\\ud800``-style escape that leaves a lone surrogate parses into a
      ``str``, but it is no character and cannot be encoded as UTF-8 (that was a 500), and
      nesting the encoder cannot follow as deep as the parser did.
    """
    try:
        doc = json.loads(body.decode("utf-8"), parse_float=_finite, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise StampError(BAD_JSON) from None
    if not isinstance(doc, dict):
        raise StampError(BAD_JSON)
    keys = {k for k, _ in stamp}
    added = [{"key": k, "value": {"stringValue": v}} for k, v in stamp if v is not None]
    for name in _ENTRY_LISTS:
        entries = doc.get(name)
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise StampError(BAD_JSON)
        for entry in entries:
            if not isinstance(entry, dict):
                raise StampError(BAD_JSON)
            resource = entry.get("resource")
            if resource is None:
                resource = entry["resource"] = {}
            if not isinstance(resource, dict):
                raise StampError(BAD_JSON)
            attributes = resource.get("attributes")
            if attributes is None:
                attributes = []
            if not isinstance(attributes, list) or not all(_is_attribute(a) for a in attributes):
                raise StampError(BAD_JSON)
            kept = [a for a in attributes if a.get("key") not in keys]
            resource["attributes"] = kept + added
    try:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except (ValueError, RecursionError):  # UnicodeEncodeError (a lone surrogate) is a ValueError
        raise StampError(BAD_JSON) from None


# --- HTTP bodies ---------------------------------------------------------------------


def gunzip(body: bytes, limit: int) -> bytes:
    """Decompress gzip (every member), refusing (413) output over ``limit`` bytes before
    it is produced and (400) anything that is not whole, valid gzip."""
    out: list[bytes] = []
    size = 0
    data = body
    try:
        while True:
            inflater = zlib.decompressobj(wbits=31)
            # One call, its output capped one byte past what may remain: memory stays
            # within the limit whatever the ratio, and a bomb stops at limit + 1 bytes.
            chunk = inflater.decompress(data, limit - size + 1)
            size += len(chunk)
            if size > limit:
                raise StampError(TOO_LARGE, 413)
            if not inflater.eof:
                raise StampError(BAD_GZIP)  # the input ended inside a member
            out.append(chunk)
            data = inflater.unused_data
            if not data.strip(b"\x00"):  # trailing zero padding is allowed, as gzip(1) does
                return out[0] if len(out) == 1 else b"".join(out)
    except zlib.error:
        raise StampError(BAD_GZIP) from None


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def stamp_http_body(
    body: bytes, stamp: Stamp, *, content_type: str | None, content_encoding: str | None, limit: int
) -> bytes:
    """An OTLP/HTTP request body, stamped, in the request's own type and encoding."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding not in ("gzip", "identity", ""):
        raise StampError(UNSUPPORTED_ENCODING)
    kind = media_type(content_type)
    if kind in ("application/x-protobuf", "application/protobuf"):
        stamp_one = stamp_protobuf
    elif kind == "application/json":
        stamp_one = stamp_json
    else:
        raise StampError(UNSUPPORTED_TYPE)
    if encoding == "gzip":
        return gzip.compress(stamp_one(gunzip(body, limit), stamp), GZIP_LEVEL, mtime=0)
    return stamp_one(body, stamp)
