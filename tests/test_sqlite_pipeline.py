"""The SQLite store merges the next group while the previous one commits (store/sqlite_write.py).

What the pipeline changes must be invisible: a store that is handed group after group without
waiting (`send_group`, with or without the next group's requests known ahead) writes byte for
byte the same rows, and gives the same outcomes, as one that commits each group before the
next is merged. A group merged onto a state that then did not become the file's (a COMMIT
that failed, another connection's commit) is merged again. The WAL is fsync'd after the
COMMIT, outside the write lock, and a failed fsync is never answered 200.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from peoplebase.store import SqliteStore, sqlite_write
from peoplebase.store.sqlite_write import Group
from tests.test_merge import (
    TOKEN,
    Groups,
    arrivals,
    rec,
    records,
    reference,
    tied_times,
    to_updates,
)
from tests.test_writeback import retoken, table_rows

_tokens = itertools.count()


def open_store(path: Path, **kwargs: Any) -> SqliteStore:
    store = SqliteStore(str(path), synchronous="normal", **kwargs)
    store.writeback.min_log = 1  # keep even short logs: the cache takes part too
    store.open()
    return store


def slow_commits(store: SqliteStore, seconds: float = 0.004) -> None:
    """Make every COMMIT take a while, so the next group is merged while one is under way."""
    conn = store._writer()

    def hook() -> bool:
        time.sleep(seconds)
        return False  # go on with the COMMIT

    conn.set_commit_hook(hook)


def pipelined(
    store: SqliteStore, groups: Groups, ahead: bool
) -> list[tuple[int, int, int] | BaseException]:
    """Send every group without waiting for the one before; each answer once it committed."""
    batches = [to_updates(group) for group in groups]
    tickets: list[Group] = []
    for i, batch in enumerate(batches):
        following = batches[i + 1] if ahead and i + 1 < len(batches) else None
        tickets.append(store.send_group(batch, None, lambda f=following: f))
    out: list[tuple[int, int, int] | BaseException] = []
    for ticket in tickets:
        try:
            out.extend((r.dropped, r.late, r.beyond_window) for r in store.await_group(ticket))
        except BaseException as exc:  # noqa: BLE001 - compared by the caller
            out.append(exc)
    return out


def serial(store: SqliteStore, groups: Groups) -> list[tuple[int, int, int]]:
    out = []
    for group in groups:
        out.extend(
            (r.dropped, r.late, r.beyond_window) for r in store.write_group(to_updates(group))
        )
    return out


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[SqliteStore, SqliteStore, SqliteStore]]:
    """One store committing group by group, two pipelined ones (with and without the next
    group's requests known ahead)."""
    made = (
        open_store(tmp_path / "serial.db"),
        open_store(tmp_path / "ahead.db"),
        open_store(tmp_path / "blind.db"),
    )
    for store in made[1:]:
        slow_commits(store, 0.002)
    yield made
    for store in made:
        store.close()


def same_rows(stores: tuple[SqliteStore, SqliteStore, SqliteStore], groups: Groups) -> None:
    token = f"{TOKEN}-{next(_tokens)}"
    groups = retoken(groups, token)
    expected = serial(stores[0], groups)
    assert pipelined(stores[1], groups, ahead=True) == expected
    assert pipelined(stores[2], groups, ahead=False) == expected
    rows = table_rows(stores[0], token)
    assert table_rows(stores[1], token) == rows
    assert table_rows(stores[2], token) == rows


@pytest.mark.parametrize("tail", [16, 2], ids=["default-tails", "tiny-tails"])
def test_pipelined_groups_write_the_same_rows(
    stores: tuple[SqliteStore, SqliteStore, SqliteStore],
    monkeypatch: pytest.MonkeyPatch,
    tail: int,
) -> None:
    # tiny tails: nearly every write moves entries to a chunk that the next group, merged
    # while that write commits, must count once whether or not it sees it yet
    monkeypatch.setattr(sqlite_write, "TAIL_MAX_ENTRIES", tail)

    @hypothesis_settings(max_examples=60, deadline=None)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        recs = data.draw(records(tied_times, max_size=16))
        groups = data.draw(arrivals(recs))
        same_rows(stores, groups)
        # every request again, a group each: retries, found in the logs of groups in flight
        again = data.draw(st.permutations([request for group in groups for request in group]))
        same_rows(stores, [[request] for request in again])

    check()
    for store in stores[1:]:
        assert store.pipeline.overlapped > 0  # the groups really were merged during commits
    assert stores[1].pipeline.preloaded > 0
    assert stores[2].pipeline.preloaded == 0


def test_a_busy_profile_through_many_groups_in_flight(
    stores: tuple[SqliteStore, SqliteStore, SqliteStore],
) -> None:
    # one profile in every group, late updates, deletes and retries among them
    sent = []
    for t in range(0, 600, 3):
        sent.append(rec(t, set={"n": t}, add={"c": 1}, append={"l": t % 7}))
        if t % 30 == 0:
            sent.append(rec(t - 40, set={"late": t}, union={"u": [t % 5]}))
        if t % 150 == 0 and t:
            sent.append(rec(t - 1, delete=""))
    groups: Groups = [[sent[i : i + 5]] for i in range(0, len(sent), 5)]
    groups += [[sent[i : i + 9]] for i in range(0, 60, 9)]  # resends
    same_rows(stores, groups)
    assert read(stores[1], "a") == reference(sent)["a"]


def read(store: SqliteStore, did: str, token: str | None = None) -> Any:
    project = store.project_by_token(token or f"{TOKEN}-{next(_tokens) - 1}")
    assert project is not None
    found = dict(store.get_profiles(project.id, [did]))
    return found.get(did)


# --- a state that did not become the file's ------------------------------------------------


def fail_commits_for(store: SqliteStore, did: str) -> None:
    """COMMIT fails (a deferred foreign key) in every transaction that writes profile `did`."""
    conn = store._writer()
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS doomed_parent (id INTEGER PRIMARY KEY);"
        "CREATE TABLE IF NOT EXISTS doomed (parent INTEGER REFERENCES doomed_parent (id) "
        "DEFERRABLE INITIALLY DEFERRED)"
    )
    for event in ("INSERT", "UPDATE"):
        trigger = (
            f"doom_{event.lower()} AFTER {event} ON main.profiles WHEN NEW.distinct_id = '{did}'"
        )
        conn.execute(f"CREATE TEMP TRIGGER {trigger} BEGIN INSERT INTO doomed VALUES (1); END")  # noqa: S608


