"""JSON value rules: equality with types kept apart, and the size limits of SPEC §6."""

from __future__ import annotations

import math
from typing import Any

import orjson

MAX_NAME_CHARS = 255
MAX_STRING_BYTES = 255
MAX_COMPOSITE_BYTES = 256 * 1024
MAX_OBJECT_DEPTH = 3
MAX_OBJECT_KEYS = 255
INT64_MAX = 2**63 - 1
INT64_MIN = -INT64_MAX - 1
# characters a string may have and still be within MAX_STRING_BYTES whatever they are
SHORT_STRING_CHARS = MAX_STRING_BYTES // 4


class ValueTooLarge(ValueError):
    """A list or object value over the limits; the key holding it is skipped."""


NUL = "\x00"
NUL_MESSAGE = "NUL characters (\\u0000) are not accepted"  # PostgreSQL cannot store them


def value_key(value: Any) -> Any:
    """A hashable identity for JSON equality: 1 == 1.0, but 1, true and "1" differ."""
    if value is None:
        return ("z",)
    if value is True or value is False:
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", value)
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, list):
        return ("l", tuple(value_key(v) for v in value))
    if isinstance(value, dict):
        return ("d", frozenset((k, value_key(v)) for k, v in value.items()))
    return ("?", repr(value))


def json_equal(a: Any, b: Any) -> bool:
    return bool(value_key(a) == value_key(b))


def truncate_string(s: str) -> str:
    """Cut a string to 255 UTF-8 bytes on a character boundary."""
    if len(s) <= SHORT_STRING_CHARS:
        return s
    b = s.encode("utf-8", "surrogatepass")
    if len(b) <= MAX_STRING_BYTES:
        return s
    return b[:MAX_STRING_BYTES].decode("utf-8", "ignore")


def truncate_name(name: str) -> str:
    return name if len(name) <= MAX_NAME_CHARS else name[:MAX_NAME_CHARS]


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def clean_number(value: int | float) -> int | float:
    """Keep numbers storable: integers past 64 bits become floats; non-finite is refused."""
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return value
        try:
            value = float(value)
        except OverflowError as exc:  # past ~1e308
            raise ValueTooLarge("number out of range") from exc
    if not math.isfinite(value):
        raise ValueTooLarge("number out of range")
    return value


def sanitize(value: Any, depth: int = 0) -> Any:
    """Apply SPEC §6 to a property value: truncate strings, bound numbers, check nesting.

    Raises ValueTooLarge when the value must be skipped (object too deep or too wide,
    number out of range). The 256 KB size check is done by the caller on composites.
    """
    if isinstance(value, str):
        if NUL in value:
            raise ValueTooLarge(NUL_MESSAGE)
        return truncate_string(value)
    if value is None or value is True or value is False:
        return value
    if isinstance(value, (int, float)):
        return clean_number(value)
    if isinstance(value, list):
        return [sanitize(v, depth) for v in value]
    if isinstance(value, dict):
        if depth >= MAX_OBJECT_DEPTH:
            raise ValueTooLarge(f"objects may nest at most {MAX_OBJECT_DEPTH} levels")
        if len(value) > MAX_OBJECT_KEYS:
            raise ValueTooLarge(f"objects may have at most {MAX_OBJECT_KEYS} keys")
        if any(NUL in str(k) for k in value):
            raise ValueTooLarge(NUL_MESSAGE)
        return {truncate_name(str(k)): sanitize(v, depth + 1) for k, v in value.items()}
    raise ValueTooLarge(f"unsupported value type {type(value).__name__}")


def composite_too_large(value: Any) -> bool:
    """True when a list or object serializes to more than 256 KB."""
    if not isinstance(value, (list, dict)):
        return False
    if (
        isinstance(value, list)
        and len(value) < 64
        and not any(isinstance(v, (list, dict)) for v in value)
    ):
        return False  # 63 strings of 255 bytes stay far below the limit
    return len(orjson.dumps(value)) > MAX_COMPOSITE_BYTES


def sanitize_property(value: Any) -> Any:
    """sanitize() plus the size limit; raises ValueTooLarge with a message for strict mode."""
    # fast path for the common scalars, which sanitize() would return unchanged
    kind = type(value)
    if kind is str:
        if len(value) <= SHORT_STRING_CHARS and NUL not in value:
            return value
    elif kind is int:
        if INT64_MIN <= value <= INT64_MAX:
            return value
    elif kind is bool or value is None:
        return value
    clean = sanitize(value)
    if composite_too_large(clean):
        raise ValueTooLarge(f"list or object values are limited to {MAX_COMPOSITE_BYTES} bytes")
    return clean
