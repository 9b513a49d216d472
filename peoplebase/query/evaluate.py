"""The reference meaning of a `where` expression, evaluated in Python on one profile.

This module *defines* the semantics; the SQL compiler must agree with it on every profile
(a differential test checks that on random expressions and profiles). The rules:

- Values are null (a missing property reads as null), booleans, numbers (all numbers are
  64-bit floats: `1` and `1.0` are equal), strings, lists and objects.
- `==` is true for two equal numbers, strings or booleans, and for null == null. Values of
  different kinds are never equal (`1 == "1"` is false); lists and objects are never equal.
  `!=` is the negation of `==`.
- `<`, `<=`, `>`, `>=` compare two numbers, or two strings by code point; anything else is
  false. A datetime compares with a datetime (see `datetime`).
- `a in b`: b a list → some element of b equals a; b a string and a a string → a is a
  substring of b; otherwise false.
- `and`, `or`, `not` work on truth values; a non-boolean value used as a condition is read
  with `boolean()`. Conditions are never null: the result is always true or false.
- Arithmetic works on numbers only (anything else gives null). `/` and `%` by zero give null;
  `%` is `a - b * trunc(a / b)` (the sign follows a).
- `number(x)`: numbers as they are, true → 1, false → 0, strings written as
  `-?[0-9]+(.[0-9]+)?` (at most 300 characters) → their value, anything else → null.
- `string(x)`: strings as they are, booleans → "true"/"false", whole numbers below 1e15 in
  magnitude → their digits; anything else → null.
- `boolean(x)`: null → false, numbers → not zero, strings/lists/objects → not empty.
- `datetime(x)`: a number is seconds since the epoch (milliseconds when |x| ≥ 1e11);
  a string `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM` or `YYYY-MM-DDTHH:MM:SS` (a space may replace
  the `T`, a final `Z` is allowed after the time) is read as UTC, with year ≥ 1, month 1-12,
  day 1-31 (a day past the month's end rolls over), hour 0-23, minute and second 0-59;
  anything else → null.
- `defined(x)`: x is not null (a property holding JSON null is not defined).
"""

from __future__ import annotations

import math
import re
from typing import Any

from .where import (
    Arith,
    BoolOp,
    Call,
    Compare,
    In,
    ListLiteral,
    Literal,
    Node,
    Not,
    Prop,
)

NUMBER_TEXT = re.compile(r"-?[0-9]+(\.[0-9]+)?")
DATE_TEXT = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})(?:[T ]([0-9]{2}):([0-9]{2})(?::([0-9]{2}))?Z?)?"
)
MAX_NUMBER_TEXT = 300
MS_THRESHOLD = 1e11
MAX_EXACT_INT = 1e15


def matches(node: Node, props: dict[str, Any]) -> bool:
    """Does a profile with these properties match the expression?"""
    return truthy(value(node, props))


def _norm(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


def _is_num(v: Any) -> bool:
    return isinstance(v, float)


def value(node: Node, props: dict[str, Any]) -> Any:
    if isinstance(node, Literal):
        return node.value
    if isinstance(node, ListLiteral):
        return [item.value for item in node.items]
    if isinstance(node, Prop):
        return _norm(props.get(node.name))
    if isinstance(node, Not):
        return not truthy(value(node.operand, props))
    if isinstance(node, BoolOp):
        left = truthy(value(node.left, props))
        if node.op == "and":
            return left and truthy(value(node.right, props))
        return left or truthy(value(node.right, props))
    if isinstance(node, Compare):
        a, b = value(node.left, props), value(node.right, props)
        if node.op == "==":
            return equal(a, b)
        if node.op == "!=":
            return not equal(a, b)
        return compare(node.op, a, b)
    if isinstance(node, In):
        return contains(value(node.right, props), value(node.left, props))
    if isinstance(node, Arith):
        return arith(node.op, value(node.left, props), value(node.right, props))
    if isinstance(node, Call):
        arg = value(node.arg, props)
        if node.fn == "defined":
            return arg is not None
        if node.fn == "boolean":
            return truthy(arg)
        if node.fn == "number":
            return to_number(arg)
        if node.fn == "string":
            return to_string(arg)
        return to_datetime(arg)
    raise TypeError(f"not a where node: {node!r}")


def equal(a: Any, b: Any) -> bool:
    a, b = _norm(a), _norm(b)
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_num(a) and _is_num(b):
        return bool(a == b)
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    return False


def compare(op: str, a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    if not ((_is_num(a) and _is_num(b)) or (isinstance(a, str) and isinstance(b, str))):
        return False
    if op == "<":
        return bool(a < b)
    if op == "<=":
        return bool(a <= b)
    if op == ">":
        return bool(a > b)
    return bool(a >= b)


def contains(container: Any, item: Any) -> bool:
    if isinstance(container, list):
        return any(equal(item, element) for element in container)
    if isinstance(container, str) and isinstance(item, str):
        return item in container
    return False


def truthy(v: Any) -> bool:
    v = _norm(v)
    if v is None:
        return False
    if isinstance(v, bool):
        return v
    if _is_num(v):
        return bool(v != 0)
    if isinstance(v, str | list | dict):
        return len(v) > 0
    return False


def arith(op: str, a: Any, b: Any) -> float | None:
    if not (_is_num(a) and _is_num(b)) or isinstance(a, bool) or isinstance(b, bool):
        return None
    if op == "+":
        return float(a + b)
    if op == "-":
        return float(a - b)
    if op == "*":
        return float(a * b)
    if b == 0:
        return None
    if op == "/":
        return float(a / b)
    q = a / b
    if not math.isfinite(q):
        return None
    return float(a - b * math.trunc(q))


def to_number(v: Any) -> float | None:
    v = _norm(v)
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if _is_num(v):
        return float(v)
    if isinstance(v, str) and len(v) <= MAX_NUMBER_TEXT and NUMBER_TEXT.fullmatch(v):
        return float(v)
    return None


def to_string(v: Any) -> str | None:
    v = _norm(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if _is_num(v) and abs(v) < MAX_EXACT_INT and v == math.trunc(v):
        return str(math.trunc(v))
    return None


def to_datetime(v: Any) -> float | None:
    """Seconds since the epoch, or None."""
    v = _norm(v)
    if isinstance(v, bool) or v is None:
        return None
    if _is_num(v):
        return float(v / 1000.0) if abs(v) >= MS_THRESHOLD else float(v)
    if isinstance(v, str):
        return parse_date(v)
    return None


def parse_date(text: str) -> float | None:
    m = DATE_TEXT.fullmatch(text)
    if m is None:
        return None
    year, month, day = int(m.group(1)), int(m.group(2)), int(m.group(3))
    hour = int(m.group(4) or 0)
    minute = int(m.group(5) or 0)
    second = int(m.group(6) or 0)
    if text.endswith("Z") and m.group(4) is None:
        return None
    if not (year >= 1 and 1 <= month <= 12 and 1 <= day <= 31):
        return None
    if not (hour <= 23 and minute <= 59 and second <= 59):
        return None
    return float(days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second)


def days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (year ≥ 1); the SQL is the same."""
    y -= 1 if m <= 2 else 0
    era = y // 400
    yoe = y - era * 400
    mp = m - 3 if m > 2 else m + 9
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468
