"""The where-expression parser: every construct, and errors that point at the position."""

from __future__ import annotations

import pytest

from peoplebase.query.evaluate import matches, parse_date
from peoplebase.query.where import (
    Arith,
    BoolOp,
    Call,
    Compare,
    In,
    ListLiteral,
    Literal,
    Not,
    Prop,
    WhereSyntaxError,
    parse,
)


def test_property_and_literals() -> None:
    assert parse('properties["plan"] == "pro"') == Compare(
        "==", Prop("plan", 0), Literal("pro", 22), 19
    )
    node = parse("properties['a'] != null")
    assert isinstance(node, Compare) and node.right == Literal(None, 19)
    assert parse("true").value is True  # type: ignore[union-attr]
    assert parse("-2.5e1").value == -25.0  # type: ignore[union-attr]
    assert parse('user["x"]') == Prop("x", 0)


@pytest.mark.parametrize("op", ["==", "!=", "<", "<=", ">", ">="])
def test_comparisons(op: str) -> None:
    node = parse(f'properties["n"] {op} 3')
    assert isinstance(node, Compare) and node.op == op


def test_boolean_precedence() -> None:
    node = parse('properties["a"] or properties["b"] and not properties["c"]')
    assert isinstance(node, BoolOp) and node.op == "or"
    assert isinstance(node.right, BoolOp) and node.right.op == "and"
    assert isinstance(node.right.right, Not)
    grouped = parse('(properties["a"] or properties["b"]) and properties["c"]')
    assert isinstance(grouped, BoolOp) and grouped.op == "and"


def test_arithmetic_precedence() -> None:
    node = parse('properties["a"] + 2 * 3 % 4 - 1 > 0')
    assert isinstance(node, Compare)
    left = node.left
    assert isinstance(left, Arith) and left.op == "-"
    assert isinstance(left.left, Arith) and left.left.op == "+"
    assert isinstance(left.left.right, Arith) and left.left.right.op == "%"
    assert parse('-properties["a"]') == Arith("-", Literal(0.0, 0), Prop("a", 1), 0)


def test_in_and_lists() -> None:
    node = parse('"vip" in properties["tags"]')
    assert isinstance(node, In) and node.right == Prop("tags", 9)
    node = parse('properties["plan"] in ["a", 1, true, null]')
    assert isinstance(node, In) and isinstance(node.right, ListLiteral)
    assert [i.value for i in node.right.items] == ["a", 1.0, True, None]
    node = parse('"x" not in properties["s"]')
    assert isinstance(node, Not) and isinstance(node.operand, In)


def test_functions_and_datetime_typing() -> None:
    for fn in ("defined", "number", "string", "boolean", "datetime"):
        node = parse(f'{fn}(properties["a"])')
        assert isinstance(node, Call) and node.fn == fn
    node = parse('not defined(properties["a"])')
    assert isinstance(node, Not) and isinstance(node.operand, Call)
    node = parse('datetime(properties["$last_seen"]) > "2024-01-01"')
    assert isinstance(node, Compare) and node.right == Call(
        "datetime", Literal("2024-01-01", 37), 37
    )
    assert matches(node, {"$last_seen": "2024-03-01T00:00:00"})
    assert not matches(node, {"$last_seen": "2023-03-01T00:00:00"})
    epoch = parse('datetime(properties["t"]) >= 1704067200')
    assert matches(epoch, {"t": "2024-01-01"}) and not matches(epoch, {"t": "2023-12-31T23:59:59Z"})


def test_string_escapes() -> None:
    assert parse(r'"a\"b\\c\u00e9\n"').value == 'a"b\\cé\n'  # type: ignore[union-attr]
    assert parse(r"'it\'s'").value == "it's"  # type: ignore[union-attr]


