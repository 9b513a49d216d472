"""Each store agrees with the reference backend and the reference fold (SPEC §4).

The random scenarios of test_merge.py run through `write_group` (one merge transaction per
group) on SQLite and on PostgreSQL, and are read back through the store: the profiles, the
outcome counts and the stored update logs must equal those of `MemoryBackend`, and the
profiles those of the reference fold.

One store serves a whole test (a PostgreSQL database per example would be too slow); every
example writes under a project token of its own, so examples never see each other's profiles.
Arrival numbers (`seq`) are compared by their order within a profile's log: that order is the
contract; their values are not (SQLite numbers every arrival, PostgreSQL numbers per profile).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from peoplebase.merge import MemoryBackend, Merger, encode_update
from peoplebase.store import ProfileStore, is_postgres_url, open_store
from peoplebase.types import Applied, Props
from tests.test_merge import (
    IDS,
    TOKEN,
    WINDOW,
    Groups,
    Raw,
    arrivals,
    flatten,
    in_window_arrivals,
    rec,
    records,
    reference,
    tied_times,
    to_updates,
)

pytestmark = pytest.mark.all_backends  # every test on SQLite and on PostgreSQL

# PostgreSQL runs each example several times slower than SQLite: half as many examples there.
EXAMPLE_SHARE = {"sqlite": 1.0, "postgres": 0.5}

_tokens = itertools.count()

# one entry of a profile's stored log: ($time, rank of seq in the log, dedup key, body)
Entry = tuple[float, int, int | None, Any]
StoreFactory = Callable[..., ProfileStore]


def examples(backend: str, n: int) -> hypothesis_settings:
    return hypothesis_settings(max_examples=max(1, int(n * EXAMPLE_SHARE[backend])), deadline=None)


def new_token() -> str:
    return f"{TOKEN}-{next(_tokens)}"


def retoken(groups: Groups, token: str) -> Groups:
    """The same arrivals under another project token."""
    return [
        [[{**raw, "$token": token} for raw in request] for request in group] for group in groups
    ]


def connect(
    db_url: str, window: float = 7 * 86400.0, max_log_entries: int = 0
) -> ProfileStore:
    # synchronous=normal: durability is not what these tests are about, agreement is
    store = open_store(
        db_url, synchronous="normal", reorder_window=window, max_log_entries=max_log_entries
    )
    if is_postgres_url(db_url):
        store.migrate()  # type: ignore[attr-defined]
    store.open()
    return store


@pytest.fixture
def make_store(db_url: str) -> Iterator[StoreFactory]:
    """Opens stores on this test's database (SQLite file or PostgreSQL database)."""
    opened: list[ProfileStore] = []

    def make(window: float = 7 * 86400.0, max_log_entries: int = 0) -> ProfileStore:
        store = connect(db_url, window, max_log_entries)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: StoreFactory) -> ProfileStore:
    return make_store()


def run_store(store: ProfileStore, groups: Groups) -> list[Applied]:
    results: list[Applied] = []
    for group in groups:
        results.extend(store.write_group(to_updates(group)))
    return results


def read_back(store: ProfileStore, token: str) -> dict[str, Props | None]:
    project = store.project_by_token(token)
    if project is None:
        return {did: None for did in IDS}
    found = dict(store.get_profiles(project.id, list(IDS)))
    return {did: found.get(did) for did in IDS}


def exact(profiles: dict[str, Props | None]) -> bytes:
    """Profiles as canonical JSON: tells 1e16 from 10**16 and 1.0 from 1, where == does not."""
    return orjson.dumps(profiles, option=orjson.OPT_SORT_KEYS)


def counts(results: list[Applied]) -> list[tuple[int, int, int]]:
    return [(r.dropped, r.late, r.beyond_window) for r in results]


def ranked(entries: list[tuple[float, int, int | None, Any]]) -> list[Entry]:
    """A log in ($time, seq) order, each seq replaced by its rank among the log's seqs."""
    rank = {seq: i for i, seq in enumerate(sorted(e[1] for e in entries))}
    return [(t, rank[s], d, body) for t, s, d, body in sorted(entries, key=lambda e: e[:2])]


def logs_of(store: ProfileStore, token: str) -> dict[str, list[Entry]]:
    project = store.project_by_token(token)
    assert project is not None
    out = {}
    for did in IDS:
        detail = store.profile_detail(project.id, did)
        log = detail["log"] if detail is not None else []
        out[did] = ranked(
            [(e.time, e.seq, e.dedup, orjson.loads(encode_update(e.update))) for e in log]
        )
    return out


def memory_profiles(backend: MemoryBackend, token: str) -> dict[str, Props | None]:
    return {did: backend.profile(token, did) for did in IDS}


def memory_logs(backend: MemoryBackend, token: str) -> dict[str, list[Entry]]:
    pid = backend.projects[token]
    return {
        did: ranked([(t, s, d, orjson.loads(b)) for t, s, b, d in backend.logs.get((pid, did), [])])
        for did in IDS
    }


def agree(
    store: ProfileStore, groups: Groups, merger: Merger | None = None, reference_fold: bool = True
) -> str:
    """The store, the memory backend and (unless told otherwise) the reference fold all give
    the same profiles.

    Returns the project token the store's copy of the arrivals was written under.
    """
    token = new_token()
    groups = retoken(groups, token)  # dedup keys depend on the token: the same on both sides
    backend = MemoryBackend()
    merger = merger or Merger()
    mem_results: list[Applied] = []
    for group in groups:
        mem_results.extend(merger.apply(backend, to_updates(group)))
    store_results = run_store(store, groups)
    stored = read_back(store, token)
    assert stored == memory_profiles(backend, token)
    if reference_fold:
        assert stored == reference(flatten(groups))
    assert exact(stored) == exact(memory_profiles(backend, token))
    assert counts(store_results) == counts(mem_results)
    assert logs_of(store, token) == memory_logs(backend, token)
    return token


