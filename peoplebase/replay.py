"""Replaying only the properties that late updates touch, with the result of the whole fold.

A profile is the fold of its log in ($time, arrival) order. When some entries (`late`: the late
updates of a group, and the updates that arrived after them) are missing from the current
state, the state with them differs only in the properties they touch and `$last_seen`, since
each operation acts on each property on its own. Each such property is replayed from the last
point where its value is known, through the entries that touch it (`LogIndex.by_name`):

- the last entry that overwrites it (`$set`, `$unset`, geolocation's implicit `$set`): what
  came before does not matter; if that entry is not late and comes after every late entry
  touching the property, the current value is already right and nothing is replayed;
- the first late entry touching it, when every other entry touching it comes before: the
  current state holds the value it meets;
- else the base snapshot, or nothing where the profile comes into being.

Late entries that may skip a key of the property (`$add`, `$union`, `$append`: that depends on
the value they meet, and the skips are reported) are replayed too: the replay starts before
the first of them. `$last_seen` is set by every entry without `$ignore_time` and may be named
by operations: its value is the last such stamp, then the operations naming it after that.

This is exact while the property limit cannot be reached and the log holds no `$delete`; else,
and when a late entry would create the profile earlier (geolocation and `$last_seen` apply only
to a profile that exists), `refold` answers None before collecting any skip, and the caller
folds the whole log.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterable, Sequence
from itertools import repeat
from typing import TYPE_CHECKING

from .logindex import LOG_ORDER, LogIndex, names_of
from .ops import apply_update, format_time, names_geo, restricted, touched
from .types import Props, Skip

if TYPE_CHECKING:
    from .merge import LogEntry

# where a property's replay starts from (besides a value)
_MISSING = object()  # absent
_BASE = object()  # its value in the base snapshot
_CURRENT = object()  # its value in the current state
# operations whose keys may be skipped depending on the value they meet
_SKIPPING = ("$add", "$union", "$append")
_LAST_SEEN = "$last_seen"


def refold(
    current: Props,
    base: Props | None,
    log: LogIndex,
    late: Sequence[LogEntry],
    max_properties: int,
    watch: dict[int, list[Skip]] | None = None,
) -> Props | None:
    """The fold of `log` from `base`, when `current` is that fold without the `late` entries.

    `watch` maps the seqs of late entries to the lists their skipped keys go to. None: not
    exact this way (see the module's doc), nothing collected.
    """
    if log.deletes:
        return None
    changed = {entry.seq for entry in late}
    first = None  # the entry that creates the profile (when the base does not exist)
    if base is None:
        first = log.first_creator
        if first is None or first.seq in changed:
            return None
    by_name = log.by_name
    if len(base or ()) + len(by_name) >= max_properties:
        everything = set(by_name)
        everything.update(base or ())
        # the limit is never reached, whatever the order: no addition is ever skipped for it (an
        # explicit `$last_seen`, not counted itself, is an addition when absent: hence <)
        everything.discard(_LAST_SEEN)
        if len(everything) >= max_properties:
            return None
    counts: dict[str, int] = {}  # property -> late entries touching it
    risky: dict[str, LogEntry] = {}  # property -> the first late entry that may skip it
    stamped = False  # some late entry sets `$last_seen`
    for entry in sorted(late, key=LOG_ORDER):
        for name in touched(entry) or ():
            counts[name] = counts.get(name, 0) + 1
        ops = entry.ops
        for op in _SKIPPING:
            for name in ops.get(op, ()):
                risky.setdefault(name, entry)
        stamped = stamped or not entry.ignore_time

    first_key = LOG_ORDER(first) if first is not None else None
    sub: Props = {}  # the replayed properties' values
    replayed: list[str] = []
    # the entries to apply, each list in LOG_ORDER, and the properties they replay
    windows: list[tuple[list[LogEntry], set[str]]] = []
    for name, count in counts.items():
        if name == _LAST_SEEN:
            continue
        listed = by_name[name]
        found = _start(listed, name, changed, count, risky.get(name), first_key)
        if found is None:
            continue
        start, value = found
        if value is _BASE:
            value = base.get(name, _MISSING) if base is not None else _MISSING
        elif value is _CURRENT:
            value = current.get(name, _MISSING)
        if value is not _MISSING:
            sub[name] = value
        replayed.append(name)
        _window(windows, listed[start:], name)

    entries = log.entries
    seen_at = -2  # `$last_seen` not replayed; else the position up to which `seen` holds
    seen: object = _MISSING
    if stamped or _LAST_SEEN in counts:
        first_at = log.position(first) if first is not None else 0
        found = _last_seen_start(log, changed, risky.get(_LAST_SEEN), first_at)
        if found is not None:
            seen_at, seen = found
            if seen is _BASE:
                seen = base.get(_LAST_SEEN, _MISSING) if base is not None else _MISSING
            named = by_name.get(_LAST_SEEN, [])
            after = 0
            if seen_at >= 0:
                after = bisect.bisect_right(named, LOG_ORDER(entries[seen_at]), key=LOG_ORDER)
            if after < len(named):
                _window(windows, named[after:], _LAST_SEEN)

    for entry, names in _steps(windows):
        at = -1
        if _LAST_SEEN in names:
            # the stamps of the entries since the last one replaying it, then this entry
            at = log.position(entry)
            stamp = _last_stamp(log, seen_at, at)
            if stamp is not None:
                seen = format_time(stamp.time)
            if seen is _MISSING:
                sub.pop(_LAST_SEEN, None)
            else:
                sub[_LAST_SEEN] = seen
        part = entry if len(names) == len(names_of(entry) or ()) else restricted(entry, names)
        skips = watch.get(entry.seq) if watch else None
        apply_update(sub, part, max_properties, skips, in_place=True, stamp=False)
        if at >= 0:
            if entry.ignore_time:
                seen = sub.get(_LAST_SEEN, _MISSING)
            else:
                seen = format_time(entry.time)
            seen_at = at

    out = dict(current)
    for name in replayed:
        if name in sub:
            out[name] = sub[name]
        else:
            out.pop(name, None)
    if seen_at > -2:
        stamp = log.last_stamp
        if stamp is not None and (seen_at < 0 or LOG_ORDER(stamp) > LOG_ORDER(entries[seen_at])):
            seen = format_time(stamp.time)
        if seen is _MISSING:
            out.pop(_LAST_SEEN, None)
        else:
            out[_LAST_SEEN] = seen
    return out


def _window(
    windows: list[tuple[list[LogEntry], set[str]]], entries: list[LogEntry], name: str
) -> None:
    """Add the entries replaying a property; properties replayed through the same entries (the
    names of one `$add`, say) share one pass."""
    for other, names in windows:
        if len(other) == len(entries) and all(map(operator.is_, other, entries)):
            names.add(name)
            return
    windows.append((entries, {name}))


def _steps(
    windows: list[tuple[list[LogEntry], set[str]]],
) -> Iterable[tuple[LogEntry, set[str]]]:
    """Every entry of the windows once, in LOG_ORDER, with the properties it replays."""
    if len(windows) == 1:
        entries, names = windows[0]
        return zip(entries, repeat(names))
    plan: dict[int, tuple[LogEntry, set[str]]] = {}
    for entries, names in windows:
        for entry in entries:
            found = plan.get(id(entry))
            if found is None:
                plan[id(entry)] = (entry, set(names))
            else:
                found[1].update(names)
    return sorted(plan.values(), key=_entry_order)


def _entry_order(item: tuple[LogEntry, set[str]]) -> tuple[float, int]:
    return LOG_ORDER(item[0])


def _overwrites(entry: LogEntry, name: str) -> bool:
    """Whether an entry leaves the property with a value that does not depend on the one it
    met (it sets or unsets it, or its geolocation sets it)."""
    ops = entry.ops
    values = ops.get("$set")
    if values and name in values:
        return True
    unset = ops.get("$unset")
    if unset and name in unset:
        return True
    geo = entry.geo
    return geo is not None and name in geo and not names_geo(values)


def _start(
    listed: list[LogEntry],
    name: str,
    changed: set[int],
    count: int,
    risky: LogEntry | None,
    first_key: tuple[float, int] | None,
) -> tuple[int, object] | None:
    """Where the replay of a property starts in `listed` (the entries touching it) and the
    value it starts with (or _BASE, _CURRENT); None when its current value is right.

    `count` late entries touch it, `risky` is the first that may skip it, and entries before
    `first_key` come before the profile exists. Walks back from the newest entry, over the
    entries the replay applies anyway.
    """
    bound = LOG_ORDER(risky) if risky is not None else None
    left = count  # late entries touching it, not walked yet
    only_late = True  # every entry walked is a late one
    i = len(listed)
    while i:
        entry = listed[i - 1]
        key = LOG_ORDER(entry)
        if first_key is not None and key < first_key:
            break  # the profile does not exist yet: nothing before has any effect
        late = entry.seq in changed
        if (bound is None or key < bound) and _overwrites(entry, name):
            if bound is None and not late and left == count:
                return None  # overwritten after every late entry touching it
            return i - 1, _MISSING
        if late:
            left -= 1
            if not left and only_late:
                return i - 1, _CURRENT  # the first late one, and nothing else after it
        else:
            only_late = False
        i -= 1
    return i, _BASE


def _last_seen_start(
    log: LogIndex, changed: set[int], risky: LogEntry | None, first_at: int
) -> tuple[int, object] | None:
    """Where the replay of `$last_seen` starts: a position in the log's entries and the value
    after it (or _BASE); None when its current value is right.

    Its last overwrite is the last stamp (an entry without `$ignore_time`: the stamp comes
    after the entry's operations) unless a `$set` or `$unset` naming it comes after that; when
    a late entry may skip it, the last overwrite before that entry. Entries before `first_at`
    come before the profile exists.
    """
    if risky is not None:
        entries = log.entries
        i = log.position(risky)
        while i > first_at:  # over the entries without a stamp: few, but for this odd case
            entry = entries[i - 1]
            if not entry.ignore_time:
                return i - 1, format_time(entry.time)
            if _overwrites(entry, _LAST_SEEN):
                return i - 2, _MISSING  # replayed from this entry on
            i -= 1
        return first_at - 1, _BASE
    stamp = log.last_stamp
    stamp_at = log.position(stamp) if stamp is not None else -1
    floor = max(stamp_at, first_at - 1)
    touched_late = False  # a late entry naming it comes after the overwrite
    for entry in reversed(log.by_name.get(_LAST_SEEN, ())):  # after the last stamp
        at = log.position(entry)
        if at <= floor:
            break
        if _overwrites(entry, _LAST_SEEN):
            if entry.seq not in changed and not touched_late:
                return None
            return at - 1, _MISSING  # replayed from this entry on
        touched_late = touched_late or entry.seq in changed
    if stamp is None or stamp_at < first_at:
        return first_at - 1, _BASE
    if stamp.seq not in changed and not touched_late:
        return None
    return stamp_at, format_time(stamp.time)


def _last_stamp(log: LogIndex, after: int, before: int) -> LogEntry | None:
    """The last entry without `$ignore_time` between two positions of the log (both excluded).
    Only a late entry that may skip `$last_seen` starts its replay before the last stamp: else
    there is none, and nothing is walked."""
    stamp = log.last_stamp
    if stamp is None or log.position(stamp) <= after:
        return None
    entries = log.entries
    for i in range(before - 1, after, -1):
        if not entries[i].ignore_time:
            return entries[i]
    return None
