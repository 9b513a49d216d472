"""Ordering, retries and deletion (SPEC §4), checked against a simple reference fold.

The reference: keep the updates that arrive while no `$delete` at a later `$time` has been
accepted, sort them by ($time, arrival) and apply `ops.apply_update` one by one. (An update
with exactly a delete's `$time` that arrives after it comes after it in that order, so it
builds a new profile: docs/ordering.md.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peoplebase import merge as merge_module
from peoplebase import replay
from peoplebase.logindex import LOG_ORDER, LogIndex
from peoplebase.merge import LogEntry, MemoryBackend, Merger, fold
from peoplebase.ops import apply_update, format_time, touched
from peoplebase.records import Validator
from peoplebase.types import Applied, Props, Skip, Update

T0 = 1_700_000_000
NOW = float(T0 + 100_000)
TOKEN = "tok"
IDS = ("a", "b", "c")
NAMES = ("p", "q", "l")

Raw = dict[str, Any]
Groups = list[list[list[Raw]]]  # groups (one merge transaction each) → requests → records

# --- record strategies ------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([1.0, 2.5, -0.5]),
    st.sampled_from(["x", "y", "1"]),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.sampled_from(["k", "m"]), scalars, max_size=2),
)
names = st.sampled_from(NAMES)
adds = st.one_of(st.integers(-5, 5), st.sampled_from([0.5, -1.5, "2", "-1"]))


def op_strategies(names: st.SearchStrategy[str]) -> dict[str, st.SearchStrategy[Any]]:
    """A value strategy for each operation, naming properties drawn from `names`."""
    return {
        "$set": st.dictionaries(names, values, max_size=2),
        "$set_once": st.dictionaries(names, values, max_size=2),
        "$add": st.dictionaries(names, adds, min_size=1, max_size=2),
        "$union": st.dictionaries(names, st.lists(scalars, max_size=3), min_size=1, max_size=2),
        "$append": st.dictionaries(names, values, min_size=1, max_size=1),
        "$remove": st.dictionaries(names, scalars, min_size=1, max_size=1),
        "$unset": st.lists(names, min_size=1, max_size=2),
    }


OP_STRATEGIES = op_strategies(names)


@st.composite
def record_ops(draw: st.DrawFn) -> Raw:
    if draw(st.integers(0, 9)) == 0:
        return {"$delete": ""}
    chosen = draw(st.lists(st.sampled_from(list(OP_STRATEGIES)), min_size=1, max_size=3))
    return {op: draw(OP_STRATEGIES[op]) for op in chosen}


@st.composite
def records(
    draw: st.DrawFn, times: st.SearchStrategy[int], min_size: int = 1, max_size: int = 12
) -> list[Raw]:
    """Records on a few profiles, each made unique so that none is a retry of another."""
    n = draw(st.integers(min_size, max_size))
    out = []
    for i in range(n):
        raw: Raw = {"$token": TOKEN, "$distinct_id": draw(st.sampled_from(IDS)), "nonce": i}
        raw["$time"] = T0 + draw(times)
        if draw(st.integers(0, 3)) == 0:
            raw["$ignore_time"] = True
        raw.update(draw(record_ops()))
        out.append(raw)
    return out


@st.composite
def arrivals(draw: st.DrawFn, recs: list[Raw]) -> Groups:
    """The records in a random arrival order, split into requests and merge groups."""
    order = draw(st.permutations(recs))
    groups: Groups = [[[]]]
    for i, raw in enumerate(order):
        if i:
            cut = draw(st.integers(0, 3))  # 0-1: same request, 2: new request, 3: new group
            if cut == 3:
                groups.append([[]])
            elif cut == 2:
                groups[-1].append([])
        groups[-1][-1].append(raw)
    return groups


# --- the reference fold and the ways of running the merger ------------------------------------

VALIDATOR = Validator(time_skew=0.0)


def update(raw: Raw, index: int = 0) -> Update:
    """A fresh Update for a raw record (the merger may change the objects it is given)."""
    u = VALIDATOR.validate(raw, index, NOW)
    assert isinstance(u, Update), u
    return u


def flatten(groups: Groups) -> list[Raw]:
    return [raw for group in groups for request in group for raw in request]


def reference(arrived: Sequence[Raw], max_properties: int = 2000) -> dict[str, Props | None]:
    """Every distinct_id of `arrived` → its profile, by the rule of SPEC §4."""
    tomb: dict[str, float] = {}
    accepted: dict[str, list[tuple[float, int, Raw]]] = {did: [] for did in IDS}
    for i, raw in enumerate(arrived):
        u = update(raw)
        if u.time <= tomb.get(u.distinct_id, -math.inf):
            continue  # deletion is final for the past, its own $time included
        accepted[u.distinct_id].append((u.time, i, raw))
        if u.is_delete:
            tomb[u.distinct_id] = max(u.time, tomb.get(u.distinct_id, -math.inf))
    out: dict[str, Props | None] = {}
    for did, items in accepted.items():
        profile: Props | None = None
        for _, _, raw in sorted(items, key=lambda item: (item[0], item[1])):
            profile = apply_update(profile, update(raw), max_properties)
        out[did] = profile
    return out


def to_updates(group: list[list[Raw]]) -> list[list[Update]]:
    return [[update(raw, i) for i, raw in enumerate(request)] for request in group]


def run_memory(groups: Groups, merger: Merger | None = None) -> tuple[MemoryBackend, list[Applied]]:
    merger = merger or Merger()
    backend = MemoryBackend()
    results: list[Applied] = []
    for group in groups:
        results.extend(merger.apply(backend, to_updates(group)))
    return backend, results


def profiles(backend: MemoryBackend) -> dict[str, Props | None]:
    return {did: backend.profile(TOKEN, did) for did in IDS}


# --- any arrival order gives the ($time, arrival) order ---------------------------------------

tied_times = st.integers(0, 5)


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_any_arrival_order_equals_reference(data: st.DataObject) -> None:
    recs = data.draw(records(tied_times))
    groups = data.draw(arrivals(recs))
    backend, _ = run_memory(groups)
    assert profiles(backend) == reference(flatten(groups))


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_distinct_times_any_permutation_gives_time_order(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 12))
    offsets = data.draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n, unique=True))
    recs = data.draw(records(st.just(0), min_size=n, max_size=n))
    for raw, offset in zip(recs, offsets, strict=True):
        raw["$time"] = T0 + offset
    groups = data.draw(arrivals(recs))
    backend, _ = run_memory(groups)
    in_time_order = sorted(recs, key=lambda raw: raw["$time"])
    # with distinct times the arrival order does not matter at all
    assert profiles(backend) == reference(in_time_order)
    single, _ = run_memory([[in_time_order]])
    assert profiles(backend) == profiles(single)


def test_equal_times_apply_in_arrival_order() -> None:
    first = {"$token": TOKEN, "$distinct_id": "a", "$time": T0, "$set": {"p": 1}}
    second = {"$token": TOKEN, "$distinct_id": "a", "$time": T0, "$set": {"p": 2}}
    later = {"$token": TOKEN, "$distinct_id": "a", "$time": T0 + 1, "$set": {"q": 1}}
    backend, _ = run_memory([[[later]], [[first, second]]])
    assert backend.profile(TOKEN, "a") == {"p": 2, "q": 1, "$last_seen": format_time(T0 + 1)}
    backend, _ = run_memory([[[later], [second]], [[first]]])
    assert backend.profile(TOKEN, "a") == {"p": 1, "q": 1, "$last_seen": format_time(T0 + 1)}


def test_late_update_is_counted_and_replayed() -> None:
    newer = {"$token": TOKEN, "$distinct_id": "a", "$time": T0 + 10, "$set": {"p": "new"}}
    older = {"$token": TOKEN, "$distinct_id": "a", "$time": T0, "$set": {"p": "old", "q": 1}}
    backend, results = run_memory([[[newer]], [[older]]])
    assert backend.profile(TOKEN, "a") == {"p": "new", "q": 1, "$last_seen": format_time(T0 + 10)}
    assert results[1].late == 1 and results[1].dropped == 0


def test_late_updates_in_one_group_are_replayed_once_with_their_skips(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Several late updates of a profile in one group: one replay, skips still reported."""
    import peoplebase.merge as merge_module

    first = rec(10, set={"a": 1, "b": 2})
    late1, late2 = rec(5, set={"c": 3}), rec(2, add={"n": 1})
    after = rec(20, set={"d": 4})
    merger = Merger(max_properties=3)
    backend, _ = run_memory([[[first]]], merger)
    calls = 0
    real = merge_module.fold

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_module, "fold", counting)
    (result,) = merger.apply(backend, to_updates([[late1, after, late2]]))
    # fold order: n (t2), c (t5), a (t10), then b and d find the profile full
    assert backend.profile(TOKEN, "a") == {
        "n": 1,
        "c": 3,
        "a": 1,
        "$last_seen": format_time(T0 + 20),
    }
    assert result.late == 2
    assert {i: [k.field for k in v] for i, v in result.skips.items()} == {1: ["$set.d"]}
    assert calls == 1
    assert (
        backend.profile(TOKEN, "a")
        == reference([first, late1, after, late2], max_properties=3)["a"]
    )


