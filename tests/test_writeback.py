"""What the SQLite writer holds between groups (store/writeback.py): profile states, their
decoded logs, and the rows it writes behind.

All of it must be invisible: a store that keeps states and decoded logs between groups, and
one that writes its rows seconds later (`write_behind`), write byte for byte the same rows as
one that reads everything from the file and writes every row at once, whatever the arrival
order, retries, deletes, log cuts and evictions; and neither ever merges onto a state that is
not the file's and the journal's (a failed group, another connection's commit). The scenarios'
logs are short, so the caching stores here keep logs from one entry on (`min_log = 1`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from peoplebase.merge import LOG_ORDER, Key, LogEntry, ProfileRow
from peoplebase.store import SqliteStore, StoreUnavailable
from peoplebase.store.writeback import ProfileState, WriteBack
from tests.test_merge import (
    TOKEN,
    Groups,
    Raw,
    arrivals,
    rec,
    records,
    reference,
    tied_times,
    to_updates,
)

_tokens = itertools.count()


class Clock:
    """A clock that moves on by `step` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def open_sqlite(
    path: Path, min_log: int = 1, clock: float | None = None, **kwargs: Any
) -> SqliteStore:
    """A store on `path`; `clock`: its write-behind schedule runs on a Clock of that step."""
    store = SqliteStore(str(path), synchronous="normal", **kwargs)
    store.writeback.min_log = min_log
    if clock is not None:
        store.clock = Clock(clock)
    store.open()
    return store


def logs_held(store: SqliteStore) -> dict[Key, ProfileState]:
    """The held states that keep their decoded log."""
    return {k: s for k, s in store.writeback.states.items() if s.log is not None}


def table_rows(store: SqliteStore, token: str) -> tuple[list[Any], list[Any]]:
    """Every stored column of a project's profiles and log chunks, in a fixed order, once
    every acknowledged update is in the rows."""
    store.fresh()
    project = store.project_by_token(token)
    if project is None:
        return [], []
    conn = store._reader()
    profiles = list(
        conn.execute(
            "SELECT distinct_id, props, last_time, base, tomb, log_min, log_n, log_floor, tail, "
            "tail_n, chunks, jid FROM profiles WHERE project_id = ? ORDER BY distinct_id",
            (project.id,),
        )
    )
    chunks = list(
        conn.execute(
            "SELECT distinct_id, last_seq, entries FROM log_chunks WHERE project_id = ? "
            "ORDER BY distinct_id, last_seq",
            (project.id,),
        )
    )
    return profiles, chunks


def retoken(groups: Groups, token: str) -> Groups:
    return [
        [[{**raw, "$token": token} for raw in request] for request in group] for group in groups
    ]


def run(store: SqliteStore, groups: Groups) -> list[tuple[int, int, int]]:
    out = []
    for group in groups:
        out.extend(
            (r.dropped, r.late, r.beyond_window) for r in store.write_group(to_updates(group))
        )
    return out


Stores = tuple[SqliteStore, ...]


def variants(tmp_path: Path, **settings: Any) -> Stores:
    """The first writes through and keeps no decoded log; the others: a roomy log cache, one
    so small it evicts in nearly every group, rows written behind at the end only, rows
    written behind a few at a time (each group sees a quarter of the interval pass), and
    that with room for two states only (rows written at once, states evicted all the time)."""
    return (
        open_sqlite(tmp_path / "plain.db", log_cache=0, **settings),
        open_sqlite(tmp_path / "cached.db", **settings),
        open_sqlite(tmp_path / "tiny.db", log_cache=24, **settings),
        open_sqlite(tmp_path / "behind.db", write_behind=3600.0, **settings),
        open_sqlite(tmp_path / "slices.db", write_behind=1.0, clock=0.25, **settings),
        open_sqlite(
            tmp_path / "crowded.db", write_behind=1.0, clock=0.25, held_profiles=2, **settings
        ),
    )


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Stores]:
    stores = variants(tmp_path)
    yield stores
    for store in stores:
        store.close()


