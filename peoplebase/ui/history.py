"""How a profile came to be: its update log explained step by step, and time travel.

Pure functions over the stored base snapshot and log entries; the web page renders them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..merge import LogEntry, fold
from ..ops import apply_update
from ..types import Props

MISSING: Any = object()


@dataclass
class Change:
    name: str
    before: Any  # MISSING when the property did not exist
    after: Any  # MISSING when the property was removed


@dataclass
class Step:
    time: float
    seq: int
    received: float
    ops: dict[str, Any]
    ignore_time: bool
    geo: Props | None
    late: bool  # arrived after an update with a later $time, and was re-ordered into place
    changes: list[Change] = field(default_factory=list)
    created: bool = False
    exists_after: bool = True


def _diff(before: Props | None, after: Props | None) -> list[Change]:
    b = before or {}
    a = after or {}
    changes = []
    for name in sorted(set(b) | set(a)):
        old = b.get(name, MISSING)
        new = a.get(name, MISSING)
        if old is MISSING or new is MISSING or old != new or type(old) is not type(new):
            if old is MISSING and new is MISSING:
                continue
            changes.append(Change(name, old, new))
    return changes


def late_seqs(entries: list[LogEntry]) -> set[int]:
    """Entries that arrived after another entry with a later $time."""
    late = set()
    newest = -math.inf
    for e in sorted(entries, key=lambda e: e.seq):
        if e.time < newest:
            late.add(e.seq)
        newest = max(newest, e.time)
    return late


def explain(
    base: Props | None,
    entries: list[LogEntry],
    received: dict[int, float],
    max_properties: int = 2000,
) -> list[Step]:
    """Replay the log in ($time, arrival) order, recording what each update changed."""
    late = late_seqs(entries)
    props = dict(base) if base is not None else None
    steps = []
    for e in sorted(entries, key=lambda e: (e.time, e.seq)):
        e.update.time = e.time
        after = apply_update(props, e.update, max_properties)
        steps.append(
            Step(
                time=e.time,
                seq=e.seq,
                received=received.get(e.seq, 0.0),
                ops=e.update.ops,
                ignore_time=e.update.ignore_time,
                geo=e.update.geo,
                late=e.seq in late,
                changes=_diff(props, after),
                created=props is None and after is not None,
                exists_after=after is not None,
            )
        )
        props = after
    return steps


def as_of(
    base: Props | None, entries: list[LogEntry], at: float, max_properties: int = 2000
) -> Props | None:
    """The profile as it was at time `at`: the fold of the updates with $time <= at."""
    return fold(base, [e for e in entries if e.time <= at], max_properties)