# --- operation laws ---------------------------------------------------------------------------

profiles_st = st.one_of(st.none(), st.dictionaries(names, values, max_size=3))


def _direct(ops: dict[str, Any], time: float = T0) -> Update:
    return Update(0, TOKEN, "a", time, True, True, ops)


@given(profiles_st, st.dictionaries(names, values, max_size=3))
@settings(max_examples=150, deadline=None)
def test_set_once_idempotent(profile: Props | None, vals: Props) -> None:
    once = apply_update(profile, _direct({"$set_once": vals}))
    assert apply_update(once, _direct({"$set_once": vals})) == once


@given(profiles_st, st.dictionaries(names, st.lists(scalars, max_size=4), max_size=3))
@settings(max_examples=150, deadline=None)
def test_union_idempotent(profile: Props | None, vals: dict[str, list[Any]]) -> None:
    u = update({"$token": TOKEN, "$distinct_id": "a", "$union": vals, "$ignore_time": 1})
    once = apply_update(profile, u)
    assert apply_update(once, u) == once
    for name, items in vals.items():  # every element present exactly once if it was added
        assert once is not None
        for item in items:
            assert any(json_eq(item, v) for v in once[name])


def json_eq(a: Any, b: Any) -> bool:
    from peoplebase.values import json_equal

    return json_equal(a, b)