def same_rows(stores: Stores, groups: Groups) -> tuple[list[Any], list[Any]]:
    token = f"{TOKEN}-{next(_tokens)}"
    groups = retoken(groups, token)
    outcomes = [run(store, groups) for store in stores]
    for other in outcomes[1:]:
        assert other == outcomes[0]
    plain = table_rows(stores[0], token)
    for store in stores[1:]:
        assert table_rows(store, token) == plain
    return plain


def test_cached_stores_write_the_same_rows(pair: Stores) -> None:
    @hypothesis_settings(max_examples=120, deadline=None)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        recs = data.draw(records(tied_times))
        groups = data.draw(arrivals(recs))
        same_rows(pair, groups)
        # and every request again, in any order: each is a retry, found in cached logs too
        again: list[list[Raw]] = data.draw(
            st.permutations([request for group in groups for request in group])
        )
        same_rows(pair, [[request] for request in again])

    check()
    assert pair[1].writeback.log_hits > 0
    assert pair[2].writeback.log_hits > 0
    # written behind, a busy profile's row is written once for all its updates
    assert pair[0].pipeline.rows_written > pair[3].pipeline.rows_written > 0


def test_long_logs_agree(pair: Stores) -> None:
    # logs past the 16-entry tail spill into chunks, and late updates on logs of
    # TOUCHED_REPLAY_MIN entries and more replay only the properties they touch, through the
    # log's index kept with the held row: both read the held decoded logs
    spilled = []

    @hypothesis_settings(max_examples=25, deadline=None)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        recs = data.draw(records(st.integers(0, 200), min_size=60, max_size=150))
        _, chunks = same_rows(pair, data.draw(arrivals(recs)))
        spilled.append(len(chunks))

    check()
    assert max(spilled) > 0  # the scenarios did reach the chunks


def agree_on_random_groups(tmp_path: Path, max_size: int, **settings: Any) -> None:
    """The variants agree on random arrivals, under `settings`."""
    stores = variants(tmp_path, **settings)
    try:

        @hypothesis_settings(max_examples=40, deadline=None)
        @given(st.data())
        def check(data: st.DataObject) -> None:
            recs = data.draw(records(st.integers(0, 60), max_size=max_size))
            same_rows(stores, data.draw(arrivals(recs)))

        check()
    finally:
        for store in stores:
            store.close()


@pytest.mark.parametrize("limit", [3, 20])
def test_cut_logs_agree(tmp_path: Path, limit: int) -> None:
    agree_on_random_groups(tmp_path, 40, max_log_entries=limit)


def test_window_compaction_agrees(tmp_path: Path) -> None:
    agree_on_random_groups(tmp_path, 30, reorder_window=10.0)


def test_a_late_update_reads_the_cached_log(tmp_path: Path) -> None:
    store = open_sqlite(tmp_path / "p.db", min_log=100)
    try:
        store.write_group(to_updates([[rec(t, set={"p": t}) for t in range(10, 110)]]))
        assert len(logs_held(store)) == 0  # nothing read the log yet: nothing kept
        store.write_group(to_updates([[rec(5, set={"p": "late", "q": 1})]]))
        ((_, cached),) = logs_held(store).items()
        assert cached.log is not None and len(cached.log) == 101
        # the next late update is served from that decoded log and still lands in place
        store.write_group(to_updates([[rec(7, set={"q": 2}), rec(8, union={"l": ["x"]})]]))
        assert store.writeback.log_hits == 1
        assert store.writeback.log_entries == 103
        project = store.project_by_token(TOKEN)
        assert project is not None
        ((_, props),) = store.get_profiles(project.id, ["a"])
        assert props == {"p": 109, "q": 2, "l": ["x"], "$last_seen": props["$last_seen"]}
        # a log shorter than min_log is not kept
        store.write_group(to_updates([[rec(t, did="b", set={"p": t}) for t in range(10, 98)]]))
        store.write_group(to_updates([[rec(5, did="b", set={"p": "late"})]]))
        assert len(logs_held(store)) == 1
    finally:
        store.close()


