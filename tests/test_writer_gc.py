"""The writer process's garbage-collection schedule (collector.Collector)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from peoplebase.collector import YOUNG_THRESHOLD, Collector


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()  # leave the test process as it was
    gc.set_threshold(*thresholds)


def test_the_youngest_generation_is_collected_less_often() -> None:
    _, middle, old = gc.get_threshold()
    Collector(full_every=3600.0)
    assert gc.get_threshold() == (YOUNG_THRESHOLD, middle, old)


def cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_survivors_of_a_group_are_frozen() -> None:
    collector = Collector(full_every=3600.0)
    kept = [Node() for _ in range(10)]
    collector.after_group()
    assert gc.get_freeze_count() >= len(kept)
    # frozen objects are still freed by reference counting when dropped
    gone = weakref.ref(kept[0])
    del kept
    assert gone() is None


def test_frozen_cycles_are_freed_by_the_periodic_full_collection() -> None:
    collector = Collector(full_every=3600.0)
    ref = cycle()
    collector.after_group()  # the cycle is garbage already, but frozen along
    gc.collect()
    assert ref() is not None  # a collection does not look at frozen objects
    collector.full_every = 0.0
    collector._next_full = 0.0
    collector.after_group()
    assert ref() is None