def test_a_group_merged_onto_a_failed_commit_is_merged_again(tmp_path: Path) -> None:
    store = open_store(tmp_path / "p.db")
    try:
        store.write_group(
            to_updates([[rec(1, set={"x": 1}, add={"n": 1}), rec(1, did="b", set={"y": 0})]])
        )
        slow_commits(store, 0.02)
        fail_commits_for(store, "boom")
        first = [[rec(2, add={"n": 10}, append={"l": "lost"}), rec(2, did="boom", set={"z": 1})]]
        second = [[rec(3, add={"n": 100}, append={"l": "kept"}), rec(1, did="b", set={"y": 0})]]
        third = [[rec(4, add={"n": 1000})]]
        one = store.send_group(to_updates(first))
        # merged while `one` commits, with `a` as `one` left it; `one` then fails
        two = store.send_group(to_updates(second), None, lambda: to_updates(third))
        three = store.send_group(to_updates(third))
        with pytest.raises(apsw.ConstraintError):
            store.await_group(one)
        assert store.await_group(two)[0].dropped == 1  # b's record is a resend of the first
        store.await_group(three)
        assert store.pipeline.merged_again >= 1
        expected = reference([rec(1, set={"x": 1}, add={"n": 1}), *second[0][:1], *third[0]])["a"]
        assert read(store, "a", TOKEN) == expected
        assert read(store, "b", TOKEN) == {
            "y": 0,
            "$last_seen": read(store, "b", TOKEN)["$last_seen"],
        }
        assert read(store, "boom", TOKEN) is None
        counts = dict(store._reader().execute("SELECT distinct_id, log_n FROM profiles"))
        assert counts == {"a": 3, "b": 1}
    finally:
        store.close()


def test_another_connections_commit_under_a_preloaded_group(tmp_path: Path) -> None:
    # the next group's profiles were read inside the previous transaction; then another
    # connection (a CLI command, a second server) commits to the same profile before the
    # next group is written: the next group must be merged onto that commit
    first = open_store(tmp_path / "p.db")
    other = open_store(tmp_path / "p.db")
    try:
        first.write_group(to_updates([[rec(1, add={"n": 1})]]))
        later = to_updates([[rec(5, add={"n": 100}), rec(3, set={"late": True})]])
        ticket = first.send_group(to_updates([[rec(2, add={"n": 10})]]), None, lambda: later)
        first.await_group(ticket)
        other.write_group(to_updates([[rec(4, add={"n": 1000}, set={"by": "other"})]]))
        first.await_group(first.send_group(later))
        assert first.pipeline.preloaded == 1
        assert first.pipeline.merged_again == 1
        arrived = [
            rec(1, add={"n": 1}),
            rec(2, add={"n": 10}),
            rec(4, add={"n": 1000}, set={"by": "other"}),
            rec(5, add={"n": 100}),
            rec(3, set={"late": True}),
        ]
        assert read(first, "a", TOKEN) == reference(arrived)["a"]
        assert read(first, "a", TOKEN)["n"] == 1111
    finally:
        first.close()
        other.close()