def test_cached_logs_stay_in_order(tmp_path: Path) -> None:
    # late entries are put in their place in the kept log, in-order ones at its end: the next
    # group gets it in ($time, seq) order, and a rewrite (a $delete) writes it as it is
    store = open_sqlite(tmp_path / "p.db")
    try:
        groups = [
            [[rec(t, add={"n": 1}, nonce=t) for t in range(10, 40)]],
            [[rec(5, set={"p": 1}), rec(41, set={"p": 2}), rec(20, add={"n": 2})]],
            [[rec(42, union={"l": [1]}), rec(15, set={"q": 1}), rec(15, set={"q": 2})]],
            [[rec(12, delete=1), rec(13, append={"l": 3})]],
        ]
        arrived = []
        for i, group in enumerate(groups):
            arrived.extend(group[0])
            store.write_group(to_updates(group))
            if i:  # the first group read no log: nothing kept
                ((_, cached),) = logs_held(store).items()
                assert cached.log is not None
                assert cached.log == sorted(cached.log, key=LOG_ORDER)
        project = store.project_by_token(TOKEN)
        assert project is not None
        ((_, props),) = store.get_profiles(project.id, ["a"])
        assert props == reference(arrived)["a"]
    finally:
        store.close()


@pytest.mark.parametrize(
    "groups",
    [
        # the retry keys of a cached log are built at the second group's retry check; the
        # third group's record joins them, and its resend in the fourth is recognised
        [[[rec(5, add={"n": 1})]], [[rec(3, add={"n": 10})]], [[rec(4, add={"n": 100})]]]
        + [[[rec(4, add={"n": 100})]]],
        # a cached entry came from request 0 of its group; a resend in request 0 of a later
        # group, after a late update there loaded the log, is still a resend
        [[[rec(5, add={"n": 1})]], [[rec(3, add={"n": 10})]]]
        + [[[rec(1, add={"n": 1000}), rec(3, add={"n": 10})]]],
    ],
    ids=["keys-of-new-entries", "request-of-earlier-group"],
)
def test_retries_of_cached_entries(tmp_path: Path, groups: Groups) -> None:
    plain = open_sqlite(tmp_path / "plain.db", log_cache=0)
    cached = open_sqlite(tmp_path / "cached.db")
    try:
        outcomes = run(plain, groups)
        assert outcomes[-1][0] == 1  # the resend is dropped
        assert run(cached, groups) == outcomes
        assert cached.writeback.log_hits >= 1
        assert table_rows(cached, TOKEN) == table_rows(plain, TOKEN)
    finally:
        plain.close()
        cached.close()


# --- never a state the file does not hold ----------------------------------------------------


def test_another_connections_commit_is_seen(tmp_path: Path) -> None:
    # two writers on one file (a second server, a CLI command): each must merge onto what the
    # other committed, not onto its own cached copy
    first = open_sqlite(tmp_path / "p.db")
    second = open_sqlite(tmp_path / "p.db")
    arrived = [
        rec(5, add={"n": 1}),
        rec(2, add={"n": 1}),  # late: `first` reads the log, then keeps it
        rec(6, add={"n": 10}, set={"by": "second"}),
        rec(3, add={"n": 100}),  # late again, on top of what `second` wrote
    ]
    try:
        first.write_group(to_updates([[arrived[0]]]))
        first.write_group(to_updates([[arrived[1]]]))
        assert len(logs_held(first)) == 1
        second.write_group(to_updates([[arrived[2]]]))
        first.write_group(to_updates([[arrived[3]]]))
        project = first.project_by_token(TOKEN)
        assert project is not None
        ((_, props),) = first.get_profiles(project.id, ["a"])
        assert props["n"] == 112
        assert props == reference(arrived)["a"]
        # what the writer holds now is the file's state, with `second`'s update in it (the
        # merge made onto the old held copy was made again, inside the write transaction)
        ((_, kept),) = logs_held(first).items()
        assert kept.row.props == props
        assert kept.log is not None and len(kept.log) == 4
    finally:
        first.close()
        second.close()


