"""Raw update record (a decoded JSON object) → validated `Update` or `Rejection` (SPEC §2, §6).

Everything a record can get wrong is decided here, before anything is stored: the envelope
(`$token`, `$distinct_id`, `$time`), the operations and their value types, and the size
limits. Keys that cannot be kept are skipped and reported; they never invalidate the record.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from typing import Any

import orjson

from .types import KNOWN_OPS, OP_ORDER, Rejection, Skip, Update
from .values import (
    INT64_MAX,
    INT64_MIN,
    MAX_NAME_CHARS,
    NUL,
    NUL_MESSAGE,
    SHORT_STRING_CHARS,
    ValueTooLarge,
    clean_number,
    composite_too_large,
    is_number,
    sanitize,
    sanitize_property,
    truncate_name,
)

MAX_DISTINCT_ID_CHARS = 255
MS_THRESHOLD = 1e11
RESERVED_IN_SET = frozenset({"$ip", "$ignore_time"})
_DECIMAL = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)\s*$")
_NUMERIC = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$")

OPS_HELP = (
    "no operation: expected one of $set, $set_once, $add, $union, $append, $remove, $unset, $delete"
)


def truthy(value: Any) -> bool:
    """Flags are true for true, 1, "true" and "1" (SPEC §2)."""
    if value is True:
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 1
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1")
    return False


def parse_time(value: Any) -> float | None:
    """`$time` → seconds since the epoch; None when it is not a usable time."""
    kind = type(value)
    if kind is int or kind is float:  # what the SDKs send; bool is not int's type
        t = float(value)
        if not math.isfinite(t) or t < 0:
            return None
        return t / 1000.0 if t >= MS_THRESHOLD else t
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        if not _NUMERIC.match(value):
            return None
        value = float(value)
    if not isinstance(value, (int, float)):
        return None
    t = float(value)
    if not math.isfinite(t) or t < 0:
        return None
    if abs(t) >= MS_THRESHOLD:
        t /= 1000.0
    return t


def distinct_id_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if is_number(value):
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            return str(int(value))
        return str(value)
    return None


def record_identity(raw: dict[str, Any]) -> int:
    """A stable 63-bit identity of a whole record, for recognising retries."""
    digest = hashlib.blake2b(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS), digest_size=8)
    return int.from_bytes(digest.digest(), "big") >> 1


class Validator:
    """Validates records of one server; `token_known` answers for closed mode (None: open)."""

    def __init__(
        self,
        time_skew: float = 60.0,
        max_record_bytes: int = 1_000_000,
        token_known: Callable[[str], bool] | None = None,
        geo: Callable[[dict[str, Any], str | None], dict[str, Any] | None] | None = None,
    ) -> None:
        self.time_skew = time_skew
        self.max_record_bytes = max_record_bytes
        self.token_known = token_known
        self.geo = geo

    def validate(
        self,
        raw: Any,
        index: int,
        now: float,
        check_size: bool = False,
        request_ip: str | None = None,
    ) -> Update | Rejection:
        if not isinstance(raw, dict):
            return Rejection(index, None, "record", "must be a JSON object")
        did = raw.get("$distinct_id")
        if type(did) is not str:
            did = distinct_id_of(did)
        token = raw.get("$token")
        if not isinstance(token, str) or not token:
            return Rejection(index, did, "$token", "missing or empty")
        if did is None or did == "":
            return Rejection(index, did, "$distinct_id", "missing or empty")
        if NUL in did or NUL in token:
            field = "$distinct_id" if NUL in did else "$token"
            return Rejection(index, did.replace(NUL, ""), field, NUL_MESSAGE)
        if len(did) > MAX_DISTINCT_ID_CHARS:
            return Rejection(
                index, did[:64], "$distinct_id", f"longer than {MAX_DISTINCT_ID_CHARS} characters"
            )
        if check_size and len(orjson.dumps(raw)) > self.max_record_bytes:
            return Rejection(index, did, "record", f"larger than {self.max_record_bytes} bytes")
        if self.token_known is not None and not self.token_known(token):
            return Rejection(index, did, "$token", "unknown project")

        raw_time = raw.get("$time")
        explicit = raw_time is not None
        if explicit:
            parsed = parse_time(raw_time)
            if parsed is None:
                return Rejection(
                    index,
                    did,
                    "$time",
                    "must be a number of seconds or milliseconds since the epoch",
                )
            clamped = parsed > now + self.time_skew
            t = now if clamped else parsed
        else:
            t = now

        present = raw.keys() & KNOWN_OPS
        if "$delete" in present:
            if len(present) > 1:
                return Rejection(index, did, "$delete", "cannot be combined with other operations")
            ops: dict[str, Any] = {"$delete": True}
            skips: list[Skip] = []
        else:
            if not present:
                return Rejection(index, did, "record", OPS_HELP)
            ops = {}
            skips = []
            # applied in OP_ORDER
            for op in present if len(present) == 1 else [o for o in OP_ORDER if o in present]:
                result = _CHECKERS[op](raw[op], skips)
                if isinstance(result, str):
                    return Rejection(index, did, op, result)
                ops[op] = result

        update = Update(  # positionally: the fields in their order (types.py)
            index,
            token,
            did,
            t,
            explicit,
            False if (flag := raw.get("$ignore_time")) is None else truthy(flag),
            ops,
            now,
            None,  # geo
            record_identity(raw) if explicit else None,  # dedup
            explicit and clamped,
            skips,
        )
        if self.geo is not None and ("$set" in ops or "$set_once" in ops):
            update.geo = self.geo(raw, request_ip)
        return update


# --- per-operation checks: return the sanitized value, or an error message (str) -----------


def _props(op: str, value: Any, skips: list[Skip], convert: Callable[[str, Any], Any]) -> Any:
    if not isinstance(value, dict):
        return "must be an object"
    out: dict[str, Any] = {}
    for name, item in value.items():
        key = truncate_name(name) if len(name) > MAX_NAME_CHARS else name
        if NUL in key:
            skips.append(Skip(f"{op}.{key.replace(NUL, '')}", NUL_MESSAGE))
            continue
        try:
            out[key] = convert(key, item)
        except ValueTooLarge as exc:
            skips.append(Skip(f"{op}.{key}", str(exc)))
    return out


class _Reserved(ValueTooLarge):
    pass


def _set_value(name: str, item: Any) -> Any:
    """One property of $set / $set_once, by the rules (the shortcut below keeps the same)."""
    if name in RESERVED_IN_SET:
        raise _Reserved(f"reserved: send {name} at the top level of the record")
    return sanitize_property(item)


def _settable(op: str) -> Callable[[Any, list[Skip]], Any]:
    convert = _set_value

    def check(value: Any, skips: list[Skip]) -> Any:
        if type(value) is not dict:
            return _props(op, value, skips, convert)
        # the common case without a call per property: short strings, 64-bit integers,
        # booleans and null under plain names are kept as they are (what convert returns)
        for name, item in value.items():
            kind = type(item)
            if not (
                (kind is str and len(item) <= SHORT_STRING_CHARS and NUL not in item)
                or (kind is int and INT64_MIN <= item <= INT64_MAX)
                or kind is bool
                or item is None
            ) or (len(name) > MAX_NAME_CHARS or NUL in name or name in RESERVED_IN_SET):
                return _props(op, value, skips, convert)
        return dict(value)

    return check


def _add_value(name: str, item: Any) -> int | float:
    if is_number(item):
        return clean_number(item)
    if isinstance(item, str) and _DECIMAL.match(item):
        text = item.strip()
        try:
            number = float(text) if ("." in text) else int(text)
        except ValueError as exc:  # more digits than int() converts (4300)
            raise ValueTooLarge("number out of range") from exc
        return clean_number(number)
    raise ValueTooLarge("not a number")


def _union_value(name: str, item: Any) -> list[Any]:
    items = item if isinstance(item, list) else [item]
    clean = sanitize(items)
    if composite_too_large(clean):
        raise ValueTooLarge("list or object values are limited to 262144 bytes")
    return list(clean)


def _check_unset(value: Any, skips: list[Skip]) -> Any:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return "must be a list of property names"
    names = []
    for i, name in enumerate(value):
        if isinstance(name, str) and NUL in name:
            skips.append(Skip(f"$unset[{i}]", NUL_MESSAGE))
        elif isinstance(name, str):
            names.append(truncate_name(name))
        else:
            skips.append(Skip(f"$unset[{i}]", "property names must be strings"))
    return names


_CHECKERS: dict[str, Callable[[Any, list[Skip]], Any]] = {
    "$set": _settable("$set"),
    "$set_once": _settable("$set_once"),
    "$add": lambda v, s: _props("$add", v, s, _add_value),
    "$union": lambda v, s: _props("$union", v, s, _union_value),
    "$append": lambda v, s: _props("$append", v, s, lambda n, i: sanitize_property(i)),
    "$remove": lambda v, s: _props("$remove", v, s, lambda n, i: sanitize(i)),
    "$unset": _check_unset,
}
assert set(_CHECKERS) | {"$delete"} == KNOWN_OPS
