"""JSON value rules (SPEC §3 equality, §6 limits) in peoplebase.values."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peoplebase.values import (
    MAX_COMPOSITE_BYTES,
    ValueTooLarge,
    clean_number,
    composite_too_large,
    is_number,
    json_equal,
    sanitize,
    sanitize_property,
    truncate_name,
    truncate_string,
    value_key,
)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1, 1.0),
        (0, -0.0),
        ([1, "a"], [1.0, "a"]),
        ({"x": 1, "y": [2]}, {"y": [2.0], "x": 1.0}),
        (None, None),
        ("é", "é"),
    ],
)
def test_json_equal_values(a: object, b: object) -> None:
    assert json_equal(a, b)
    assert value_key(a) == value_key(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1, True),
        (1, "1"),
        (True, "true"),
        (0, False),
        (0, None),
        ("", None),
        ([1], 1),
        ([1, 2], [2, 1]),
        ({"x": 1}, {"x": "1"}),
        ({"x": 1}, [["x", 1]]),
        ([], {}),
    ],
)
def test_json_different_values(a: object, b: object) -> None:
    assert not json_equal(a, b)


def test_truncate_string_ascii() -> None:
    assert truncate_string("a" * 255) == "a" * 255
    assert truncate_string("a" * 300) == "a" * 255


@pytest.mark.parametrize("char", ["é", "€", "😀"])
def test_truncate_string_cuts_on_character_boundary(char: str) -> None:
    width = len(char.encode())
    out = truncate_string(char * 200)
    assert len(out.encode()) <= 255
    assert len(out.encode()) > 255 - width  # no more cut than needed
    assert out == char * (255 // width)


def test_truncate_string_mixed_boundary() -> None:
    s = "a" * 254 + "é" + "b"  # é straddles byte 255
    assert truncate_string(s) == "a" * 254


@given(st.text(max_size=400))
@settings(max_examples=150, deadline=None)
def test_truncate_string_is_a_prefix_within_255_bytes(s: str) -> None:
    out = truncate_string(s)
    assert s.startswith(out)
    assert len(out.encode("utf-8", "surrogatepass")) <= 255
    if len(s.encode("utf-8", "surrogatepass")) <= 255:
        assert out == s
    else:
        # the next character would not have fitted
        nxt = s[len(out)]
        assert len((out + nxt).encode("utf-8", "surrogatepass")) > 255


def test_truncate_name_counts_characters() -> None:
    assert truncate_name("é" * 300) == "é" * 255
    assert truncate_name("n" * 255) == "n" * 255


def test_is_number_excludes_booleans() -> None:
    assert is_number(1) and is_number(1.5) and is_number(-3)
    assert not is_number(True) and not is_number(False)
    assert not is_number("1") and not is_number(None)


def test_clean_number() -> None:
    assert clean_number(2**63 - 1) == 2**63 - 1
    assert isinstance(clean_number(2**63 - 1), int)
    big = clean_number(2**63)
    assert isinstance(big, float) and big == float(2**63)
    with pytest.raises(ValueTooLarge):
        clean_number(float("inf"))
    with pytest.raises(ValueTooLarge):
        clean_number(float("nan"))


def test_sanitize_truncates_strings_inside_lists_and_objects() -> None:
    value = {"a": ["x" * 300, {"b": "é" * 200}], "k" * 300: "v"}
    out = sanitize(value)
    assert out["a"][0] == "x" * 255
    assert out["a"][1]["b"] == "é" * 127
    assert "k" * 255 in out and len(out) == 2


def test_sanitize_depth_limit() -> None:
    three = {"a": {"b": {"c": 1}}}
    assert sanitize(three) == three
    with pytest.raises(ValueTooLarge):
        sanitize({"a": {"b": {"c": {"d": 1}}}})
    # lists do not count as a level
    assert sanitize([[{"a": [{"b": {"c": 1}}]}]]) == [[{"a": [{"b": {"c": 1}}]}]]


def test_sanitize_key_limit() -> None:
    ok = {f"k{i}": i for i in range(255)}
    assert sanitize(ok) == ok
    with pytest.raises(ValueTooLarge):
        sanitize({f"k{i}": i for i in range(256)})


def test_composite_size_limit() -> None:
    small = ["x" * 255] * 63
    assert not composite_too_large(small)
    # 1100 strings of 255 bytes: about 283 KB of JSON
    large = ["x" * 255] * 1100
    assert len(orjson.dumps(large)) > MAX_COMPOSITE_BYTES
    assert composite_too_large(large)
    assert composite_too_large({f"k{i}": "y" * 255 for i in range(1100)})
    assert not composite_too_large("x" * 10_000)
    with pytest.raises(ValueTooLarge):
        sanitize_property(large)
    # a list just under the limit is kept
    under = ["x" * 255] * 1000
    assert len(orjson.dumps(under)) < MAX_COMPOSITE_BYTES
    assert sanitize_property(under) == under
