"""The SQLite writer's cache of busy profiles' rows and decoded logs (store/rowcache.py).

The cache must be invisible: a store that keeps rows and decoded logs between groups writes
byte for byte the same rows as one that reads everything from the file, whatever the arrival
order, retries, deletes, log cuts and evictions; and it never hands out a state that is not the
file's committed one (a failed group, another connection's commit). The scenarios' logs are
short, so the cached stores here keep logs from one entry on (`min_log = 1`).
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

from peoplebase.merge import LOG_ORDER, LogEntry, ProfileRow
from peoplebase.store import SqliteStore, StoreUnavailable
from peoplebase.store.rowcache import Cached, RowCache
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


def open_sqlite(path: Path, min_log: int = 1, **kwargs: Any) -> SqliteStore:
    store = SqliteStore(str(path), synchronous="normal", **kwargs)
    store.row_cache.min_log = min_log
    store.open()
    return store


def table_rows(store: SqliteStore, token: str) -> tuple[list[Any], list[Any]]:
    """Every stored column of a project's profiles and log chunks, in a fixed order."""
    project = store.project_by_token(token)
    if project is None:
        return [], []
    conn = store._reader()
    profiles = list(
        conn.execute(
            "SELECT distinct_id, props, last_time, base, tomb, log_min, log_n, log_floor, tail, "
            "tail_n, chunks FROM profiles WHERE project_id = ? ORDER BY distinct_id",
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


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[SqliteStore, SqliteStore, SqliteStore]]:
    """A store without the cache, one with a roomy cache, one with a cache so small that it
    evicts in nearly every group."""
    stores = (
        open_sqlite(tmp_path / "plain.db", log_cache=0),
        open_sqlite(tmp_path / "cached.db"),
        open_sqlite(tmp_path / "tiny.db", log_cache=24),
    )
    yield stores
    for store in stores:
        store.close()


def same_rows(stores: tuple[SqliteStore, ...], groups: Groups) -> tuple[list[Any], list[Any]]:
    token = f"{TOKEN}-{next(_tokens)}"
    groups = retoken(groups, token)
    outcomes = [run(store, groups) for store in stores]
    assert outcomes[1] == outcomes[0]
    assert outcomes[2] == outcomes[0]
    plain = table_rows(stores[0], token)
    assert table_rows(stores[1], token) == plain
    assert table_rows(stores[2], token) == plain
    return plain


def test_cached_stores_write_the_same_rows(
    pair: tuple[SqliteStore, SqliteStore, SqliteStore],
) -> None:
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
    assert pair[1].row_cache.hits > 0
    assert pair[2].row_cache.hits > 0


def test_long_logs_agree(pair: tuple[SqliteStore, SqliteStore, SqliteStore]) -> None:
    # logs past the 16-entry tail spill into chunks, and late updates on logs of
    # TOUCHED_REPLAY_MIN entries and more replay only the properties they touch, through the
    # log's index kept with the cached row: both read the cached decoded logs
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
    """Stores without, with and with a tiny cache agree on random arrivals, under `settings`."""
    stores = (
        open_sqlite(tmp_path / "plain.db", log_cache=0, **settings),
        open_sqlite(tmp_path / "cached.db", **settings),
        open_sqlite(tmp_path / "tiny.db", log_cache=12, **settings),
    )
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
        assert len(store.row_cache) == 0  # nothing read the log yet: nothing kept
        store.write_group(to_updates([[rec(5, set={"p": "late", "q": 1})]]))
        ((_, cached),) = store.row_cache._entries.items()
        assert len(cached.log) == 101
        # the next late update is served from that decoded log and still lands in place
        store.write_group(to_updates([[rec(7, set={"q": 2}), rec(8, union={"l": ["x"]})]]))
        assert store.row_cache.hits == 1
        assert store.row_cache.log_entries == 103
        project = store.project_by_token(TOKEN)
        assert project is not None
        ((_, props),) = store.get_profiles(project.id, ["a"])
        assert props == {"p": 109, "q": 2, "l": ["x"], "$last_seen": props["$last_seen"]}
        # a log shorter than min_log is not kept
        store.write_group(to_updates([[rec(t, did="b", set={"p": t}) for t in range(10, 98)]]))
        store.write_group(to_updates([[rec(5, did="b", set={"p": "late"})]]))
        assert len(store.row_cache) == 1
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
                ((_, cached),) = store.row_cache._entries.items()
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
        assert cached.row_cache.hits >= 1
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
        assert len(first.row_cache) == 1
        second.write_group(to_updates([[arrived[2]]]))
        first.write_group(to_updates([[arrived[3]]]))
        project = first.project_by_token(TOKEN)
        assert project is not None
        ((_, props),) = first.get_profiles(project.id, ["a"])
        assert props["n"] == 112
        assert props == reference(arrived)["a"]
        # what the cache keeps now is the file's state, with `second`'s update in it (the
        # merge made onto the old cached copy was made again, inside the write transaction)
        ((_, kept),) = first.row_cache._entries.items()
        assert kept.row.props == props
        assert len(kept.log) == 4
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
        assert len(store.row_cache) == 2
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


def test_negative_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="log cache"):
        SqliteStore(str(tmp_path / "p.db"), log_cache=-1)


