"""A profile's update log in replay order, indexed by the properties its entries touch.

A late update changes only the properties it names, so what it costs should depend on the
entries that touch those properties, not on the whole log. `LogIndex` keeps a log's entries
in ($time, arrival) order and, for each property, the entries whose operations name it or
whose geolocation sets it, in the same order (what `replay.refold` reads). The merger builds
it when a late update needs it, keeps it up to date as entries are added, and keeps it with
the profile's row (`ProfileRow.log_index`) for as long as the row object lives.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Callable, Collection, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

from .ops import creates, touched

if TYPE_CHECKING:
    from .merge import LogEntry

# ($time, arrival): the order a profile's log is replayed in
LOG_ORDER: Callable[[Any], tuple[float, int]] = operator.attrgetter("time", "seq")


def insort(entries: list[LogEntry], entry: LogEntry) -> None:
    """Put an entry in its place in a list in LOG_ORDER (at the end, usually)."""
    _insert(entries, entry, LOG_ORDER(entry))


def _insert(entries: list[LogEntry], entry: LogEntry, key: tuple[float, int]) -> None:
    if not entries or LOG_ORDER(entries[-1]) < key:
        entries.append(entry)
    else:
        entries.insert(bisect.bisect_right(entries, key, key=LOG_ORDER), entry)


def names_of(entry: LogEntry) -> Collection[str] | None:
    """The properties an entry touches (`ops.touched`), without making a set when it has one
    operation naming properties of an object and no geolocation (most entries)."""
    ops = entry.ops
    if len(ops) == 1 and not entry.geo:
        for op, value in ops.items():
            if op != "$unset" and op != "$delete":
                return value.keys()
    return touched(entry)


class LogIndex:
    """The entries of a log in LOG_ORDER, and for each property the entries touching it."""

    __slots__ = ("entries", "by_name", "deletes", "first_creator", "last_stamp")

    def __init__(self, entries: list[LogEntry]) -> None:
        """Index `entries`, which must be in LOG_ORDER. The index keeps the list and adds to
        it: from then on the list changes through `add` only."""
        self.entries = entries
        # property -> the entries whose operations name it, or whose geolocation sets it
        self.by_name: dict[str, list[LogEntry]] = {}
        self.deletes = 0  # $delete entries
        self.first_creator: LogEntry | None = None  # the first entry that creates a profile
        self.last_stamp: LogEntry | None = None  # the last entry that stamps `$last_seen`
        by_name = self.by_name
        get = by_name.get
        first = None
        stamp = None
        for entry in entries:
            names = names_of(entry)
            if names is None:
                self.deletes += 1
                continue
            for name in names:
                listed = get(name)
                if listed is None:
                    by_name[name] = [entry]
                else:
                    listed.append(entry)
            if first is None and creates(entry.ops):
                first = entry
            if not entry.ignore_time:
                stamp = entry
        self.first_creator = first
        self.last_stamp = stamp

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: LogEntry) -> None:
        """Put a new entry in its place (at the end of every list, when it is the newest)."""
        key = LOG_ORDER(entry)
        entries = self.entries
        newest = not entries or LOG_ORDER(entries[-1]) < key
        if newest:
            entries.append(entry)
        else:
            _insert(entries, entry, key)
        names = names_of(entry)
        if names is None:
            self.deletes += 1
            return
        by_name = self.by_name
        for name in names:
            listed = by_name.get(name)
            if listed is None:
                by_name[name] = [entry]
            elif newest:
                listed.append(entry)
            else:
                _insert(listed, entry, key)
        first = self.first_creator
        if (first is None or (not newest and key < LOG_ORDER(first))) and creates(entry.ops):
            self.first_creator = entry
        stamp = self.last_stamp
        if not entry.ignore_time and (newest or stamp is None or LOG_ORDER(stamp) < key):
            self.last_stamp = entry

    def position(self, entry: LogEntry) -> int:
        """Where an entry of the log lies in `entries`."""
        return bisect.bisect_left(self.entries, LOG_ORDER(entry), key=LOG_ORDER)

    def holds(self, *parts: Sequence[LogEntry]) -> bool:
        """Whether the index's entries are exactly the entries of `parts`, one part after the
        other: the same objects, in the same order."""
        entries = self.entries
        if len(entries) != sum(map(len, parts)):
            return False
        at = 0
        for part in parts:
            if not all(map(operator.is_, part, islice(entries, at, None))):
                return False
            at += len(part)
        return True
