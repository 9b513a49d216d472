"""Request bytes → parameters and raw records, for every request form of SPEC §1."""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from peoplebase.wire import (
    Payload,
    RequestTooLarge,
    TooManyRecords,
    decode_base64,
    parse_request,
    valid_callback,
)

# "~~~~~~~~~" makes '+' appear in the base64 form; "Zoë/?" exercises URL escaping
RECORD = {"$token": "tok", "$distinct_id": "u1", "$set": {"plan": "~~~~~~~~~", "name": "Zoë/?"}}
MAX_BODY = 10 * 1024 * 1024
MAX_RECORDS = 2000


def post(
    body: bytes,
    content_type: str = "",
    query: str = "",
    encoding: str = "",
    max_body: int = MAX_BODY,
    max_records: int = MAX_RECORDS,
) -> Payload:
    return parse_request(
        "POST", query.encode(), content_type, encoding, body, max_body, max_records
    )


def get(query: str) -> Payload:
    return parse_request("GET", query.encode(), "", "", b"", MAX_BODY, MAX_RECORDS)


def b64(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def records(p: Payload) -> list[Any]:
    assert p.error is None, p.error
    assert p.records is not None
    return p.records


# --- JSON bodies ------------------------------------------------------------------------------


def test_json_body_by_content_type() -> None:
    p = post(json.dumps([RECORD]).encode(), "application/json; charset=utf-8")
    assert records(p) == [RECORD]
    assert p.size == len(json.dumps([RECORD]).encode())


@pytest.mark.parametrize("content_type", ["", "text/plain", "application/x-www-form-urlencoded"])
def test_json_body_by_first_byte(content_type: str) -> None:
    assert records(post(b"  \n[" + json.dumps(RECORD).encode() + b"]", content_type)) == [RECORD]
    assert records(post(b"\t" + json.dumps(RECORD).encode(), content_type)) == [RECORD]


def test_one_object_is_a_list_of_one() -> None:
    assert records(post(json.dumps(RECORD).encode(), "application/json")) == [RECORD]


def test_list_keeps_order_and_non_objects() -> None:
    body = [RECORD, 5, {"$token": "t2"}]
    assert records(post(json.dumps(body).encode())) == body


@pytest.mark.parametrize("body", [b"[]", b"  [ ] "])
def test_empty_list(body: bytes) -> None:
    p = post(body, "application/json")
    assert p.records is None
    assert p.error == "data, missing or empty"


def test_json_scalar_is_refused() -> None:
    p = post(b'"x"', "application/json")
    assert p.records is None and p.error is not None and p.error.startswith("data, ")


def test_invalid_json_body() -> None:
    assert post(b"[{bad json", "application/json").error == "data, invalid json"
    assert post(b"{", "").error == "data, invalid json"


# --- form bodies ------------------------------------------------------------------------------


def test_form_data_json() -> None:
    body = urlencode({"data": json.dumps([RECORD])}).encode()
    assert records(post(body, "application/x-www-form-urlencoded")) == [RECORD]


def test_form_data_base64() -> None:
    body = urlencode({"data": b64([RECORD])}).encode()
    assert records(post(body, "application/x-www-form-urlencoded")) == [RECORD]


@pytest.mark.parametrize("content_type", ["text/plain", "", "application/octet-stream"])
def test_form_whatever_content_type(content_type: str) -> None:
    body = ("data=" + quote(b64(RECORD), safe="")).encode()
    assert records(post(body, content_type)) == [RECORD]


def test_form_base64_with_spaces_for_plus() -> None:
    # PHP and Node send base64 unescaped: every '+' arrives as a space after URL decoding
    encoded = b64([RECORD] * 3)
    assert "+" in encoded
    body = ("data=" + encoded).encode()
    assert records(post(body, "application/x-www-form-urlencoded")) == [RECORD] * 3


def test_form_base64_with_newlines_and_missing_padding() -> None:
    for n in range(1, 4):  # lengths giving every amount of padding
        rec = {**RECORD, "pad": "x" * n}
        encoded = b64([rec])
        wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
        stripped = wrapped.rstrip("=")
        body = urlencode({"data": stripped}).encode()
        assert records(post(body, "application/x-www-form-urlencoded")) == [rec]


def test_decode_base64_lenient() -> None:
    raw = b"\xfb\xff\xfe hello"
    encoded = base64.b64encode(raw).decode()
    assert "+" in encoded and "/" in encoded
    assert decode_base64(encoded) == raw
    assert decode_base64(encoded.replace("+", " ")) == raw
    assert decode_base64(encoded.rstrip("=")) == raw
    assert decode_base64("\r\n".join(encoded) + "\n") == raw
    assert decode_base64(base64.urlsafe_b64encode(raw).decode()) == raw


@pytest.mark.parametrize("value", ["!!!notbase64", "abcde", "é", "a*b="])
def test_invalid_base64(value: str) -> None:
    p = post(urlencode({"data": value}).encode(), "application/x-www-form-urlencoded")
    assert p.records is None
    assert p.error == "data, invalid base64 encoding"


def test_base64_of_invalid_json() -> None:
    data = base64.b64encode(b"not json").decode()
    p = post(urlencode({"data": data}).encode())
    assert p.error == "data, invalid json"


@pytest.mark.parametrize("body", [b"", b"data=", b"data=%20%20", b"other=1"])
def test_missing_data(body: bytes) -> None:
    p = post(body, "application/x-www-form-urlencoded")
    assert p.records is None
    assert p.error == "data, missing or empty"


def test_form_body_falls_back_to_query_data() -> None:
    p = post(b"verbose=1", "application/x-www-form-urlencoded", query="data=" + b64(RECORD))
    assert records(p) == [RECORD]
    assert p.params.verbose


def test_invalid_utf8_in_form_body() -> None:
    p = post(b"data=\xff\xfe", "application/x-www-form-urlencoded")
    assert p.records is None and p.error is not None and "utf-8" in p.error


# --- GET --------------------------------------------------------------------------------------


def test_get_base64() -> None:
    assert records(get("data=" + quote(b64([RECORD]), safe=""))) == [RECORD]


def test_get_base64_unescaped_plus() -> None:
    encoded = b64([RECORD] * 3)
    assert "+" in encoded
    assert records(get("data=" + encoded + "&ip=1")) == [RECORD] * 3


def test_get_json() -> None:
    assert records(get("data=" + quote(json.dumps(RECORD)))) == [RECORD]
    assert records(get(urlencode({"data": json.dumps([RECORD, RECORD])}))) == [RECORD, RECORD]


def test_get_without_data() -> None:
    assert get("verbose=1").error == "data, missing or empty"
    assert get("").error == "data, missing or empty"


def test_get_ignores_body() -> None:
    p = parse_request("GET", b"data=" + b64(RECORD).encode(), "", "", b"[1]", MAX_BODY, MAX_RECORDS)
    assert records(p) == [RECORD]


# --- gzip -------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "GZIP"])
def test_gzip_json_body(encoding: str) -> None:
    body = gzip.compress(json.dumps([RECORD]).encode())
    assert records(post(body, "application/json", encoding=encoding)) == [RECORD]


def test_gzip_form_body() -> None:
    body = gzip.compress(urlencode({"data": b64([RECORD]), "verbose": "1"}).encode())
    p = post(body, "application/x-www-form-urlencoded", encoding="gzip")
    assert records(p) == [RECORD]
    assert p.params.verbose


def test_deflate_body() -> None:
    body = zlib.compress(json.dumps([RECORD]).encode())
    assert records(post(body, "application/json", encoding="deflate")) == [RECORD]


def test_gzip_bomb_refused() -> None:
    limit = 64 * 1024
    body = gzip.compress(b"[" + b" " * (50 * 1024 * 1024) + b"]")
    assert len(body) < 100_000
    with pytest.raises(RequestTooLarge) as exc:
        post(body, "application/json", encoding="gzip", max_body=limit)
    assert str(exc.value) == f"request exceeds max limit of {limit} bytes"
    assert exc.value.limit == limit


def test_gzip_at_the_limit_accepted() -> None:
    data = json.dumps([RECORD]).encode()
    body = gzip.compress(data)
    assert records(post(body, "application/json", encoding="gzip", max_body=len(data))) == [RECORD]
    with pytest.raises(RequestTooLarge):
        post(body, "application/json", encoding="gzip", max_body=len(data) - 1)


def test_plain_body_over_limit() -> None:
    data = json.dumps([RECORD]).encode()
    with pytest.raises(RequestTooLarge):
        post(data, "application/json", max_body=len(data) - 1)


def test_invalid_gzip() -> None:
    p = post(b"not gzip at all", "application/json", encoding="gzip")
    assert p.records is None and p.error == "data, invalid gzip encoding"


def test_unsupported_encoding() -> None:
    p = post(b"[]", "application/json", encoding="br")
    assert p.records is None and p.error is not None and "Content-Encoding" in p.error


# --- record count -----------------------------------------------------------------------------


def test_max_records() -> None:
    body = json.dumps([RECORD] * 5).encode()
    assert len(records(post(body, max_records=5))) == 5
    with pytest.raises(TooManyRecords) as exc:
        post(body, max_records=4)
    assert "5 records" in str(exc.value) and "4" in str(exc.value)


def test_default_max_records() -> None:
    body = json.dumps([RECORD] * 2001).encode()
    with pytest.raises(TooManyRecords):
        post(body)
    assert len(records(post(json.dumps([RECORD] * 2000).encode()))) == 2000


# --- parameters -------------------------------------------------------------------------------


def test_params_from_query() -> None:
    p = get("data=" + b64(RECORD) + "&ip=0&verbose=1&strict=1&img=1&callback=cb")
    assert p.params.ip == "0"
    assert p.params.verbose and p.params.strict and p.params.img
    assert p.params.callback == "cb"


def test_params_from_form_body() -> None:
    # the Python SDK sends verbose=1&ip=0 in the body
    body = urlencode({"data": b64([RECORD]), "verbose": "1", "ip": "0"}).encode()
    p = post(body, "application/x-www-form-urlencoded")
    assert records(p) == [RECORD]
    assert p.params.verbose and p.params.ip == "0"
    assert not p.params.strict and not p.params.img and p.params.callback is None


def test_form_body_params_override_query() -> None:
    body = urlencode({"data": b64(RECORD), "verbose": "0"}).encode()
    p = post(body, query="verbose=1&strict=1")
    assert not p.params.verbose
    assert p.params.strict


def test_params_with_json_body_come_from_query() -> None:
    p = post(json.dumps(RECORD).encode(), "application/json", query="strict=1&callback=f")
    assert p.params.strict and p.params.callback == "f"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("2", True), ("true", True), ("0", False), ("", False), ("no", False)],
)
def test_flag_values(value: str, expected: bool) -> None:
    assert get(f"data={b64(RECORD)}&verbose={value}").params.verbose is expected


def test_params_kept_when_data_is_bad() -> None:
    p = get("data=%%%&verbose=1")
    assert p.records is None and p.params.verbose


# --- JSONP callback ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "cb",
        "_",
        "$",
        "jQuery123_456",
        "mixpanel._jsc",
        "window.mp.callbacks[3]",
        'a["b"].c',
        "a['b']",
        "$.fn_1",
        "(function(){})",
    ],
)
def test_valid_callbacks(name: str) -> None:
    assert valid_callback(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "alert(1)",
        "alert(1)//",
        "cb;alert(1)",
        "<script>alert(1)</script>",
        "a b",
        "1abc",
        "a.",
        "a..b",
        "a[b]",
        'a["b c"]',
        "cb\n",
        "cb\nalert(1)",
        "(function(){alert(1)})",
        "(function(){})()",
        "x=1",
        "a" * 300,
    ],
)
def test_refused_callbacks(name: str) -> None:
    assert not valid_callback(name)
