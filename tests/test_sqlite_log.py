"""SQLite keeps a profile's update log in its row (`tail`) and in `log_chunks`.

The contract tests run with the default limits, where few profiles fill a tail; here the tail
holds at most two entries, so nearly every write moves entries to a chunk, and deletes,
compaction, late records and retries all work across chunks. The migration from the
separate `updates` table of schema version 3 keeps every entry.
"""

from __future__ import annotations

from pathlib import Path

import apsw
import orjson
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from peoplebase.merge import Merger
from peoplebase.store import sqlite as sqlite_store
from peoplebase.store import sqlite_write
from peoplebase.store.sqlite import SqliteStore, migrations
from tests.test_merge import (
    T0,
    TOKEN,
    WINDOW,
    Groups,
    arrivals,
    flatten,
    in_window_arrivals,
    rec,
    records,
    reference,
    tied_times,
)
from tests.test_store_contract import (
    agree,
    connect,
    new_token,
    read_back,
    retoken,
    run_store,
    to_updates,
)


@pytest.fixture
def tiny_tails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_write, "TAIL_MAX_ENTRIES", 2)


def _chunks(store: SqliteStore) -> int:
    return int(store._reader().execute("SELECT count(*) FROM log_chunks").fetchone()[0])


def test_random_arrivals_agree_across_chunks(tiny_tails: None, tmp_path: Path) -> None:
    store = connect(str(tmp_path / "t.db"))
    assert isinstance(store, SqliteStore)

    @hypothesis_settings(max_examples=80, deadline=None)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        recs = data.draw(records(tied_times))
        agree(store, data.draw(arrivals(recs)))

    check()
    assert _chunks(store) > 0  # the examples did spill
    store.close()


def test_compaction_across_chunks(tiny_tails: None, tmp_path: Path) -> None:
    store = connect(str(tmp_path / "t.db"), window=float(WINDOW))

    @hypothesis_settings(max_examples=50, deadline=None)
    @given(in_window_arrivals())
    def check(groups: Groups) -> None:
        agree(store, groups, Merger(reorder_window=float(WINDOW)))

    check()
    store.close()


def test_retries_across_chunks_change_nothing(tiny_tails: None, tmp_path: Path) -> None:
    store = connect(str(tmp_path / "t.db"))

    @hypothesis_settings(max_examples=50, deadline=None)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        token = new_token()
        groups = retoken(data.draw(arrivals(data.draw(records(tied_times)))), token)
        run_store(store, groups)
        before = read_back(store, token)
        assert before == reference(flatten(groups))
        again = data.draw(st.permutations([request for group in groups for request in group]))
        for request in again:
            (result,) = store.write_group(to_updates([request]))
            assert result.dropped == len(request)
        assert read_back(store, token) == before

    check()
    store.close()


def test_long_log_spills_and_reads_back_whole(tmp_path: Path) -> None:
    store = connect(str(tmp_path / "t.db"))
    assert isinstance(store, SqliteStore)
    sent = [rec(t, set={"n": t}, add={"c": 1}) for t in range(0, 400, 2)]
    for start in range(0, len(sent), 7):
        run_store(store, [[sent[start : start + 7]]])
    late = [rec(t, set={"late": t}) for t in (1, 201, 399)]
    run_store(store, [[late]])
    assert read_back(store, "tok")["a"] == reference([*sent, *late])["a"]
    project = store.project_by_token("tok")
    assert project is not None
    history = store.profile_history(project.id, "a")
    assert [h["time"] for h in history] == sorted(float(1_700_000_000 + t) for t in [*range(0, 400, 2), 1, 201, 399])
    row = store._reader().execute("SELECT tail_n, chunks FROM profiles WHERE distinct_id = 'a'").fetchone()
    assert row[1] == _chunks(store) > 1
    assert row[0] <= sqlite_write.TAIL_MAX_ENTRIES
    # a delete keeps only the entries at or after its time, and clears the chunks
    run_store(store, [[[rec(300, delete=1)]]])
    history = store.profile_history(project.id, "a")
    assert min(h["time"] for h in history) == 1_700_000_300
    assert read_back(store, "tok")["a"] == reference([*sent, *late, rec(300, delete=1)])["a"]
    store.close()


