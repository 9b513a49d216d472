"""Garbage collection in Peoplebase's two long-running processes, by their own schedules.

CPython collects its youngest generation every 700 net allocations of container objects and
walks every older object again in each full collection. A Peoplebase process allocates
hundreds of thousands of objects per second that reference counting frees at once, and keeps
tens of thousands that live as long as the process (modules, the profiles it holds). On the
interpreter's schedule the server, while ingesting, collected some 100 times a second, ran
3.9% more instructions per record than with its own schedule, and paused its event loop for
up to 48 ms in a full collection, 142 ms in another run (BENCHMARKS.md).
"""

from __future__ import annotations

import gc
import logging
import threading
import time

log = logging.getLogger(__name__)

# Net allocations of container objects between collections of the youngest generation.
YOUNG_THRESHOLD = 50_000
# Seconds between full garbage collections (the writer process's and the server's).
FULL_COLLECT_EVERY = 600.0


def settle_server(full_every: float = FULL_COLLECT_EVERY) -> threading.Event:
    """The server process, once its modules are loaded and its app built: what exists now
    lives as long as the process, so it is frozen (never walked again), and the youngest
    generation is collected every YOUNG_THRESHOLD net allocations.

    A request's objects die with it by reference counting; none of the app's request paths
    leaves reference cycles (tests/test_collector.py), so young collections are rare: while
    ingesting there are none. A thread makes a full collection every `full_every` seconds
    (frozen objects included, then frozen again), so garbage cycles that a path might still
    make, or that outlive the young collections, are freed within that time. Returns the
    event that stops that thread.
    """
    gc.collect()
    gc.freeze()
    _collect_young_less_often()
    stop = threading.Event()
    threading.Thread(
        target=_collect_fully, args=(stop, full_every), name="peoplebase-gc", daemon=True
    ).start()
    return stop


def _collect_young_less_often() -> None:
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


def _collect_all(process: str) -> None:
    """A full collection, frozen objects included (cycles frozen along are freed too)."""
    gc.unfreeze()
    found = gc.collect()
    log.debug("%s: full garbage collection freed %d objects", process, found)


def _collect_fully(stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        _collect_all("server")
        gc.freeze()


class Collector:
    """Garbage collection in the writer process, by its own schedule.

    Almost everything the writer keeps between groups lives long (the profiles it holds, the
    merger's state, the modules), and the interpreter's full collections walk all of it: with
    the log cache full they took a third of the writer's time in the soak, and a tenth without
    it. After each group the survivors are frozen (`gc.freeze`: never walked again, still freed
    by reference counting when dropped); a full collection over everything, which also frees
    reference cycles that were frozen along, runs after the first group once `full_every`
    seconds have passed since the last one. A group allocates some hundred thousand objects
    that die with it, nearly all freed by reference counting: the youngest generation is
    collected every YOUNG_THRESHOLD allocations instead of every 700 (2.6% fewer instructions
    per record on the storage floor, measured with callgrind).
    """

    def __init__(self, full_every: float = FULL_COLLECT_EVERY) -> None:
        self.full_every = full_every
        self._next_full = time.monotonic() + full_every
        _collect_young_less_often()

    def after_group(self) -> None:
        if time.monotonic() >= self._next_full:
            _collect_all("writer")
            self._next_full = time.monotonic() + self.full_every
        gc.freeze()