exact_numbers = st.one_of(st.integers(-1000, 1000), st.integers(-64, 64).map(lambda n: n / 4))


@given(
    st.dictionaries(names, exact_numbers, max_size=3),
    st.lists(st.dictionaries(names, exact_numbers, min_size=1, max_size=3), max_size=6),
    st.randoms(use_true_random=False),
)
@settings(max_examples=150, deadline=None)
def test_add_commutes(start: Props, deltas: list[dict[str, Any]], rnd: Any) -> None:
    def run(order: list[dict[str, Any]]) -> Props | None:
        p: Props | None = dict(start)
        for d in order:
            p = apply_update(p, _direct({"$add": d}))
        return p

    shuffled = list(deltas)
    rnd.shuffle(shuffled)
    result = run(deltas)
    assert result == run(shuffled)
    assert result is not None
    for name in NAMES:
        total = start.get(name, 0) + sum(d.get(name, 0) for d in deltas)
        if name in start or any(name in d for d in deltas):
            assert result[name] == total


# --- deletion is final for the past -----------------------------------------------------------


def rec(t: int, did: str = "a", **ops: Any) -> Raw:
    raw: Raw = {"$token": TOKEN, "$distinct_id": did, "$time": T0 + t}
    for name, value in ops.items():
        raw["$" + name] = value
    return raw


def test_delete_drops_later_arrivals_before_its_time() -> None:
    backend, results = run_memory(
        [
            [[rec(0, set={"p": 1}), rec(10, set={"r": 1}), rec(20, set={"q": 1})]],
            [[rec(10, delete=True)]],
            [[rec(9, set={"p": 2}), rec(5, add={"n": 1}), rec(-1000, set={"z": 1})]],
        ]
    )
    # the $time 20 update survives the delete at 10; later arrivals before 10 are dropped
    assert backend.profile(TOKEN, "a") == {"q": 1, "$last_seen": format_time(T0 + 20)}
    assert results[2].dropped == 3


def test_update_at_delete_time_arriving_after_it_is_dropped() -> None:
    """SPEC §4: an update arriving after a $delete at t with $time <= t is dropped, counted."""
    # delete_user() then set() in one browser batch: both get the receipt time
    delete = {"$token": TOKEN, "$distinct_id": "a", "$delete": ""}
    later = {"$token": TOKEN, "$distinct_id": "a", "$set": {"p": 2}}
    backend, results = run_memory([[[rec(0, set={"p": 1, "q": 1})]], [[delete, later]]])
    assert backend.profile(TOKEN, "a") is None
    assert results[1].dropped == 1
    # in a later request too, with an explicit $time; a second $delete at t (not a resend:
    # its value differs) is dropped as well
    backend, results = run_memory(
        [
            [[rec(0, set={"q": 1})], [rec(10, delete=1)]],
            [[rec(10, set={"p": 1}), rec(10, delete="")]],
            [[rec(10.001, set={"r": 1})]],
        ]
    )
    assert results[2].dropped == 2
    assert backend.profile(TOKEN, "a") == {"r": 1, "$last_seen": format_time(T0 + 10.001)}


def test_update_at_delete_time_arriving_before_it_is_deleted() -> None:
    backend, _ = run_memory([[[rec(10, set={"p": 1})]], [[rec(10, delete=1)]]])
    assert backend.profile(TOKEN, "a") is None


def test_delete_then_newer_update_builds_new_profile() -> None:
    backend, results = run_memory(
        [
            [[rec(0, set={"p": 1, "q": 1})]],
            [[rec(10, delete="")]],
            [[rec(11, set_once={"p": 2})]],
        ]
    )
    assert backend.profile(TOKEN, "a") == {"p": 2, "$last_seen": format_time(T0 + 11)}
    assert results[2].dropped == 0


