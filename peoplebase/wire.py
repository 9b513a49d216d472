"""Request bytes → request parameters and a list of raw update records (SPEC §1).

Accepted forms: a JSON body (Content-Type application/json, or a body starting with `[`/`{`),
a form body whose `data=` holds JSON or base64(JSON) whatever its Content-Type says, GET
`?data=`, gzip over any of these, one object or a list. Base64 is decoded leniently.
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson

from .types import Params


class RequestTooLarge(Exception):
    """The body, after decompression, is over the limit (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request exceeds max limit of {limit} bytes")
        self.limit = limit


class TooManyRecords(Exception):
    """More records than one request may carry (400)."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"request has {count} records; at most {limit} are accepted per request")


@dataclass(slots=True)
class Payload:
    params: Params
    records: list[Any] | None  # None when `error` is set
    error: str | None = None  # "data, …": nothing in the request could be read
    size: int = 0  # bytes of decoded JSON


_WS = re.compile(rb"[\s]")
_CALLBACK = re.compile(
    r"^[A-Za-z_$][\w$]*(?:\.[A-Za-z_$][\w$]*|\[\d+\]|\[\"[\w$]+\"\]|\['[\w$]+'\])*$"
)
MAX_CALLBACK_CHARS = 256


def valid_callback(name: str) -> bool:
    """A plain JavaScript identifier path, or exactly what mixpanel-js sends (SPEC §7)."""
    if name == "(function(){})":
        return True
    # fullmatch: `$` alone would also accept a trailing newline
    return len(name) <= MAX_CALLBACK_CHARS and _CALLBACK.fullmatch(name) is not None


def _flag(value: str | None) -> bool:
    if value is None:
        return False
    v = value.strip().lower()
    if v in ("true", "yes"):
        return True
    try:
        return float(v) >= 1
    except ValueError:
        return False


def parse_params(fields: dict[str, str]) -> Params:
    return Params(
        ip=fields.get("ip"),
        verbose=_flag(fields.get("verbose")),
        strict=_flag(fields.get("strict")),
        callback=fields.get("callback"),
        img=_flag(fields.get("img")),
    )


def parse_form(text: str) -> dict[str, str]:
    """Form or query fields; later values win; invalid UTF-8 in an escape raises ValueError."""
    return dict(parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="strict"))


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ValueError(f"unsupported Content-Encoding {encoding!r}")
    d = zlib.decompressobj(wbits=47)  # gzip or zlib header, detected
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ValueError("invalid gzip encoding") from exc
    if len(out) > limit or d.unconsumed_tail:
        raise RequestTooLarge(limit)
    return out


def decode_base64(value: str) -> bytes:
    raw = value.replace(" ", "+").encode("ascii", "strict")
    raw = _WS.sub(b"", raw).replace(b"-", b"+").replace(b"_", b"/").rstrip(b"=")
    raw += b"=" * (-len(raw) % 4)
    return base64.b64decode(raw, validate=True)


def decode_data(value: str | bytes) -> tuple[Any, str | None, int]:
    """The `data` value (or a raw JSON body) → (decoded JSON, error, size)."""
    text = value.strip() if isinstance(value, str) else value.strip()
    if not text:
        return None, "data, missing or empty", 0
    first = text[:1]
    if first in ("[", "{", b"[", b"{"):
        raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    else:
        try:
            raw = decode_base64(text if isinstance(text, str) else text.decode("ascii"))
        except (binascii.Error, ValueError, UnicodeError):
            return None, "data, invalid base64 encoding", 0
    try:
        return orjson.loads(raw), None, len(raw)
    except orjson.JSONDecodeError:
        return None, "data, invalid json", len(raw)


def parse_request(
    method: str,
    query_string: bytes,
    content_type: str,
    content_encoding: str,
    body: bytes,
    max_body_bytes: int,
    max_records: int,
) -> Payload:
    """Read one ingestion request. Raises RequestTooLarge / TooManyRecords (nothing applied)."""
    try:
        query = parse_form(query_string.decode("latin-1"))
    except (ValueError, UnicodeError):
        return Payload(Params(), None, "data, invalid utf-8 in the query string")
    fields = dict(query)
    data: str | bytes | None = None
    if method == "POST" and body:
        try:
            body = decompress(body, content_encoding, max_body_bytes)
        except ValueError as exc:
            return Payload(parse_params(fields), None, f"data, {exc}")
        if len(body) > max_body_bytes:
            raise RequestTooLarge(max_body_bytes)
        stripped = body.lstrip()
        if content_type.split(";")[0].strip().lower() == "application/json" or stripped[:1] in (
            b"[",
            b"{",
        ):
            data = stripped
        else:
            try:
                form = parse_form(body.decode("utf-8"))
            except (ValueError, UnicodeError):
                return Payload(parse_params(fields), None, "data, invalid utf-8 in the form body")
            fields.update(form)
            data = form.get("data")
    if data is None:
        data = query.get("data")
    params = parse_params(fields)
    if data is None:
        return Payload(params, None, "data, missing or empty")
    decoded, error, size = decode_data(data)
    if error is not None:
        return Payload(params, None, error, size)
    if isinstance(decoded, dict):
        records = [decoded]
    elif isinstance(decoded, list):
        records = decoded
    else:
        return Payload(params, None, "data, must be a JSON object or a list of objects", size)
    if not records:
        return Payload(params, None, "data, missing or empty", size)
    if len(records) > max_records:
        raise TooManyRecords(len(records), max_records)
    return Payload(params, records, None, size)