def test_a_failed_group_leaves_no_trace_in_the_cache(tmp_path: Path) -> None:
    # a group that fails after merging (here a trigger refuses one of its rows) is rolled back:
    # the rows it changed in memory must not be the next group's starting point
    store = open_sqlite(tmp_path / "p.db")
    try:
        store.write_group(to_updates([[rec(3, add={"n": 1}), rec(3, did="b", set={"x": 1})]]))
        # late updates: both logs are read, then kept
        store.write_group(to_updates([[rec(2, add={"n": 1}), rec(2, did="b", set={"y": 2})]]))
        assert len(logs_held(store)) == 2
        # on the writer's own connection: another one's commit would clear the cache anyway
        conn = store._writer()
        conn.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE ON profiles WHEN NEW.distinct_id = 'b' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        with pytest.raises((apsw.Error, StoreUnavailable)):
            store.write_group(
                to_updates([[rec(1, add={"n": 1000}), rec(1, did="b", set={"x": 3})]])
            )
        conn.execute("DROP TRIGGER refuse")
        # in order this time: applied straight onto the state the cache hands out
        store.write_group(to_updates([[rec(9, add={"n": 10}), rec(9, did="b", set={"z": 0})]]))
        project = store.project_by_token(TOKEN)
        assert project is not None
        profiles = dict(store.get_profiles(project.id, ["a", "b"]))
        assert profiles["a"]["n"] == 12
        assert profiles["b"]["x"] == 1
        counts = dict(store._reader().execute("SELECT distinct_id, log_n FROM profiles"))
        assert counts == {"a": 3, "b": 3}
    finally:
        store.close()


# --- the held states and the schedule -------------------------------------------------------


def state(log: int | None = None, dirty: bool = False) -> ProfileState:
    entries = None if log is None else [LogEntry(0.0, i, None, body={"o": {}}) for i in range(log)]
    return ProfileState(ProfileRow(), None, None, None, None, 0, 0, True, dirty=dirty, log=entries)


def test_least_recently_used_logs_go_first() -> None:
    held = WriteBack(log_budget=40, min_log=1)
    for n in range(3):
        held.hold((1, str(n)), state(10))
    again = held.get((1, "0"))
    assert again is not None
    held.hold((1, "0"), again)  # used again: now the newest
    held.hold((1, "3"), state(10))
    held.hold((1, "4"), state(10))  # 50 entries: the least recently used log goes
    held.evict()
    kept = {k for k, s in held.states.items() if s.log is not None}
    assert kept == {(1, "0"), (1, "2"), (1, "3"), (1, "4")}
    assert held.log_entries == 40
    assert len(held) == 5  # the states stay: only the log was dropped


def test_only_logs_of_a_useful_length_are_kept() -> None:
    held = WriteBack(log_budget=40, min_log=5)
    held.hold((1, "short"), state(4))
    held.hold((1, "long"), state(11))  # more than a quarter of the whole budget
    held.hold((1, "fits"), state(10))
    assert {k for k, s in held.states.items() if s.log is not None} == {(1, "fits")}
    # a profile whose log grew past the bound drops it, rather than keeping it stale
    grown = held.get((1, "fits"))
    assert grown is not None and grown.log is not None
    grown.log.extend(grown.log[:2])
    held.hold((1, "fits"), grown)
    assert grown.log is None and held.log_entries == 0


def test_size_zero_keeps_no_log() -> None:
    held = WriteBack(log_budget=0, min_log=1)
    held.hold((1, "a"), state(1))
    assert held.log_entries == 0 and held.states[(1, "a")].log is None


def test_clean_states_go_least_recently_used_first_changed_ones_stay() -> None:
    held = WriteBack(max_profiles=2)
    held.hold((1, "a"), state(dirty=True))
    held.hold((1, "b"), state())
    held.hold((1, "c"), state())
    held.hold((1, "d"), state())
    held.evict()
    assert list(held.states) == [(1, "a"), (1, "d")]  # "a" is not written yet: it stays
    held.drop_clean()
    assert list(held.states) == [(1, "a")]
    epoch = held.epoch
    held.drop()
    assert len(held) == 0 and held.epoch == epoch + 1


def test_write_through_writes_every_changed_state_at_once() -> None:
    held = WriteBack(interval=0.0)
    for did in "cab":
        held.hold((1, did), state(dirty=True))
    due, trim = held.due(0.0, 7)
    assert [k for k, _ in due] == [(1, "a"), (1, "b"), (1, "c")] and trim is None