def test_delete_is_final_whatever_the_window() -> None:
    merger = Merger(reorder_window=10.0)
    backend, results = run_memory(
        [[[rec(1000, set={"p": 1})]], [[rec(1000, delete=1)]], [[rec(1, set={"old": 1})]]],
        merger,
    )
    assert backend.profile(TOKEN, "a") is None
    assert results[2].dropped == 1 and results[2].beyond_window == 0


def test_delete_purges_log_and_dedup_keys() -> None:
    backend, _ = run_memory(
        [
            [[rec(0, set={"p": 1}), rec(5, set={"p": 2}), rec(30, set={"q": 1})]],
            [[rec(10, delete=1)]],
        ]
    )
    (key,) = backend.rows
    # what remains: the delete itself (so that a resend of it is recognised) and the newer update
    assert sorted(e[0] for e in backend.logs[key]) == [T0 + 10, T0 + 30]
    assert backend.rows[key].tomb == T0 + 10
    assert backend.rows[key].base is None
    assert backend.profile(TOKEN, "a") == {"q": 1, "$last_seen": format_time(T0 + 30)}


def test_delete_of_missing_profile_creates_nothing() -> None:
    backend, results = run_memory(
        [[[rec(5, delete=1), rec(0, set={"p": 1}), rec(5, unset=["p"]), rec(6, remove={"l": 1})]]]
    )
    assert backend.profile(TOKEN, "a") is None
    # the tombstone stays: the older $set and the $unset at the delete's own $time are dropped
    assert results[0].dropped == 2


# --- the reorder window -----------------------------------------------------------------------


def test_update_older_than_window_applied_on_top_at_newest_time() -> None:
    merger = Merger(reorder_window=100.0)
    backend, results = run_memory(
        [
            [[rec(1000, set={"p": "newest"}, add={"n": 1})]],
            [[rec(500, set={"p": "ancient"}, add={"n": 10})]],  # 500 < 1000 - 100
            [[rec(950, set={"p": "in window"})]],  # replayed before the ancient one
        ],
        merger,
    )
    assert results[1].beyond_window == 1 and results[1].late == 0
    assert results[2].late == 1 and results[2].beyond_window == 0
    # the ancient update is recorded at 1000, after the 1000 one: replays keep it last
    assert backend.profile(TOKEN, "a") == {
        "p": "ancient",
        "n": 11,
        "$last_seen": format_time(T0 + 1000),
    }
    (key,) = backend.rows
    assert sorted(e[0] for e in backend.logs[key]) == [T0 + 950, T0 + 1000, T0 + 1000]


def test_window_boundary_is_not_beyond() -> None:
    merger = Merger(reorder_window=100.0)
    backend, results = run_memory(
        [[[rec(1000, set={"p": 1})]], [[rec(900, set={"p": 0, "q": 1})]]], merger
    )
    assert results[1].beyond_window == 0 and results[1].late == 1
    assert backend.profile(TOKEN, "a") == {"p": 1, "q": 1, "$last_seen": format_time(T0 + 1000)}


WINDOW = 10


@st.composite
def in_window_arrivals(draw: st.DrawFn) -> Groups:
    """Records over a long span, each arriving at most WINDOW seconds late (never beyond it)."""
    n = draw(st.integers(5, 40))
    # about 3 s apart on average: many arrive late, and the span is many windows long
    times = sorted(draw(st.lists(st.integers(0, 3 * n), min_size=n, max_size=n)))
    recs = draw(records(st.just(0), min_size=n, max_size=n))
    delays = draw(st.lists(st.integers(0, WINDOW - 1), min_size=n, max_size=n))
    for raw, t in zip(recs, times, strict=True):
        raw["$time"] = T0 + t
    keyed = sorted(range(len(recs)), key=lambda i: (recs[i]["$time"] + delays[i], recs[i]["nonce"]))
    order = [recs[i] for i in keyed]
    groups: Groups = []
    for raw in order:
        if not groups or draw(st.integers(0, 2)) == 0:
            groups.append([[]])
        groups[-1][-1].append(raw)
    return groups


@given(in_window_arrivals())
@settings(max_examples=150, deadline=None)
def test_compaction_keeps_reference_and_bounds_log(groups: Groups) -> None:
    merger = Merger(reorder_window=float(WINDOW))
    backend = MemoryBackend()
    beyond = 0
    for group in groups:
        for result in merger.apply(backend, to_updates(group)):
            beyond += result.beyond_window
        for key, row in backend.rows.items():
            times = [e[0] for e in backend.logs.get(key, [])]
            # compaction with hysteresis: nothing older than 1.5 windows stays in the log
            assert all(t >= row.last_time - 1.5 * WINDOW for t in times)
            assert row.log_min == (min(times) if times else None)
    assert beyond == 0
    assert profiles(backend) == reference(flatten(groups))


# --- retries ----------------------------------------------------------------------------------