def test_dates() -> None:
    assert parse_date("1970-01-01") == 0.0
    assert parse_date("2024-02-30T00:00:00") == parse_date("2024-03-01")  # rolls over
    assert parse_date("2024-13-01") is None
    assert parse_date("2024-01-01T24:00") is None
    assert parse_date("2024-01-01Z") is None


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        ("", 0, "empty expression"),
        ('properties["a"] = 1', 16, "use '=='"),
        ('properties["a"] == ', 19, "end of expression"),
        ("properties[a] == 1", 11, "quoted property name"),
        ('"unterminated', 0, "unterminated string"),
        ('properties["a"] == 1 1', 21, "unexpected '1'"),
        ("(true", 5, "expected ')'"),
        ("frobnicate(1)", 0, "unknown name 'frobnicate'"),
        ("1 # 2", 2, "unexpected character '#'"),
        ('"\\q"', 1, "invalid escape"),
        ('[1, 2] in properties["a"]', 0, "right of 'in'"),
        ('properties["a"] in [properties["b"]]', 20, "lists may hold only"),
        ("number([1])", 7, "of a list"),
        ("1e999 > 1", 0, "number out of range"),
        ("(" * 100 + "1" + ")" * 100, 65, "nested deeper"),
        ('properties["a"] + [1]', 18, "arithmetic on a list"),
        ('defined properties["a"]', 8, "expected '(' after defined"),
    ],
)
def test_errors_point_at_the_position(text: str, position: int, fragment: str) -> None:
    with pytest.raises(WhereSyntaxError) as info:
        parse(text)
    assert info.value.position == position
    assert fragment in str(info.value)
    assert f"at position {position}" in str(info.value)


def test_too_long() -> None:
    with pytest.raises(WhereSyntaxError, match="longer than"):
        parse("1 + " * 5000 + "1")


# One profile, and what each construct must answer on it, as docs/query.md states it. The
# differential tests check that the SQL agrees with `matches`; these check `matches` itself.
PROFILE = {
    "plan": "pro",
    "name": "Ann Smith",
    "tags": ["vip", "beta"],
    "age": 31,
    "zip": "75011",
    "score": 2.5,
    "flag": True,
    "off": False,
    "nothing": None,
    "empty": "",
    "items": [],
    "$last_seen": "2024-03-01T12:00:00",
}


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('"vip" in properties["tags"]', True),  # list membership
        ('"vi" in properties["tags"]', False),  # an element, not a substring of one
        ('"Smith" in properties["name"]', True),  # substring of a string
        ('"smith" in properties["name"]', False),  # case-sensitive
        ('"x" not in properties["tags"]', True),
        ('"vip" not in properties["tags"]', False),
        ('properties["plan"] in ["free", "pro"]', True),
        ('defined(properties["plan"])', True),
        ('defined(properties["nothing"])', False),  # JSON null is not defined
        ('defined(properties["missing"])', False),
        ('not defined(properties["missing"])', True),
        ('properties["missing"] != "pro"', True),  # a missing property is != anything
        ('properties["missing"] == null', True),
        ('number(properties["zip"]) >= 10000', True),
        ('number("5") + 1 == 6', True),
        ('number("5x") == null', True),
        ("number(true) == 1", True),
        ('string(properties["age"]) == "31"', True),
        ('string(properties["score"]) == null', True),  # not a whole number
        ('string(properties["flag"]) == "true"', True),
        ('boolean(properties["empty"])', False),
        ('boolean(properties["items"])', False),
        ('boolean(properties["off"])', False),
        ('boolean(properties["plan"])', True),
        ('properties["age"] * 2 - 2 == 60', True),
        ('properties["age"] % 7 == 3', True),
        ('properties["age"] / 0 == null', True),
        ('properties["plan"] + 1 == null', True),  # arithmetic on numbers only
        ('"5" == 5', False),  # different kinds are never equal
        ("1 == 1.0", True),
        ('properties["tags"] == properties["tags"]', False),  # lists are never equal
        ('properties["plan"] > "free"', True),  # strings by code point
        ('properties["plan"] > 3', False),  # a string and a number: false
        ('properties["age"] >= 31 and properties["score"] < 3', True),
        ('properties["age"] > 40 or not properties["flag"]', False),
        ('datetime(properties["$last_seen"]) > "2024-02-29"', True),
        ('datetime(properties["$last_seen"]) < 1709251200', False),  # 2024-03-01T00:00:00Z
    ],
)
def test_each_construct_answers_as_documented(expr: str, expected: bool) -> None:
    assert matches(parse(expr), PROFILE) is expected