def test_groups_known_ahead_read_no_log_late(tmp_path: Path) -> None:
    """The logs a group of late updates needs are read with its profiles, in the transaction
    before (`Merger.logs_wanted`), not through the merge connection afterwards."""
    store = open_store(tmp_path / "p.db", log_cache=0)
    try:
        store.write_group(
            to_updates([[rec(t, did=d, set={"t": t}) for t in range(10, 40) for d in "abc"]])
        )
        slow_commits(store, 0.02)
        groups = [to_updates([[rec(50 + i, did=d, add={"n": 1}) for d in "abc"]]) for i in range(3)]
        groups += [to_updates([[rec(5, did=d, set={"late": True}) for d in "abc"]])]
        groups += [to_updates([[rec(41, did="a", add={"n": 1}), rec(60, did="b", delete="")]])]
        tickets = []
        for i, group in enumerate(groups):
            after = groups[i + 1] if i + 1 < len(groups) else None
            tickets.append(store.send_group(group, None, lambda a=after: a))
        for ticket in tickets:
            store.await_group(ticket)
        assert store.pipeline.preloaded == len(groups) - 1
        assert store.pipeline.logs_read_late == 0
        profiles = dict(store.get_profiles(1, ["a", "b", "c"]))
        assert profiles["a"]["late"] is True and profiles["a"]["n"] == 4
        assert "b" not in profiles
    finally:
        store.close()


# --- the writer thread commits group by group -----------------------------------------------


def test_the_thread_writer_commits_group_by_group_in_arrival_order(tmp_path: Path) -> None:
    # in the server process the merge would compete with HTTP for the interpreter lock: the
    # writer thread calls write_group, which commits before the next group is merged
    import asyncio

    from peoplebase.records import Validator
    from peoplebase.writer import Writer

    store = open_store(tmp_path / "w.db")
    writer = Writer(store, group_records=5, max_wait=0.0)
    assert len(writer._threads) == SqliteStore.PIPELINE_DEPTH == 1
    validator = Validator()
    t = 1_700_000_000.0

    async def submit_all() -> list[Any]:
        futures = []
        for i in range(200):
            raw = {"$token": "pl", "$distinct_id": "p", "$time": t, "$append": {"seq": i}}
            futures.append(writer.submit([validator.validate(raw, 0, t + 1)]))
            if i % 7 == 0:
                await asyncio.sleep(0)
        return await asyncio.gather(*futures, return_exceptions=True)

    writer.start()
    try:
        results = asyncio.run(submit_all())
    finally:
        writer.stop()
    try:
        assert not [r for r in results if isinstance(r, BaseException)]
        project = store.project_by_token("pl")
        assert project is not None
        [(_, props)] = store.get_profiles(project.id, ["p"])
        assert props["seq"] == list(range(200))
        assert writer.commits >= 40
        assert store.pipeline.overlapped == 0 and store._committer is None
    finally:
        store.close()


# --- the WAL's fsync, after the COMMIT and outside the write lock -------------------------


def test_a_failed_fsync_answers_503_and_the_next_group_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    from peoplebase.store import StoreUnavailable

    path = tmp_path / "f.db"
    store = SqliteStore(str(path))  # synchronous=full: the store fsyncs the WAL itself
    store.open()
    try:
        store.write_group(to_updates([[rec(1, add={"n": 1})]]))
        slow_commits(store, 0.02)
        real_fsync = os.fsync
        failures = [1]

        def fsync(fd: int) -> None:
            if failures and os.fstat(fd).st_ino == os.stat(str(path) + "-wal").st_ino:
                failures.pop()
                raise OSError(errno.EIO, "Input/output error (injected)")
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        faulty = store.send_group(to_updates([[rec(2, add={"n": 10})]]))
        behind = store.send_group(to_updates([[rec(3, add={"n": 100})]]))
        with pytest.raises(StoreUnavailable, match="fsync"):
            store.await_group(faulty)
        # the group behind it is either rolled back unanswered (it was written before the
        # fault was known) or written after the store recovered (after it)
        try:
            store.await_group(behind)
            behind_applied = True
        except StoreUnavailable:
            behind_applied = False
        # the next group copies what is committed into the file first, then goes on
        store.write_group(to_updates([[rec(4, add={"n": 1000})]]))
        assert store._faulted is None
        # the faulty group's COMMIT had happened (only its fsync failed), and nothing else
        # was lost or applied twice
        assert read(store, "a", TOKEN)["n"] == 1011 + 100 * behind_applied
        conn = apsw.Connection(str(path))
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        conn.close()
    finally:
        store.close()
