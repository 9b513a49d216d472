"""The SQLite store agrees with the reference backend and the reference fold (SPEC §4).

The random scenarios of test_merge.py run through `SqliteStore.write_group` on a real file
(one merge transaction per group), and are read back with `get_profiles`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peoplebase.merge import MemoryBackend, Merger
from peoplebase.store.sqlite import SqliteStore
from peoplebase.types import Applied, Props
from tests.test_merge import (
    IDS,
    TOKEN,
    WINDOW,
    Groups,
    arrivals,
    flatten,
    in_window_arrivals,
    profiles,
    rec,
    records,
    reference,
    tied_times,
    to_updates,
)

_names = itertools.count()


@pytest.fixture(scope="module")
def db_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("contract")


def fresh_store(folder: Path, window: float = 7 * 86400.0) -> SqliteStore:
    # synchronous=normal: durability is not what these tests are about, agreement is
    store = SqliteStore(str(folder / f"s{next(_names)}.db"), "normal", reorder_window=window)
    store.open()
    return store


def run_sqlite(store: SqliteStore, groups: Groups) -> list[Applied]:
    results: list[Applied] = []
    for group in groups:
        results.extend(store.write_group(to_updates(group)))
    return results


def read_back(store: SqliteStore) -> dict[str, Props | None]:
    project = store.project_by_token(TOKEN)
    if project is None:
        return {did: None for did in IDS}
    found = dict(store.get_profiles(project.id, list(IDS)))
    return {did: found.get(did) for did in IDS}


def counts(results: list[Applied]) -> list[tuple[int, int, int]]:
    return [(r.dropped, r.late, r.beyond_window) for r in results]


def logs_of(store: SqliteStore) -> dict[str, list[tuple[float, int]]]:
    project = store.project_by_token(TOKEN)
    assert project is not None
    return {
        did: [(e["time"], e["seq"]) for e in store.profile_history(project.id, did)] for did in IDS
    }


def memory_logs(backend: MemoryBackend) -> dict[str, list[tuple[float, int]]]:
    pid = backend.projects[TOKEN]
    return {did: sorted((t, s) for t, s, _, _ in backend.logs.get((pid, did), [])) for did in IDS}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = fresh_store(tmp_path)
    yield s
    s.close()


def agree(store: SqliteStore, groups: Groups, merger: Merger | None = None) -> None:
    """SQLite, the memory backend and the reference fold all give the same profiles."""
    backend = MemoryBackend()
    merger = merger or Merger()
    mem_results: list[Applied] = []
    for group in groups:
        mem_results.extend(merger.apply(backend, to_updates(group)))
    sql_results = run_sqlite(store, groups)
    assert read_back(store) == profiles(backend) == reference(flatten(groups))
    assert counts(sql_results) == counts(mem_results)
    assert logs_of(store) == memory_logs(backend)


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_random_arrivals_agree(db_dir: Path, data: st.DataObject) -> None:
    recs = data.draw(records(tied_times))
    groups = data.draw(arrivals(recs))
    store = fresh_store(db_dir)
    try:
        agree(store, groups)
    finally:
        store.close()


@given(in_window_arrivals())
@settings(max_examples=60, deadline=None)
def test_compaction_agrees(db_dir: Path, groups: Groups) -> None:
    store = fresh_store(db_dir, window=float(WINDOW))
    try:
        agree(store, groups, Merger(reorder_window=float(WINDOW)))
        project = store.project_by_token(TOKEN)
        assert project is not None
        for did in IDS:
            detail = store.profile_detail(project.id, did)
            if detail is None:
                continue
            # nothing older than 1.5 windows stays in the stored log
            assert all(e.time >= detail["last_time"] - 1.5 * WINDOW for e in detail["log"])
    finally:
        store.close()


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_retries_change_nothing_in_sqlite(db_dir: Path, data: st.DataObject) -> None:
    recs = data.draw(records(tied_times))
    groups = data.draw(arrivals(recs))
    store = fresh_store(db_dir)
    try:
        run_sqlite(store, groups)
        before = read_back(store)
        assert before == reference(flatten(groups))
        again = data.draw(st.permutations([request for group in groups for request in group]))
        for request in again:
            (result,) = store.write_group(to_updates([request]))
            assert result.dropped == len(request)
        assert read_back(store) == before
    finally:
        store.close()


def test_profiles_survive_reopen(store: SqliteStore) -> None:
    groups: Groups = [
        [[rec(10, set={"p": 1}), rec(5, set_once={"q": 1})]],
        [[rec(0, set={"p": 0}, union={"l": ["x"]})], [rec(20, add={"n": 2})]],
    ]
    run_sqlite(store, groups)
    expected = reference(flatten(groups))
    store.close()
    reopened = SqliteStore(store.path)
    reopened.open()
    try:
        assert read_back(reopened) == expected
        # a late update after the reopen replays from the stored log
        reopened.write_group(to_updates([[rec(1, set={"p": "late", "r": 1})]]))
        assert read_back(reopened) == reference(
            [*flatten(groups), rec(1, set={"p": "late", "r": 1})]
        )
        # and a retry of a record from before the reopen is recognised
        (result,) = reopened.write_group(to_updates([[rec(20, add={"n": 2})]]))
        assert result.dropped == 1
        assert read_back(reopened)["a"]["n"] == 2  # type: ignore[index]
    finally:
        reopened.close()


def test_delete_then_same_time_update_in_sqlite(store: SqliteStore) -> None:
    delete = rec(10, delete=1)
    groups: Groups = [
        [[rec(0, set={"p": 1}), rec(10, set={"r": 1})]],
        [[delete]],
        [[rec(10, set={"q": 1})], [rec(9, set={"old": 1})]],
        [[dict(delete)]],
    ]
    results = run_sqlite(store, groups)
    assert read_back(store)["a"] == {"q": 1, "$last_seen": "2023-11-14T22:13:30"}
    assert [r.dropped for r in results] == [0, 0, 0, 1, 1]