def test_retry_in_later_request_changes_nothing() -> None:
    r = rec(0, add={"n": 1}, append={"l": "x"})
    backend, results = run_memory([[[r]], [[dict(r)]]])
    assert backend.profile(TOKEN, "a") == {"n": 1, "l": ["x"], "$last_seen": format_time(T0)}
    assert results[1].dropped == 1


def test_retry_in_same_group_later_request_changes_nothing() -> None:
    r = rec(0, add={"n": 1})
    backend, results = run_memory([[[r], [dict(r)]]])
    assert backend.profile(TOKEN, "a") == {"n": 1, "$last_seen": format_time(T0)}
    assert results[1].dropped == 1


def test_retry_after_newer_updates_changes_nothing() -> None:
    r = rec(0, add={"n": 1})
    backend, results = run_memory([[[r]], [[rec(50, add={"n": 5})]], [[dict(r)]]])
    assert backend.profile(TOKEN, "a") == {"n": 6, "$last_seen": format_time(T0 + 50)}
    assert results[2].dropped == 1 and results[2].late == 0


def test_repeat_within_one_request_applies_both() -> None:
    r = rec(0, add={"n": 1})
    backend, results = run_memory([[[r, dict(r)]]])
    assert backend.profile(TOKEN, "a") == {"n": 2, "$last_seen": format_time(T0)}
    assert results[0].dropped == 0
    # and a later retry of that whole request changes nothing
    merger = Merger()
    merger.apply(backend, to_updates([[r, dict(r)]]))
    assert backend.profile(TOKEN, "a") == {"n": 2, "$last_seen": format_time(T0)}


def test_records_without_time_never_deduplicated() -> None:
    r = {"$token": TOKEN, "$distinct_id": "a", "$add": {"n": 1}}
    backend, results = run_memory([[[r]], [[dict(r)]], [[dict(r)], [dict(r)]]])
    props = backend.profile(TOKEN, "a")
    assert props is not None and props["n"] == 4
    assert all(res.dropped == 0 for res in results)


def test_near_identical_records_are_not_retries() -> None:
    backend, results = run_memory(
        [
            [[rec(0, add={"n": 1})]],
            [[rec(0, add={"n": 1}, ignore_time=True)]],
            [[rec(1, add={"n": 1})]],
        ]
    )
    props = backend.profile(TOKEN, "a")
    assert props is not None and props["n"] == 3
    assert sum(res.dropped for res in results) == 0


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_retried_requests_change_nothing(data: st.DataObject) -> None:
    recs = data.draw(records(tied_times))
    groups = data.draw(arrivals(recs))
    backend, _ = run_memory(groups)
    before = profiles(backend)
    # every request sent again, in any order: each record is either a recognised retry or
    # at or before a delete's time, so each is dropped and nothing changes
    requests = [request for group in groups for request in group]
    again = data.draw(st.permutations(requests))
    merger = Merger()
    for request in again:
        (result,) = merger.apply(backend, to_updates([request]))
        assert result.dropped == len(request)
    assert profiles(backend) == before


def test_delete_beyond_the_window_leaves_its_tombstone_at_the_newest_time() -> None:
    """Recorded at the newest $time N (docs/ordering.md): what arrives after it at N is dropped."""
    merger = Merger(reorder_window=10.0)
    backend, results = run_memory(
        [
            [[rec(1000, set={"p": 1})]],
            [[rec(1, delete=1)]],
            [[rec(1000, set={"q": 1})]],
            [[rec(1001, set={"r": 1})]],
        ],
        merger,
    )
    assert results[1].beyond_window == 1
    assert results[2].dropped == 1 and results[3].dropped == 0
    assert backend.profile(TOKEN, "a") == {"r": 1, "$last_seen": format_time(T0 + 1001)}


def test_retried_delete_changes_nothing() -> None:
    # after a $delete at t, an update at t is dropped (SPEC §4), and so is a resent $delete
    delete = rec(10, delete=1)
    backend, results = run_memory(
        [
            [[rec(0, set={"p": 1})]],
            [[delete]],
            [[rec(10, set={"q": 1})]],
            [[dict(delete)]],
            [[rec(11, set={"r": 1})]],
        ]
    )
    assert results[2].dropped == 1 and results[3].dropped == 1
    assert backend.profile(TOKEN, "a") == {"r": 1, "$last_seen": format_time(T0 + 11)}


def test_retried_update_at_delete_time_changes_nothing() -> None:
    # the update at t arrived before the delete at t, so the delete wiped it; its resend
    # after the delete is a retry, not a new profile
    update_at_t = rec(10, set={"p": 1})
    backend, results = run_memory([[[update_at_t]], [[rec(10, delete=1)]], [[dict(update_at_t)]]])
    assert backend.profile(TOKEN, "a") is None
    assert results[2].dropped == 1


