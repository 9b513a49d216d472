"""`--writer process` pipelines groups: the next group is sent while the previous one commits.

Arrival order must survive it: requests are applied in the order they were queued, across
groups that were in flight at the same time, and a child that dies fails every group it
held (none is acknowledged) and the next group starts a new child.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import orjson

from peoplebase.records import Validator
from peoplebase.store.base import StoreUnavailable
from peoplebase.store.overlay import Overlay
from peoplebase.store.sqlite import SqliteStore
from peoplebase.store.sqlite_write import OverlayDelta
from peoplebase.writeproc import ProcessWriteStore
from peoplebase.writer import Writer

T = 1_700_000_000.0


def _request(i: int, validator: Validator) -> list:  # type: ignore[type-arg]
    # the same $time everywhere: only arrival order decides the order of the appends
    raw = {"$token": "pl", "$distinct_id": "p", "$time": T, "$append": {"seq": i}, "$add": {"n": 1}}
    return [validator.validate(raw, 0, T + 1)]


async def _submit_all(writer: Writer, count: int) -> list[object]:
    validator = Validator()
    futures = []
    for i in range(count):
        futures.append(writer.submit(_request(i, validator)))
        if i % 7 == 0:
            await asyncio.sleep(0)  # let groups form and go out while requests keep coming
    return await asyncio.gather(*futures, return_exceptions=True)


def test_pipelined_groups_keep_arrival_order(tmp_path: Path) -> None:
    db = str(tmp_path / "pl.db")
    store = ProcessWriteStore(db, synchronous="normal")
    store.start()
    # small groups: many of them in flight; no refusal by expected wait (max_wait=0): on a
    # loaded machine 300 queued records could otherwise be answered 503, which is not what
    # this test is about
    writer = Writer(store, group_records=5, max_wait=0.0)
    assert len(writer._threads) == ProcessWriteStore.PIPELINE_DEPTH >= 2
    writer.start()
    try:
        results = asyncio.run(_submit_all(writer, 300))
    finally:
        writer.stop()
        store.close()
    assert not [r for r in results if isinstance(r, BaseException)]
    assert writer.commits >= 60
    reader = SqliteStore(db)
    reader.open()
    project = reader.project_by_token("pl")
    assert project is not None
    [(_, props)] = reader.get_profiles(project.id, ["p"])
    reader.close()
    assert props["seq"] == list(range(300))
    assert props["n"] == 300


def test_groups_in_flight_when_the_child_dies(tmp_path: Path) -> None:
    """Each group in flight is either committed and answered, or answered 503; never lost."""
    store = ProcessWriteStore(str(tmp_path / "dead.db"), synchronous="normal")
    store.start()
    validator = Validator()
    acknowledged = []
    try:
        first = store.send_group([_request(0, validator)])
        store.await_group(first)
        acknowledged.append(0)
        pid = store.pid
        assert pid is not None
        in_flight = [(i, store.send_group([_request(i, validator)] * 1)) for i in range(1, 6)]
        os.kill(pid, signal.SIGKILL)
        failed = 0
        for i, sent in in_flight:
            try:
                store.await_group(sent)
                acknowledged.append(i)
            except StoreUnavailable:
                failed += 1
        # the next group starts a new child and commits
        last = store.send_group([_request(6, validator)])
        store.await_group(last)
        acknowledged.append(6)
        assert store.pid != pid and store.restarts == 1
    finally:
        store.close()
    reader = SqliteStore(str(tmp_path / "dead.db"))
    reader.open()
    [(_, props)] = reader.get_profiles(1, ["p"])
    reader.close()
    stored = props["seq"]
    assert stored == sorted(stored)  # in arrival order
    assert set(acknowledged) <= set(stored)  # nothing acknowledged is lost
    assert len(stored) >= len(acknowledged) and failed + len(acknowledged) == 7


def test_a_group_that_cannot_be_sent_does_not_hold_up_the_next(tmp_path: Path) -> None:
    store = ProcessWriteStore(str(tmp_path / "unsent.db"), synchronous="normal")
    store.start()
    validator = Validator()
    try:
        bad = _request(0, validator)
        bad[0].ops["$set"] = {"x": lambda: None}  # cannot be encoded for the child
        try:
            store.send_group([bad])
        except Exception as exc:  # encoding error, raised to the writer, which answers it
            assert "not json serializable" in str(exc).lower()
        else:
            raise AssertionError("a group that cannot be encoded was sent")
        ok = store.send_group([_request(1, validator)])
        assert store.await_group(ok)[0].dropped == 0  # answered, not stuck behind the first
    finally:
        store.close()


class _SlowOverlay(Overlay):
    """The server's overlay, slow to take the first group's changes in."""

    def __init__(self) -> None:
        super().__init__()
        self.applied = 0

    def apply(self, delta: OverlayDelta | None) -> None:
        self.applied += 1
        if self.applied == 1:
            time.sleep(0.3)
        super().apply(delta)


def test_the_overlay_takes_the_groups_in_commit_order(tmp_path: Path) -> None:
    """Two groups in flight change the same profile: however long the first answer takes to
    reach the readers' overlay, the second one's state is what readers see after both."""
    store = ProcessWriteStore(str(tmp_path / "order.db"), synchronous="normal", write_behind=1.0)
    store.start()
    overlay = store.overlay = _SlowOverlay()
    validator = Validator()
    try:
        first = store.send_group([_request(0, validator)])
        second = store.send_group([_request(1, validator)])
        waiters = [threading.Thread(target=store.await_group, args=(t,)) for t in (first, second)]
        for waiter in waiters:
            waiter.start()
        for waiter in waiters:
            waiter.join()
    finally:
        store.close()
    assert overlay.applied == 2
    held = overlay.get((1, "p"))
    assert held is not None and held[1] is not None
    props = orjson.loads(held[1])
    assert props["seq"] == [0, 1] and props["n"] == 2