def test_a_cycle_writes_in_key_order_as_time_passes_then_trims_the_journal() -> None:
    held = WriteBack(interval=1.0)
    for i in range(8):
        held.hold((1, f"u{i}"), state(dirty=True))
    due, trim = held.due(10.0, jid=100)  # starts the cycle: no time has passed, nothing due
    assert due == [] and trim is None
    due, trim = held.due(10.3, jid=101)  # 0.3 of the interval: 2 of the cycle's 8 keys
    assert [k for k, _ in due] == [(1, "u0"), (1, "u1")] and trim is None
    for key, s in due:
        held.written(key, s)
    held.hold((1, "u9"), state(dirty=True))  # changed after the cycle started: the next one's
    due, trim = held.due(10.5, jid=102)  # half the interval: up to half of the keys
    assert [k for k, _ in due] == [(1, "u2"), (1, "u3")] and trim is None
    for key, s in due:
        held.written(key, s)
    held.hold((1, "u5"), state(dirty=True))  # changed again before its turn: written once
    due, trim = held.due(12.0, jid=103)  # past the interval: the rest of the cycle
    assert [k for k, _ in due] == [(1, f"u{i}") for i in range(4, 8)]
    assert trim == 100  # every update of group 100 and older is in the rows now
    for key, s in due:
        held.written(key, s)
    due, trim = held.due(12.0, jid=104)  # the next cycle: what changed meanwhile
    assert due == [] and trim is None
    due, trim = held.due(13.0, jid=105)
    assert [k for k, _ in due] == [(1, "u9")] and trim == 104


def test_a_crowded_writer_writes_the_whole_cycle_at_once() -> None:
    held = WriteBack(interval=60.0, max_profiles=3)
    for i in range(5):
        held.hold((1, f"u{i}"), state(dirty=True))
    due, trim = held.due(0.0, jid=5)
    assert len(due) == 5 and trim == 5


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="log cache"):
        SqliteStore(str(tmp_path / "p.db"), log_cache=-1)
    with pytest.raises(ValueError, match="write_behind"):
        SqliteStore(str(tmp_path / "p.db"), write_behind=-1.0)


def test_the_settings_reach_the_writer(tmp_path: Path) -> None:
    # `--log-cache`, `--write-behind` and `--held-profiles` reach the store of whichever
    # process runs the merge
    from peoplebase.app import PeoplebaseApp
    from peoplebase.settings import Settings

    settings = Settings(
        db=str(tmp_path / "t.db"), writer="thread", log_cache=0, write_behind=2.5, held_profiles=7
    )
    thread = PeoplebaseApp(settings)
    assert isinstance(thread.store, SqliteStore)
    held = thread.store.writeback
    assert (held.log_budget, held.interval, held.max_profiles) == (0, 2.5, 7)
    thread.store.close()
    process = PeoplebaseApp(settings.replace(db=str(tmp_path / "p.db"), writer="process"))
    assert process.write_process is not None
    kwargs = process.write_process.store_kwargs
    assert (kwargs["log_cache"], kwargs["write_behind"], kwargs["held_profiles"]) == (0, 2.5, 7)
    assert isinstance(process.store, SqliteStore)
    process.store.close()


def test_the_field_order_the_positional_loads_rely_on() -> None:
    """sqlite_write builds these positionally when it loads rows and log entries (keywords
    cost a dataclass's __init__ more): a field added or moved must be added there too."""
    import dataclasses

    from peoplebase.merge import LogEntry, ProfileRow
    from peoplebase.store.writeback import ProfileState

    names = [f.name for f in dataclasses.fields(ProfileRow)]
    assert names[:9] == [
        "props", "last_time", "base", "tomb", "log_min", "log_n", "log_floor", "dirty", "jid",
    ]  # fmt: skip
    names = [f.name for f in dataclasses.fields(ProfileState)]
    assert names[:9] == [
        "row", "props_json", "base_json", "base_src", "tail", "tail_n", "file_chunks",
        "in_file", "jid",
    ]  # fmt: skip
    names = [f.name for f in dataclasses.fields(LogEntry)]
    assert names[:8] == [
        "time", "seq", "decoded", "dedup", "request", "body", "distinct_id", "received",
    ]  # fmt: skip