def _version_3(path: str) -> apsw.Connection:
    """A database as schema version 3 left it, with the log in the `updates` table."""
    conn = apsw.Connection(path)
    for version, sql in migrations():
        if version > 3:
            break
        conn.execute(sql)
        conn.execute(f"PRAGMA user_version = {version}")
    return conn


def test_migration_moves_the_updates_table_into_chunks(tmp_path: Path) -> None:
    path = str(tmp_path / "old.db")
    conn = _version_3(path)
    conn.execute("INSERT INTO projects (id, token, secret_hash, created_at) VALUES (1, 'tok', 'x', 0)")
    # profile a: two updates at t=10 (seq 1) and t=30 (seq 3); profile b: one at t=20
    bodies = {1: {"o": {"$set": {"p": 1}}}, 2: {"o": {"$set": {"q": 1}}, "i": 1}, 3: {"o": {"$add": {"n": 2.5}}}}
    rows = [("a", 10.123456789, 1, 100.5, 7), ("b", 20.0, 2, 101.0, None), ("a", 30.0, 3, 102.0, -9)]
    for did, t, seq, received, dedup in rows:
        conn.execute(
            "INSERT INTO updates (project_id, distinct_id, time, seq, received, dedup, body) "
            "VALUES (1, ?, ?, ?, ?, ?, ?)",
            (did, t, seq, received, dedup, orjson.dumps(bodies[seq]).decode()),
        )
    conn.execute(
        "INSERT INTO profiles (project_id, distinct_id, props, last_time, log_min) VALUES "
        "(1, 'a', ?, 30.0, 10.123456789), (1, 'b', ?, 20.0, 20.0)",
        (orjson.dumps({"p": 1, "n": 2.5}).decode(), orjson.dumps({"q": 1}).decode()),
    )
    conn.execute("UPDATE counters SET value = 3")
    conn.close()

    store = SqliteStore(path)
    store.open()
    tables = {r[0] for r in store._reader().execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "updates" not in tables and "log_chunks" in tables
    history = store.profile_history(1, "a")
    assert history == [
        {"time": 10.123456789, "seq": 1, "received": 100.5, **bodies[1]},
        {"time": 30.0, "seq": 3, "received": 102.0, **bodies[3]},
    ]
    detail = store.profile_detail(1, "b")
    assert detail is not None
    assert [(e.time, e.seq, e.dedup, e.update.ignore_time) for e in detail["log"]] == [(20.0, 2, None, True)]
    # the migrated log takes part in replays and retry detection
    v = to_updates
    (applied,) = store.write_group(v([[{"$token": "tok", "$distinct_id": "a", "$time": 20, "$set": {"p": "mid"}}]]))
    assert applied.late == 1
    assert store.get_profiles(1, ["a"])[0][1]["p"] == "mid"
    (applied,) = store.write_group(v([[{"$token": "tok", "$distinct_id": "a", "$time": 5, "$set": {"p": "early"}}]]))
    assert store.get_profiles(1, ["a"])[0][1]["p"] == "mid"  # an earlier $set lands under both
    assert [h["time"] for h in store.profile_history(1, "a")] == [5.0, 10.123456789, 20.0, 30.0]
    store.close()


# --- several connections ---------------------------------------------------------------------


def test_writes_of_another_connection_are_seen(tmp_path: Path) -> None:
    path = str(tmp_path / "t.db")
    a, b = connect(path), connect(path)
    a.write_group(to_updates([[rec(1, set={"p": 1}, add={"n": 1})]]))
    b.write_group(to_updates([[rec(2, add={"n": 10}, set={"q": "from b"})]]))  # e.g. `peoplebase import`
    a.write_group(to_updates([[rec(3, add={"n": 100})]]))
    expected = reference([rec(1, set={"p": 1}, add={"n": 1}), rec(2, add={"n": 10}, set={"q": "from b"}), rec(3, add={"n": 100})])
    assert read_back(a, "tok")["a"] == read_back(b, "tok")["a"] == expected["a"]
    assert a.profile_history(1, "a") == b.profile_history(1, "a") and len(a.profile_history(1, "a")) == 3
    a.close()
    b.close()


def test_failed_transaction_leaves_no_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = connect(str(tmp_path / "t.db"))
    assert isinstance(store, SqliteStore)
    store.write_group(to_updates([[rec(1, set={"p": 1}, add={"n": 1})]]))

    def fail(*args: object) -> None:
        raise apsw.IOError("disk I/O error (injected after the merge)")

    with monkeypatch.context() as m:
        m.setattr(store, "add_stats", fail)
        with pytest.raises(sqlite_store.StoreUnavailable):
            store.write_group(to_updates([[rec(2, add={"n": 5}, set={"p": "lost"})]]))
    store.write_group(to_updates([[rec(3, add={"n": 100})]]))
    assert read_back(store, "tok")["a"] == reference([rec(1, set={"p": 1}, add={"n": 1}), rec(3, add={"n": 100})])["a"]
    store.close()


def test_new_files_get_the_page_size_existing_ones_keep_theirs(tmp_path: Path) -> None:
    fresh = connect(str(tmp_path / "new.db"))
    assert fresh._reader().execute("PRAGMA page_size").fetchone()[0] == sqlite_store.PAGE_SIZE  # type: ignore[attr-defined]
    fresh.close()
    old = apsw.Connection(str(tmp_path / "old.db"))
    old.execute("PRAGMA page_size = 4096; CREATE TABLE t (x); PRAGMA journal_mode = WAL")
    old.close()
    kept = connect(str(tmp_path / "old.db"))
    assert kept._reader().execute("PRAGMA page_size").fetchone()[0] == 4096  # type: ignore[attr-defined]
    kept.write_group(to_updates([[rec(1, set={"p": 1})]]))
    assert read_back(kept, "tok")["a"] == reference([rec(1, set={"p": 1})])["a"]
    kept.close()


def test_migration_counts_every_profiles_log(tiny_tails: None, tmp_path: Path) -> None:
    # A version-4 file has no log_n: migration 0005 counts each log (chunks and tail).
    db = tmp_path / "v4.db"
    store = SqliteStore(str(db), synchronous="normal")
    store.open()
    lengths = {"a": 7, "b": 1, "c": 0}
    for did, n in lengths.items():
        for t in range(n):
            store.write_group(to_updates([[rec(t, did, set={"p": t})]]))
    assert _chunks(store) > 0  # tiny tails: most of the log is in chunks
    store.close()
    conn = apsw.Connection(str(db))
    conn.execute("ALTER TABLE profiles DROP COLUMN log_n")
    conn.execute("ALTER TABLE profiles DROP COLUMN log_floor")
    conn.execute("DROP TABLE journal")  # and what version 6 added
    conn.execute("ALTER TABLE profiles DROP COLUMN jid")
    conn.execute("PRAGMA user_version = 4")
    conn.close()
    reopened = SqliteStore(str(db), synchronous="normal", max_log_entries=4)
    reopened.open()
    try:
        counted = dict(reopened._reader().execute("SELECT distinct_id, log_n FROM profiles"))
        assert counted == {"a": 7, "b": 1}
        # the counts drive the limit from the first write on: a's log is cut to 3 entries
        reopened.write_group(to_updates([[rec(100, "a", set={"p": 100})]]))
        project = reopened.project_by_token(TOKEN)
        assert project is not None
        detail = reopened.profile_detail(project.id, "a")
        assert detail is not None
        assert [e.time for e in detail["log"]] == [T0 + 5, T0 + 6, T0 + 100]
        assert dict(reopened.get_profiles(project.id, ["a"]))["a"]["p"] == 100
    finally:
        reopened.close()