def test_retry_of_first_of_two_deletes_at_same_time() -> None:
    first, second = rec(10, delete=1), rec(10, delete="")
    backend, results = run_memory(
        [[[first, second]], [[rec(10, set={"q": 1})]], [[dict(first)], [dict(second)]]]
    )
    assert backend.profile(TOKEN, "a") is None
    # the second $delete arrives after the first, at its $time: dropped, as is all that follows
    assert results[0].dropped == 1
    assert results[1].dropped == 1 and results[2].dropped == 1 and results[3].dropped == 1


# --- the log's length is bounded (max_log_entries) ----------------------------------------


def test_log_is_cut_at_max_entries_and_state_is_unchanged() -> None:
    merger = Merger(max_log_entries=4)
    backend = MemoryBackend()
    arrived: list[Raw] = []
    for t in range(10):
        raw = rec(t * 10, set={"p": t}, add={"n": 1})
        arrived.append(raw)
        merger.apply(backend, to_updates([[raw]]))
        (key,) = backend.rows
        assert len(backend.logs[key]) <= 4
        assert backend.rows[key].log_n == len(backend.logs[key])
    # in-order updates: cutting the log folds the oldest into the base, the state is the same
    assert profiles(backend) == reference(arrived)
    row = backend.rows[key]
    # the newest 3 entries (3/4 of 4) were kept at the last cut: the floor is the oldest of them
    assert row.log_floor == min(e[0] for e in backend.logs[key])
    assert row.log_floor is not None and T0 + 50 <= row.log_floor <= T0 + 70


def test_update_newer_than_the_cut_is_put_in_place() -> None:
    merger = Merger(max_log_entries=4)
    in_order = [rec(t * 10, set={"p": t}, append={"l": t}) for t in range(10)]
    backend, _ = run_memory([[[raw]] for raw in in_order], merger)
    floor = backend.rows[next(iter(backend.rows))].log_floor
    assert floor is not None
    late = rec(int(floor - T0) + 1, set={"q": "late"}, append={"l": "late"})
    results = merger.apply(backend, to_updates([[late]]))
    assert results[0].late == 1 and results[0].beyond_window == 0
    assert profiles(backend) == reference([*in_order, late])


def test_update_older_than_the_cut_is_applied_on_top() -> None:
    merger = Merger(max_log_entries=4)
    in_order = [rec(t * 10, set={"p": t}, append={"l": t}) for t in range(10)]
    backend, _ = run_memory([[[raw]] for raw in in_order], merger)
    older = rec(5, set={"p": "old"}, append={"l": "old"})
    results = merger.apply(backend, to_updates([[older]]))
    assert results[0].beyond_window == 1 and results[0].late == 0
    # applied on top of the current state and recorded at the newest $time, as beyond the window
    assert backend.profile(TOKEN, "a") == {
        "p": "old",
        "l": [*range(10), "old"],
        "$last_seen": format_time(T0 + 90),
    }
    (key,) = backend.rows
    assert max(e[0] for e in backend.logs[key]) == T0 + 90


def test_entries_sharing_the_cuts_time_stay_with_it() -> None:
    merger = Merger(max_log_entries=4)
    arrived = [rec(t, set={"p": t}, nonce=i) for i, t in enumerate([1, 2, 3, 3, 4])]
    backend, results = run_memory([[arrived]], merger)
    (key,) = backend.rows
    # 3/4 of 4 = 3 newest would cut between the two entries at t=3: both stay
    assert sorted(e[0] for e in backend.logs[key]) == [T0 + 3, T0 + 3, T0 + 4]
    assert backend.rows[key].log_floor == T0 + 3
    assert profiles(backend) == reference(arrived)
    # an update at the cut's $time is still put in its place (after the two, by arrival)
    same = rec(3, set={"p": "same", "q": 1}, nonce=9)
    (result,) = merger.apply(backend, to_updates([[same]]))
    assert result.late == 1 and result.beyond_window == 0
    assert profiles(backend) == reference([*arrived, same])


def test_log_of_one_instant_is_cut_whole() -> None:
    # when the entries sharing the cut's $time alone exceed the limit they are folded too, so
    # the log never stays over it; the cut lies just after their $time
    merger = Merger(max_log_entries=2)
    arrived = [rec(7, set={"p": i}, add={"n": 1}, nonce=i) for i in range(6)]
    backend, results = run_memory([[[raw]] for raw in arrived], merger)
    (key,) = backend.rows
    assert len(backend.logs[key]) <= 2
    assert profiles(backend) == reference(arrived)
    # the third update made the cut; the later ones at that $time lie under it: applied on
    # top, which is their place in ($time, arrival) order anyway
    assert [r.beyond_window for r in results] == [0, 0, 0, 1, 1, 1]
    floor = backend.rows[key].log_floor
    assert floor is not None and T0 + 7 <= floor < T0 + 7.000001
    # a later update at that same $time comes after all of them: applied on top, as it should
    last = rec(7, set={"p": "last"}, add={"n": 1}, nonce=99)
    (result,) = merger.apply(backend, to_updates([[last]]))
    assert result.beyond_window == 1 and result.late == 0
    assert profiles(backend) == reference([*arrived, last])