# --- the cache itself ------------------------------------------------------------------------


def entry(log: int) -> Cached:
    return Cached(
        ProfileRow(), None, 0, 0, [LogEntry(0.0, i, None, body={"o": {}}) for i in range(log)]
    )


def test_least_recently_used_go_first() -> None:
    cache = RowCache(log_entries=40, min_log=1)
    for n in range(3):
        cache.put((1, str(n)), entry(10))
    taken = cache.take((1, "0"))
    assert taken is not None
    cache.put((1, "0"), taken)  # used again: now the newest
    cache.put((1, "3"), entry(10))
    cache.put((1, "4"), entry(10))  # 50 entries: the least recently used goes
    assert set(cache._entries) == {(1, "0"), (1, "2"), (1, "3"), (1, "4")}
    assert cache.log_entries == 40
    assert cache.take((1, "1")) is None
    assert cache.hits == 1


def test_only_logs_of_a_useful_length_are_kept() -> None:
    cache = RowCache(log_entries=40, min_log=5)
    cache.put((1, "short"), entry(4))
    cache.put((1, "long"), entry(11))  # more than a quarter of the whole budget
    cache.put((1, "fits"), entry(10))
    assert set(cache._entries) == {(1, "fits")}
    # a profile whose log grew past the bound is dropped, not kept stale
    cache.put((1, "fits"), entry(12))
    assert len(cache) == 0 and cache.log_entries == 0


def test_a_new_data_version_clears() -> None:
    cache = RowCache(log_entries=40, min_log=1)
    cache.check(5)
    cache.put((1, "a"), entry(3))
    cache.check(5)
    assert len(cache) == 1
    cache.check(6)
    assert len(cache) == 0 and cache.log_entries == 0


def test_size_zero_keeps_nothing() -> None:
    cache = RowCache(log_entries=0, min_log=1)
    cache.put((1, "a"), entry(1))
    assert len(cache) == 0


def test_the_setting_reaches_the_writer(tmp_path: Path) -> None:
    # `--log-cache` sizes the cache of whichever process runs the merge
    from peoplebase.app import PeoplebaseApp
    from peoplebase.settings import Settings

    thread = PeoplebaseApp(Settings(db=str(tmp_path / "t.db"), writer="thread", log_cache=0))
    assert isinstance(thread.store, SqliteStore)
    assert thread.store.row_cache.budget == 0
    thread.store.close()
    process = PeoplebaseApp(Settings(db=str(tmp_path / "p.db"), log_cache=5000))
    assert process.write_process is not None
    assert process.write_process.store_kwargs["log_cache"] == 5000
    assert isinstance(process.store, SqliteStore)
    process.store.close()
