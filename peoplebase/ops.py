"""The eight profile operations as pure functions on a profile (SPEC §3, §5).

A profile is a dict of properties, or None when it does not exist. `apply_update` applies one
validated update; the ordering of updates is the business of `merge.py`.
"""

from __future__ import annotations

import functools
import time as _time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .types import GEO_PROPERTIES, Props, Skip
from .values import ValueTooLarge, clean_number, composite_too_large, is_number, value_key

DEFAULT_MAX_PROPERTIES = 2000


def format_time(t: float) -> str:
    """`$last_seen` format: YYYY-MM-DDTHH:MM:SS, UTC."""
    return _format_second(int(t // 1))


@functools.lru_cache(maxsize=8192)
def _format_second(second: int) -> str:
    # replays format the same few seconds over and over: strftime is the costly part
    return _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(second))


class _Target:
    """A profile under change, enforcing the per-profile property limit."""

    __slots__ = ("props", "max_properties", "skips")

    def __init__(self, props: Props, max_properties: int, skips: list[Skip] | None) -> None:
        self.props = props
        self.max_properties = max_properties
        self.skips = skips

    def skip(self, field: str, message: str) -> None:
        if self.skips is not None:
            self.skips.append(Skip(field, message))

    def put(self, op: str, name: str, value: Any) -> None:
        props = self.props
        # $last_seen is derived (SPEC §5), not one of the properties the limit counts
        if name not in props and len(props) - ("$last_seen" in props) >= self.max_properties:
            self.skip(f"{op}.{name}", f"profile already has {self.max_properties} properties")
            return
        props[name] = value


def _room_for(t: _Target, values: Props) -> bool:
    """Whether every one of these names can be added: then no `put` would refuse one."""
    return len(t.props) + len(values) <= t.max_properties


def op_set(t: _Target, values: Props) -> None:
    if len(t.props) + len(values) <= t.max_properties:  # _room_for, without a call
        t.props.update(values)
        return
    for name, value in values.items():
        t.put("$set", name, value)


def op_set_once(t: _Target, values: Props) -> None:
    props = t.props
    if _room_for(t, values):
        for name, value in values.items():
            if name not in props:
                props[name] = value
        return
    for name, value in values.items():
        if name not in props:
            t.put("$set_once", name, value)


def op_add(t: _Target, values: dict[str, int | float]) -> None:
    props = t.props
    room = _room_for(t, values)
    for name, delta in values.items():
        current = props.get(name, 0)
        if not is_number(current):
            t.skip(f"$add.{name}", "existing value is not a number")
            continue
        try:
            total = clean_number(current + delta)
        except ValueTooLarge:
            t.skip(f"$add.{name}", "result out of range")
            continue
        if room:
            props[name] = total
        else:
            t.put("$add", name, total)


def _as_list(current: Any) -> list[Any]:
    if isinstance(current, list):
        return list(current)
    return [current]


def _put_list(t: _Target, op: str, name: str, new: list[Any]) -> None:
    if composite_too_large(new):
        t.skip(f"{op}.{name}", "list would exceed 262144 bytes")
        return
    t.put(op, name, new)


def op_union(t: _Target, values: dict[str, list[Any]]) -> None:
    props = t.props
    for name, items in values.items():
        new = _as_list(props[name]) if name in props else []
        seen = {value_key(v) for v in new}
        changed = name not in props or not isinstance(props[name], list)
        for item in items:
            key = value_key(item)
            if key not in seen:
                seen.add(key)
                new.append(item)
                changed = True
        if changed:
            _put_list(t, "$union", name, new)


def op_append(t: _Target, values: Props) -> None:
    props = t.props
    for name, item in values.items():
        new = _as_list(props[name]) if name in props else []
        new.append(item)
        _put_list(t, "$append", name, new)


def op_remove(t: _Target, values: Props) -> None:
    props = t.props
    for name, item in values.items():
        current = props.get(name)
        if isinstance(current, list):
            key = value_key(item)
            props[name] = [v for v in current if value_key(v) != key]


def op_unset(t: _Target, names: list[str]) -> None:
    props = t.props
    for name in names:
        props.pop(name, None)


OPERATIONS: dict[str, Callable[[_Target, Any], None]] = {
    "$set": op_set,
    "$set_once": op_set_once,
    "$add": op_add,
    "$union": op_union,
    "$append": op_append,
    "$remove": op_remove,
    "$unset": op_unset,
}

# Operations that do not bring a missing profile into being.
_NON_CREATING = frozenset({"$remove", "$unset"})


class Applicable(Protocol):
    """What applying an update reads of it: an `Update`, or a log entry being replayed."""

    @property
    def ops(self) -> dict[str, Any]: ...

    @property
    def ignore_time(self) -> bool: ...

    @property
    def geo(self) -> Props | None: ...

    @property
    def time(self) -> float: ...


def apply_update(
    profile: Props | None,
    update: Applicable,
    max_properties: int = DEFAULT_MAX_PROPERTIES,
    skips: list[Skip] | None = None,
    in_place: bool = False,
    stamp: bool = True,
) -> Props | None:
    """Apply one update to a profile and return the new profile (None: no profile).

    `update.time` must already be the time the update is recorded at. `stamp=False` leaves
    `$last_seen` as the operations leave it (for a replay that works it out itself).
    """
    ops = update.ops
    if "$delete" in ops:
        return None
    if profile is None:
        if not creates(ops):
            return None
        profile = {}
    elif not in_place:
        profile = dict(profile)
    target = _Target(profile, max_properties, skips)
    if update.geo and not names_geo(ops.get("$set")):
        op_set(target, update.geo)
    for op, value in ops.items():
        OPERATIONS[op](target, value)
    if stamp and not update.ignore_time:
        profile["$last_seen"] = _format_second(int(update.time // 1))  # format_time, inlined
    return profile


def names_geo(values: Props | None) -> bool:
    """Whether a $set names a geolocation property (then the implicit geo $set is skipped)."""
    return bool(values) and any(name in values for name in GEO_PROPERTIES)  # type: ignore[operator]


def creates(ops: dict[str, Any]) -> bool:
    """Whether an update's operations bring a missing profile into being (not a $delete)."""
    return "$delete" not in ops and not all(op in _NON_CREATING for op in ops)


def touched(update: Applicable) -> set[str] | None:
    """The properties an update may change, `$last_seen` aside; None for a $delete."""
    ops = update.ops
    if "$delete" in ops:
        return None
    names: set[str] = set()
    for value in ops.values():
        names.update(value)  # the names of an object, or $unset's list of names
    if update.geo and not names_geo(ops.get("$set")):
        names.update(update.geo)
    return names


@dataclass(slots=True)
class Part:
    """Some of an update's operations and geolocation, with its time and `$ignore_time`."""

    ops: dict[str, Any]
    ignore_time: bool
    geo: Props | None
    time: float


def restricted(update: Applicable, names: set[str]) -> Part:
    """The part of a (non-$delete) update that changes only the given properties.

    Applied to a profile that exists, it changes those properties exactly as the whole update
    would (each operation acts on each property independently, as long as the property limit
    is not reached), and `$last_seen` as the whole update would.
    """
    ops: dict[str, Any] = {}
    for op, value in update.ops.items():
        if op == "$unset":
            kept: Any = [name for name in value if name in names]
        else:
            kept = {name: v for name, v in value.items() if name in names}
        if kept:
            ops[op] = kept
    geo = None
    if update.geo and not names_geo(update.ops.get("$set")):
        geo = {name: v for name, v in update.geo.items() if name in names} or None
    return Part(ops, update.ignore_time, geo, update.time)