def test_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="max_log_entries"):
        Merger(max_log_entries=-1)


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_cut_logs_equal_reference_when_nothing_is_older_than_the_cut(data: st.DataObject) -> None:
    # updates arriving in $time order are never older than a cut: any limit gives the reference
    recs = data.draw(records(st.integers(0, 40), max_size=20))
    recs.sort(key=lambda raw: raw["$time"])
    # in order, in groups and requests of random sizes
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(recs) - 1)), max_size=6)))
    groups: Groups = [
        [[raw] for raw in recs[a:b]]
        for a, b in zip([0, *cuts], [*cuts, len(recs)], strict=True)
        if b > a
    ]
    limit = data.draw(st.integers(1, 6))
    backend, _ = run_memory(groups, Merger(max_log_entries=limit))
    # (a record at the very $time of a cut's folded entries counts as beyond, and is applied on
    # top: which is its place anyway)
    assert profiles(backend) == reference(recs)
    for key, log in backend.logs.items():
        assert len(log) <= limit
        assert backend.rows[key].log_n == len(log)


# --- replaying only the touched properties equals the whole fold --------------------------------

WIDE_NAMES = st.sampled_from(["p", "q", "l", "m", "n", "$city", "$last_seen"])
WIDE_OPS = op_strategies(WIDE_NAMES)


@st.composite
def wide_entries(draw: st.DrawFn) -> list[LogEntry]:
    out = []
    for seq in range(draw(st.integers(1, 14))):
        raw: Raw = {"$token": TOKEN, "$distinct_id": "a", "$time": T0 + draw(st.integers(0, 6))}
        if draw(st.integers(0, 3)) == 0:
            raw["$ignore_time"] = True
        chosen = draw(st.lists(st.sampled_from(list(WIDE_OPS)), min_size=1, max_size=3))
        raw.update({op: draw(WIDE_OPS[op]) for op in chosen})
        u = update(raw)
        if draw(st.booleans()):
            u.geo = {"$city": draw(st.sampled_from(["Paris", "Lima"])), "$country_code": "FR"}
        out.append(LogEntry(u.time, seq, u))
    return out


def refold_touched(
    current: Props,
    base: Props | None,
    entries: Sequence[LogEntry],
    changed: Sequence[int] | set[int],
    max_properties: int,
    watch: dict[int, list[Skip]] | None = None,
) -> Props | None:
    """replay.refold over `entries` in any order, the late ones given by their seqs."""
    index = LogIndex(sorted(entries, key=LOG_ORDER))
    wanted = set(changed)
    late = [e for e in index.entries if e.seq in wanted]
    return replay.refold(current, base, index, late, max_properties, watch)


@given(st.data())
@settings(max_examples=400, deadline=None)
def test_replaying_touched_properties_equals_the_whole_fold(data: st.DataObject) -> None:
    entries = data.draw(wide_entries())
    base = data.draw(st.one_of(st.none(), st.dictionaries(WIDE_NAMES, values, max_size=4)))
    changed = set(data.draw(st.sets(st.sampled_from([e.seq for e in entries]), min_size=1)))
    limit = data.draw(st.sampled_from([2000, 3, 5]))
    current = fold(base, [e for e in entries if e.seq not in changed], limit)
    watch_all: dict[int, list[Skip]] = {seq: [] for seq in changed}
    expected = fold(base, entries, limit, watch_all)
    watch: dict[int, list[Skip]] = {seq: [] for seq in changed}
    got = (
        refold_touched(current, base, entries, changed, limit, watch)
        if current is not None
        else None
    )
    if limit == 2000 and base is not None:
        # a profile that exists throughout, far from the limit, no $delete: always exact
        assert got is not None
    if got is None:
        return  # not exact there (no profile, or the limit in reach): the merger folds it all
    assert got == expected
    assert watch == watch_all


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_late_update_overwritten_later_keeps_the_rest(data: st.DataObject) -> None:
    # the usual late update: what it sets is set again later, so only `$last_seen` may move
    entries = data.draw(wide_entries())
    late = entries[0]
    names = sorted((touched(late.update) or set()) - {"$last_seen"})
    later_time = max(e.time for e in entries) + data.draw(st.integers(0, 2))
    over = update(
        {
            "$token": TOKEN,
            "$distinct_id": "a",
            "$time": later_time,
            "$set": {n: "again" for n in names},
            **({"$ignore_time": True} if data.draw(st.booleans()) else {}),
        }
    )
    entries.append(LogEntry(over.time, 100, over))
    late.time = late.update.time = T0 - 1  # before every other entry
    base = data.draw(st.dictionaries(WIDE_NAMES, values, min_size=1, max_size=3))
    current = fold(base, entries[1:], 2000)
    watch_all: dict[int, list[Skip]] = {late.seq: []}
    expected = fold(base, entries, 2000, watch_all)
    watch: dict[int, list[Skip]] = {late.seq: []}
    assert current is not None
    got = refold_touched(current, base, entries, [late.seq], 2000, watch)
    assert got is not None  # the profile exists throughout, far from the limit: exact
    assert got == expected
    assert watch == watch_all