def test_random_arrivals_agree(store: ProfileStore, backend: str) -> None:
    @examples(backend, 100)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        recs = data.draw(records(tied_times))
        agree(store, data.draw(arrivals(recs)))

    check()


def test_compaction_agrees(make_store: StoreFactory, backend: str) -> None:
    store = make_store(window=float(WINDOW))

    @examples(backend, 60)
    @given(in_window_arrivals())
    def check(groups: Groups) -> None:
        token = agree(store, groups, Merger(reorder_window=float(WINDOW)))
        project = store.project_by_token(token)
        assert project is not None
        for did in IDS:
            detail = store.profile_detail(project.id, did)
            if detail is None:
                continue
            # nothing older than 1.5 windows stays in the stored log
            assert all(e.time >= detail["last_time"] - 1.5 * WINDOW for e in detail["log"])

    check()


def test_cut_logs_agree(make_store: StoreFactory, backend: str) -> None:
    # a log longer than max_log_entries is cut: updates older than the cut are applied on top,
    # identically on every store
    store = make_store(max_log_entries=3)

    @examples(backend, 60)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        recs = data.draw(records(st.integers(0, 30), max_size=16))
        token = agree(
            store, data.draw(arrivals(recs)), Merger(max_log_entries=3), reference_fold=False
        )
        project = store.project_by_token(token)
        assert project is not None
        for did in IDS:
            detail = store.profile_detail(project.id, did)
            assert detail is None or len(detail["log"]) <= 3

    check()


def test_retries_change_nothing(store: ProfileStore, backend: str) -> None:
    @examples(backend, 60)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        recs = data.draw(records(tied_times))
        token = new_token()
        groups = retoken(data.draw(arrivals(recs)), token)
        run_store(store, groups)
        before = read_back(store, token)
        assert before == reference(flatten(groups))
        again: list[list[Raw]] = data.draw(
            st.permutations([request for group in groups for request in group])
        )
        for request in again:
            (result,) = store.write_group(to_updates([request]))
            assert result.dropped == len(request)
        assert read_back(store, token) == before

    check()


def test_profiles_survive_reopen(store: ProfileStore, db_url: str) -> None:
    groups: Groups = [
        [[rec(10, set={"p": 1}), rec(5, set_once={"q": 1})]],
        [[rec(0, set={"p": 0}, union={"l": ["x"]})], [rec(20, add={"n": 2})]],
    ]
    run_store(store, groups)
    expected = reference(flatten(groups))
    store.close()
    reopened = connect(db_url)
    try:
        assert read_back(reopened, TOKEN) == expected
        # a late update after the reopen replays from the stored log
        reopened.write_group(to_updates([[rec(1, set={"p": "late", "r": 1})]]))
        assert read_back(reopened, TOKEN) == reference(
            [*flatten(groups), rec(1, set={"p": "late", "r": 1})]
        )
        # and a retry of a record from before the reopen is recognised
        (result,) = reopened.write_group(to_updates([[rec(20, add={"n": 2})]]))
        assert result.dropped == 1
        assert read_back(reopened, TOKEN)["a"]["n"] == 2  # type: ignore[index]
    finally:
        reopened.close()


def test_delete_then_same_time_update(store: ProfileStore) -> None:
    # SPEC §4: after a $delete at t, what arrives with $time <= t is dropped (t included)
    delete = rec(10, delete=1)
    groups: Groups = [
        [[rec(0, set={"p": 1}), rec(10, set={"r": 1})]],
        [[delete]],
        [[rec(10, set={"q": 1})], [rec(9, set={"old": 1})]],
        [[dict(delete)]],
    ]
    results = run_store(store, groups)
    assert read_back(store, TOKEN)["a"] is None
    assert [r.dropped for r in results] == [0, 0, 1, 1, 1]
    results = run_store(store, [[[rec(11, set={"s": 1})]]])
    assert read_back(store, TOKEN)["a"] == {"s": 1, "$last_seen": "2023-11-14T22:13:31"}
    assert [r.dropped for r in results] == [0]


def test_numbers_come_back_as_they_were_stored(store: ProfileStore) -> None:
    # PostgreSQL keeps profiles as JSONB (numbers as `numeric`): 1e16 must stay a float there
    values = {
        "big": 1e16,
        "negative": -1.5e19,
        "huge": 1e300,
        "tiny": 5e-324,
        "small": 1.5e-10,
        "whole": 100.0,
        "int": 2**63 - 1,
        "text": 'looks like 1e+16 and "2e+17"',
        "list": [1e17, 3, 2.5, "4e+18"],
    }
    groups: Groups = [
        [[rec(0, set=values)]],
        [[rec(1, add={"big": 1, "whole": 1})]],
        [[rec(-1, set_once={"late": 1e18})]],  # replayed: the stored profile is read back
    ]
    run_store(store, groups)
    stored = read_back(store, TOKEN)
    expected = reference(flatten(groups))
    assert exact(stored) == exact(expected)
    profile = stored["a"]
    assert profile is not None
    assert isinstance(profile["big"], float) and profile["big"] == 1e16  # 1e16 + 1 rounds
    assert isinstance(profile["late"], float) and profile["int"] == 2**63 - 1
