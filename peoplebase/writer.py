"""Group commit: a writer thread takes every request waiting in the queue, merges them in one
transaction, and answers each only after that transaction is durably committed.

A store that pipelines (`send_group` / `await_group` and a PIPELINE_DEPTH over 1: the
writer process of writeproc.py) gets that many writer threads, so that several groups are in
flight, sent in queue order: one commits while the next is merged.

The queue is bounded by records: `submit` raises `Overloaded` instead of letting it grow,
and the HTTP layer turns that into 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .store.base import ProfileStore, StoreUnavailable
from .types import Applied, Update

log = logging.getLogger(__name__)


# The interpreter lock's switch interval where a store commits in a thread of its own: that
# thread waits for the lock when its COMMIT is handed over and when it returns, and at the
# default 5 ms each of those waits delayed the next group (the writer ran 15-20% slower).
QUICK_SWITCH_INTERVAL = 0.0002


def prefer_quick_handoffs() -> None:
    """Let threads that wait for the interpreter lock get it within QUICK_SWITCH_INTERVAL."""
    sys.setswitchinterval(min(sys.getswitchinterval(), QUICK_SWITCH_INTERVAL))


# Seconds without a group after which the writer lets the store do its own work (SQLite with
# write-behind writes the profile rows that are due; see SqliteStore.idle).
IDLE_EVERY = 0.2
_IDLE: list[Any] = []  # _take's answer when it is time for that


class Overloaded(Exception):
    """The write queue is full."""


class WriterStopped(Exception):
    """The writer is shutting down and takes no new work."""


@dataclass(slots=True)
class _Job:
    updates: Sequence[Update]
    future: asyncio.Future[Applied]
    loop: asyncio.AbstractEventLoop


class Writer:
    def __init__(
        self,
        store: ProfileStore,
        max_queued_records: int = 200_000,
        group_records: int = 20_000,
        max_wait: float = 2.0,
    ) -> None:
        self.store = store
        self.max_queued = max_queued_records
        self.group_records = group_records
        self.max_wait = max_wait
        # Commit speed, as decaying sums of records and seconds: expected wait = queue / speed.
        self._speed_records = 0.0
        self._speed_seconds = 0.0
        self._committing = 0  # records of the commit under way
        self._queue: deque[_Job] = deque()
        self._queued_records = 0
        self._cond = threading.Condition()
        self._stopping = False
        # A store that pipelines (the writer process) gets PIPELINE_DEPTH writer threads: the
        # next group is sent while the previous ones commit. Taking a group and sending it
        # happen under one lock, so groups reach the store in the order they were taken.
        self._pipelined = hasattr(store, "send_group") and getattr(store, "PIPELINE_DEPTH", 1) > 1
        depth = int(getattr(store, "PIPELINE_DEPTH", 1)) if self._pipelined else 1
        self._send_lock = threading.Lock()
        self._last_done = 0.0
        self._threads = [
            threading.Thread(target=self._run, name=f"peoplebase-writer-{i}", daemon=True)
            for i in range(depth)
        ]
        self._idle = getattr(store, "idle", None)
        self._last_taken = time.monotonic()  # when a request was last taken from the queue
        self.commits = 0
        self.failed_commits = 0
        self._counts: dict[tuple[str, str], int] = {}  # (token, outcome) -> records, not yet stored

    def count(self, token: str, outcome: str, n: int = 1) -> None:
        """Count records by outcome for the overview; stored with the next commit."""
        with self._cond:
            key = (token, outcome)
            self._counts[key] = self._counts.get(key, 0) + n

    def start(self) -> None:
        if self._pipelined:
            prefer_quick_handoffs()
        for thread in self._threads:
            thread.start()

    @property
    def queued_records(self) -> int:
        return self._queued_records

    def submit(self, updates: Sequence[Update]) -> asyncio.Future[Applied]:
        """Queue one request's updates; the future resolves after the commit."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Applied] = loop.create_future()
        n = len(updates)
        with self._cond:
            if self._stopping:
                raise WriterStopped()
            if self._over(n):
                raise Overloaded()
            self._queue.append(_Job(updates, future, loop))
            self._queued_records += n
            self._cond.notify()
        return future

    def stop(self, timeout: float = 30.0) -> None:
        """Finish everything queued, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._queue:
                if self._stopping and not self._counts:
                    return None
                quiet = time.monotonic() - self._last_taken
                if self._counts and (self._stopping or quiet >= 2.0):
                    return []  # nothing to write but counts: store them on their own
                if self._idle is not None:
                    wait: float | None = IDLE_EVERY
                else:
                    wait = max(0.0, 2.0 - quiet) if self._counts else None
                if not self._cond.wait(wait) and self._idle is not None and not self._queue:
                    if not self._stopping:
                        return _IDLE
            self._last_taken = time.monotonic()
            jobs: list[_Job] = []
            records = 0
            limit = self._group_limit()
            while self._queue and (not jobs or records + len(self._queue[0].updates) <= limit):
                job = self._queue.popleft()
                jobs.append(job)
                records += len(job.updates)
            self._queued_records -= records
            self._committing += records
            return jobs

    def _group_limit(self) -> int:
        """Records for one commit: group_records, and with a wait limit, no more than a
        quarter of it in commit work at the recent speed (so one commit cannot eat the wait)."""
        if self.max_wait <= 0 or self._speed_seconds <= 0:
            return self.group_records
        per_second = self._speed_records / self._speed_seconds
        return max(1, min(self.group_records, int(per_second * self.max_wait / 4)))

    def _run(self) -> None:
        while True:
            with self._send_lock:
                jobs = self._take()
                if jobs is None:  # stopping: the other thread then finds the same
                    return
                if jobs is _IDLE:
                    self._tick()
                    continue
                counts = self._take_counts()
                sent_at = time.monotonic()
                pending = self._send(jobs, counts) if self._pipelined else None
            self._commit(jobs, counts, sent_at, pending)
            with self._cond:
                self._committing -= sum(len(j.updates) for j in jobs)

    def _tick(self) -> None:
        assert self._idle is not None
        try:
            self._idle()
        except StoreUnavailable as exc:
            log.warning("writing profile rows while idle failed: %s", exc)
        except Exception:
            log.exception("writing profile rows while idle failed")

    def _send(self, jobs: list[_Job], counts: dict[tuple[str, str], int]) -> Any:
        try:
            return self.store.send_group([j.updates for j in jobs], counts)  # type: ignore[attr-defined]
        except Exception as exc:  # raised again by _commit, with the usual handling
            return exc

    def _take_counts(self) -> dict[tuple[str, str], int]:
        with self._cond:
            counts, self._counts = self._counts, {}
        return counts

    def _over(self, n: int) -> bool:
        queued = self._queued_records
        if not queued:
            return False  # an empty queue always takes one request, however large
        if queued + n > self.max_queued:
            return True
        if self.max_wait > 0 and self._speed_seconds > 0:
            ahead = queued + n + self._committing  # the commit under way is waited for too
            return ahead * self._speed_seconds / self._speed_records > self.max_wait
        return False

    def overloaded(self) -> bool:
        """Would a request be refused now? Checked before reading a body, to refuse cheaply."""
        return self._over(0)

    @property
    def expected_wait(self) -> float:
        """Seconds the records now queued are expected to wait, at the recent commit speed."""
        if self._speed_seconds <= 0:
            return 0.0
        return self._queued_records * self._speed_seconds / self._speed_records

    def _commit(
        self,
        jobs: list[_Job],
        counts: dict[tuple[str, str], int] | None = None,
        started: float | None = None,
        pending: Any = None,
    ) -> None:
        if counts is None:
            counts = self._take_counts()
        if started is None:
            started = time.monotonic()
        try:
            if isinstance(pending, Exception):
                raise pending
            if pending is not None:
                results = self.store.await_group(pending)  # type: ignore[attr-defined]
            else:
                results = self.store.write_group([j.updates for j in jobs], counts)
            self.commits += 1
            records = sum(len(j.updates) for j in jobs)
            if records:
                with self._cond:
                    # pipelined groups overlap: count the time since the previous one ended
                    done = time.monotonic()
                    spent = done - max(started, self._last_done)
                    self._last_done = done
                    self._speed_records = 0.8 * self._speed_records + records
                    self._speed_seconds = 0.8 * self._speed_seconds + spent
        except StoreUnavailable as exc:
            self.failed_commits += 1
            log.error("storage cannot commit, answering 503: %s", exc)
            _resolve([(j, None, StoreUnavailable(str(exc))) for j in jobs])
            self._restore_counts(counts)
            return
        except Exception as exc:  # a bug must fail only the request that triggers it
            self._restore_counts(counts)
            if len(jobs) > 1:
                for job in jobs:
                    self._commit([job])
                return
            self.failed_commits += 1
            log.exception("write failed")
            _resolve([(jobs[0], None, exc)])
            return
        _resolve([(j, r, None) for j, r in zip(jobs, results, strict=True)])

    def _restore_counts(self, counts: dict[tuple[str, str], int]) -> None:
        for (token, outcome), n in counts.items():
            self.count(token, outcome, n)


def _resolve(outcomes: list[tuple[_Job, Applied | None, BaseException | None]]) -> None:
    by_loop: dict[
        asyncio.AbstractEventLoop, list[tuple[_Job, Applied | None, BaseException | None]]
    ] = {}
    for item in outcomes:
        by_loop.setdefault(item[0].loop, []).append(item)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, items)
        except RuntimeError:  # loop closed: nobody is waiting any more
            pass


def _settle(items: list[tuple[_Job, Applied | None, BaseException | None]]) -> None:
    for job, result, exc in items:
        if job.future.done():
            continue
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)  # type: ignore[arg-type]