@given(st.data())
@settings(max_examples=250, deadline=None)
def test_merger_replaying_touched_properties_agrees_with_whole_folds(data: st.DataObject) -> None:
    # the merger uses the touched-properties replay from TOUCHED_REPLAY_MIN log entries on:
    # at 0 it uses it for every late update, and profiles, counts and skips are the same
    recs = data.draw(records(tied_times))
    groups = data.draw(arrivals(recs))
    limit = data.draw(st.sampled_from([2000, 3]))
    outcomes = []
    for threshold in (0, 10**9):
        original = merge_module.TOUCHED_REPLAY_MIN
        merge_module.TOUCHED_REPLAY_MIN = threshold
        try:
            backend, results = run_memory(groups, Merger(max_properties=limit))
        finally:
            merge_module.TOUCHED_REPLAY_MIN = original
        counts = [(r.skips, r.dropped, r.late, r.beyond_window) for r in results]
        outcomes.append((profiles(backend), counts))
    assert outcomes[0] == outcomes[1]
    if limit == 2000:
        assert outcomes[0][0] == reference(flatten(groups))


def test_long_log_late_update_uses_the_touched_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []

    original = replay.refold

    def counted(*args: Any, **kwargs: Any) -> Props | None:
        out = original(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(replay, "refold", counted)
    in_order = [
        rec(t, set={"plan": t % 3, "city": "x"}, add={"n": 1}, union={"tags": [t % 4]}, nonce=t)
        for t in range(merge_module.TOUCHED_REPLAY_MIN + 6)
    ]
    late = [rec(3, set={"plan": "late"}, nonce=-1), rec(5, add={"n": 10}, nonce=-2)]
    backend, results = run_memory([[in_order], [late]])
    assert calls == [True]  # one replay for the profile's two late updates, the touched one
    assert results[1].late == 2
    assert profiles(backend) == reference([*in_order, *late])


def test_retries_of_a_cut_log() -> None:
    # a resend of a record still in the log is recognised; one older than the cut is not (it
    # is applied again, on top, counted beyond the window): docs/ordering.md
    merger = Merger(max_log_entries=4)
    arrived = [rec(t * 10, add={"n": 1}) for t in range(10)]
    backend, _ = run_memory([[[raw]] for raw in arrived], merger)
    (key,) = backend.rows
    floor = backend.rows[key].log_floor
    assert floor is not None and T0 + 20 < floor <= T0 + 90
    (kept,) = merger.apply(backend, to_updates([[dict(arrived[-1])]]))
    assert kept.dropped == 1
    assert backend.profile(TOKEN, "a")["n"] == 10  # type: ignore[index]
    (cut,) = merger.apply(backend, to_updates([[dict(arrived[0])]]))
    assert cut.dropped == 0 and cut.beyond_window == 1
    assert backend.profile(TOKEN, "a")["n"] == 11  # type: ignore[index]


def test_window_and_limit_cut_the_same_log() -> None:
    # both foldings on one profile: the window's (entries older than last - window, once the
    # oldest is 1.5 windows old) and the limit's; the state is the in-order fold throughout
    merger = Merger(reorder_window=50.0, max_log_entries=4)
    backend = MemoryBackend()
    arrived = []
    for t in range(0, 200, 10):
        raw = rec(t, add={"n": 1}, set={"p": t})
        arrived.append(raw)
        merger.apply(backend, to_updates([[raw]]))
        (key,) = backend.rows
        row = backend.rows[key]
        assert row.log_n == len(backend.logs[key]) <= 4
        assert min(e[0] for e in backend.logs[key]) >= row.last_time - 75.0
    assert profiles(backend) == reference(arrived)
    # a $delete older than the cut is applied on top like any such update: the profile goes
    (result,) = merger.apply(backend, to_updates([[rec(5, delete=1)]]))
    assert result.beyond_window == 1
    assert backend.profile(TOKEN, "a") is None
    # its tombstone lies at the newest $time (190): older updates are dropped, newer ones build
    (result,) = merger.apply(backend, to_updates([[rec(185, set={"q": 1})]]))
    assert result.dropped == 1 and backend.profile(TOKEN, "a") is None
    merger.apply(backend, to_updates([[rec(195, set={"q": 2})]]))
    assert backend.profile(TOKEN, "a") == {"q": 2, "$last_seen": format_time(T0 + 195)}
