"""A profile's update log in replay order: ($time, arrival)."""

from __future__ import annotations

import bisect
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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
