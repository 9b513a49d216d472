"""Late updates replay only the properties they touch (replay.py, logindex.py), and the result
is exactly the whole fold's: the same properties, the same values of the same types (floats to
the bit) and the same skipped keys, on long logs with every operation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peoplebase import merge as merge_module
from peoplebase.logindex import LOG_ORDER, LogIndex
from peoplebase.merge import Key, LogEntry, MemoryBackend, Merger, ProfileRow, fold
from peoplebase.ops import apply_update
from peoplebase.records import Validator
from peoplebase.replay import refold
from peoplebase.types import Props, Skip, Update
from tests.test_merge import NOW, T0, TOKEN, Raw, reference, to_updates

# a few properties, so that entries meet on them; geolocation's and `$last_seen` among them
NAMES = ("p", "q", "n", "$city", "$region", "$last_seen")
SCALARS = (None, True, False, 0, 1, -3, 0.1, 0.2, 0.7, 1e16, -0.0, 2.5, "x", "2", "Paris")
# float amounts whose sums depend on the order they are added in
AMOUNTS = (1, -3, 0.1, 0.2, 0.7, 1e16, -1e16, 3.5, "2")
OPS = ("$set", "$set_once", "$add", "$union", "$append", "$remove", "$unset")


def random_value(rng: random.Random) -> Any:
    if rng.random() < 0.3:
        return [rng.choice(SCALARS) for _ in range(rng.randint(0, 3))]
    return rng.choice(SCALARS)


def random_record(rng: random.Random, t: int, deletes: bool) -> Raw:
    """A record of one to three operations on a few of NAMES, sometimes `$ignore_time`, and
    (with `deletes`) rarely a `$delete`. Long logs are made from a drawn seed: drawing each
    value through hypothesis took most of these tests' time."""
    raw: Raw = {"$token": TOKEN, "$distinct_id": "a", "$time": T0 + t}
    if rng.random() < 0.25:
        raw["$ignore_time"] = True
    if deletes and rng.random() < 0.015:
        raw["$delete"] = ""
        return raw
    for op in rng.sample(OPS, rng.randint(1, 3)):
        names = rng.sample(NAMES, rng.randint(1, 3))
        if op == "$unset":
            raw[op] = names
        elif op == "$add":
            raw[op] = {name: rng.choice(AMOUNTS) for name in names}
        elif op == "$union":
            raw[op] = {
                name: [rng.choice(SCALARS) for _ in range(rng.randint(0, 3))] for name in names
            }
        elif op == "$remove":
            raw[op] = {names[0]: rng.choice(SCALARS)}
        else:
            raw[op] = {name: random_value(rng) for name in names}
    return raw


def random_geo(rng: random.Random) -> Props | None:
    return {"$city": rng.choice(["Paris", "Lima"]), "$region": "R"} if rng.random() < 0.4 else None


VALIDATOR = Validator(time_skew=0.0)


def validated(raw: Raw, geo: Props | None = None, index: int = 0) -> Update:
    u = VALIDATOR.validate({"$token": TOKEN, "$distinct_id": "a", **raw}, index, NOW)
    assert isinstance(u, Update), u
    u.geo = geo
    return u


@st.composite
def long_log(draw: st.DrawFn, deletes: bool = False) -> list[LogEntry]:
    n = draw(st.integers(20, 120))
    rng = random.Random(draw(st.integers(0, 2**32)))
    out = []
    for seq in range(n):
        u = validated(random_record(rng, rng.randint(0, n // 3), deletes), random_geo(rng))
        out.append(LogEntry(u.time, seq, u))
    return out


def random_base(rng: random.Random) -> Props | None:
    if rng.random() < 0.3:
        return None
    return {name: random_value(rng) for name in rng.sample(NAMES, rng.randint(0, 4))}


@st.composite
def late_seqs(draw: st.DrawFn, entries: list[LogEntry]) -> set[int]:
    """Several late entries anywhere, and sometimes the newest few too (the updates that
    arrived after a late one in the same group wait for the same replay)."""
    seqs = draw(st.sets(st.sampled_from([e.seq for e in entries]), min_size=1, max_size=6))
    newest = sorted(entries, key=LOG_ORDER)[-draw(st.integers(0, 4)) :]
    return seqs | {e.seq for e in newest}


def exact(props: Props | None) -> bytes:
    """Properties, values and their types, floats to the bit (orjson writes -0.0 and 1.0)."""
    return orjson.dumps(props, option=orjson.OPT_SORT_KEYS)


def indexed(entries: list[LogEntry], late: Sequence[LogEntry]) -> LogIndex:
    """The index the merger holds after the late entries were added to an earlier one."""
    wanted = {id(e) for e in late}
    index = LogIndex(sorted((e for e in entries if id(e) not in wanted), key=LOG_ORDER))
    for entry in late:
        index.add(entry)
    return index


def same_index(a: LogIndex, b: LogIndex) -> bool:
    def ids(entries: list[LogEntry]) -> list[int]:
        return [id(e) for e in entries]

    return (
        ids(a.entries) == ids(b.entries)
        and {k: ids(v) for k, v in a.by_name.items()} == {k: ids(v) for k, v in b.by_name.items()}
        and a.deletes == b.deletes
        and a.first_creator is b.first_creator
        and a.last_stamp is b.last_stamp
    )


# --- the index ---------------------------------------------------------------------------------


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_an_index_kept_up_to_date_equals_one_built_at_once(data: st.DataObject) -> None:
    entries = data.draw(long_log(deletes=True))
    added = data.draw(st.permutations(entries))[: data.draw(st.integers(0, len(entries)))]
    index = indexed(entries, added)
    whole = LogIndex(sorted(entries, key=LOG_ORDER))
    assert same_index(index, whole)
    assert index.entries == sorted(entries, key=LOG_ORDER)
    for listed in whole.by_name.values():
        assert listed == sorted(listed, key=LOG_ORDER)
        assert all(index.entries[index.position(e)] is e for e in listed)


def test_an_index_holds_only_its_own_entries() -> None:
    entries = [LogEntry(float(t), t, validated({"$set": {"p": t}})) for t in range(4)]
    index = LogIndex(list(entries))
    assert index.holds(entries)
    assert index.holds(entries[:3], entries[3:])
    assert not index.holds(entries[:3])  # one missing
    assert not index.holds(entries[1:], entries[:1])  # not in order
    copy = [LogEntry(e.time, e.seq, e.update) for e in entries]
    assert not index.holds(copy)  # equal entries, but not the ones it indexes


# --- the replay equals the whole fold -----------------------------------------------------------


@given(st.data())
@settings(max_examples=1000, deadline=None)
def test_replaying_late_updates_on_long_logs_equals_the_whole_fold(data: st.DataObject) -> None:
    deletes = data.draw(st.booleans())
    entries = data.draw(long_log(deletes=deletes))
    base = random_base(random.Random(data.draw(st.integers(0, 2**32))))
    changed = data.draw(late_seqs(entries))
    limit = data.draw(st.sampled_from([2000, 2000, 4, 7]))
    late = [e for e in data.draw(st.permutations(entries)) if e.seq in changed]
    current = fold(base, [e for e in entries if e.seq not in changed], limit)
    if current is None:
        return  # the merger folds the whole log then
    watch_all: dict[int, list[Skip]] = {seq: [] for seq in changed}
    expected = fold(base, entries, limit, watch_all)
    watch: dict[int, list[Skip]] = {seq: [] for seq in changed}
    got = refold(current, base, indexed(entries, late), late, limit, watch)
    if base is not None and limit == 2000 and not any("$delete" in e.ops for e in entries):
        assert got is not None  # a profile that exists throughout, far from the limit
    if got is None:
        assert all(not skips for skips in watch.values())  # nothing collected
        return
    assert exact(got) == exact(expected)
    assert watch == watch_all  # the same skipped keys, in the same order


@given(st.integers(20, 80), st.integers(0, 2**32), st.data())
@settings(max_examples=200, deadline=None)
def test_float_sums_come_out_bit_identical(n: int, seed: int, data: st.DataObject) -> None:
    # $add of floats whose sum depends on the order: a late $add is added in its place
    rng = random.Random(seed)
    amounts = (0.1, 0.2, 0.3, 0.7, 1e16, -1e16, 1.0, 3)
    entries = []
    for seq in range(n):
        raw: Raw = {"$time": T0 + rng.randint(0, 30)}
        op = rng.choice(["$add", "$add", "$add", "$set", "$set_once", "$unset"])
        if op == "$unset":
            raw[op] = ["s"]
        elif op == "$add":
            raw[op] = {"s": rng.choice(amounts), "t": rng.choice(amounts)}
        else:
            raw[op] = {"s": rng.choice(amounts)}
        u = validated(raw)
        entries.append(LogEntry(u.time, seq, u))
    changed = data.draw(late_seqs(entries))
    late = [e for e in entries if e.seq in changed]
    base = {"s": 0.1, "t": 0.2}
    current = fold(base, [e for e in entries if e.seq not in changed], 2000)
    assert current is not None
    expected = fold(base, entries, 2000)
    got = refold(current, base, indexed(entries, late), late, 2000)
    assert exact(got) == exact(expected)


Step = tuple[int, dict[str, Any], bool, Props | None]  # $time, operations, $ignore_time, geo


def log_of(steps: list[Step]) -> list[LogEntry]:
    out = []
    for seq, (t, ops, ignore_time, geo) in enumerate(steps):
        u = validated(
            {"$time": T0 + t, **ops, **({"$ignore_time": True} if ignore_time else {})}, geo
        )
        out.append(LogEntry(u.time, seq, u))
    return out


LATE_LAST_SEEN = "2020-01-01T00:00:00"
CORNERS: dict[str, tuple[Props | None, list[Step], list[int]]] = {
    # the late entry would create the profile earlier: an entry in between then stamps it
    "creates-earlier": (
        None,
        [(0, {"$set": {"x": 1}}, True, None), (1, {"$unset": ["z"]}, False, None)]
        + [(2, {"$set": {"y": 2}}, True, None)],
        [0],
    ),
    # `$last_seen` unset, then set again by a late `$set_once`: its unset is not the end of it
    "last-seen-set-once-after-unset": (
        {"$last_seen": "old"},
        [(1, {"$unset": ["$last_seen"]}, True, None)]
        + [(2, {"$set_once": {"$last_seen": LATE_LAST_SEEN}}, True, None)]
        + [(3, {"$set": {"p": 1}}, True, None)],
        [1],
    ),
    # an explicit `$last_seen` (an import) after the late update's stamp
    "explicit-last-seen": (
        {"p": 0},
        [(0, {"$set": {"q": 1}}, False, None), (1, {"$set": {"p": 1}}, False, None)]
        + [(2, {"$set": {"$last_seen": LATE_LAST_SEEN, "p": 2}}, True, None)],
        [0],
    ),
    # `$last_seen` made a list, then changed by late operations that may skip
    "last-seen-list": (
        {"p": 0},
        [(0, {"$append": {"$last_seen": "a"}}, True, None), (1, {"$set": {"p": 1}}, False, None)]
        + [(2, {"$remove": {"$last_seen": "a"}}, True, None)]
        + [(3, {"$add": {"$last_seen": 1}, "$union": {"$last_seen": ["b"]}}, True, None)],
        [0, 3],
    ),
    # geolocation is skipped when `$set` names a geo property: that entry does not overwrite
    # `$region`, it only sets it once
    "geo-skipped": (
        {"p": 0},
        [(0, {"$set": {"$region": "late"}}, False, None)]
        + [(1, {"$set": {"$city": "X"}, "$set_once": {"$region": "S"}}, False, {"$region": "G"})],
        [0],
    ),
    # geolocation overwrites: the late `$set` of `$city` comes under it
    "geo-overwrites": (
        {"p": 0},
        [(0, {"$set": {"$city": "late"}, "$add": {"n": 0.1}}, False, None)]
        + [(1, {"$add": {"n": 0.2}}, False, {"$city": "Lima", "$region": "R"})],
        [0],
    ),
}


@pytest.mark.parametrize("case", list(CORNERS))
def test_corner_cases_equal_the_whole_fold(case: str) -> None:
    base, steps, late_at = CORNERS[case]
    entries = log_of(steps)
    late = [entries[i] for i in late_at]
    changed = {e.seq for e in late}
    current = fold(base, [e for e in entries if e.seq not in changed], 2000)
    assert current is not None
    watch_all: dict[int, list[Skip]] = {seq: [] for seq in changed}
    expected = fold(base, entries, 2000, watch_all)
    watch: dict[int, list[Skip]] = {seq: [] for seq in changed}
    got = refold(current, base, indexed(entries, late), late, 2000, watch)
    if base is not None:
        assert got is not None
    if got is not None:
        assert exact(got) == exact(expected)
        assert watch == watch_all


# --- the merger keeps the index between groups ---------------------------------------------------


class KeepingBackend(MemoryBackend):
    """A backend that keeps profile rows and log entries as objects between groups, as the
    SQLite log cache does, and hands logs back in the order they were written (not sorted)."""

    def __init__(self, in_order: bool = False) -> None:
        super().__init__()
        self.in_order = in_order  # hand logs back sorted, as the SQLite store does
        self.kept_rows: dict[Key, ProfileRow] = {}
        self.kept_logs: dict[Key, list[LogEntry]] = {}

    def load_profiles(self, keys: Sequence[Key]) -> dict[Key, ProfileRow]:
        return {key: self.kept_rows[key] for key in keys if key in self.kept_rows}

    def load_log(self, key: Key) -> list[LogEntry]:
        log = list(self.kept_logs.get(key, []))
        if self.in_order:
            log.sort(key=LOG_ORDER)
        return log

    def has_retry_key(self, key: Key, dedup: int) -> bool:
        return any(e.dedup == dedup for e in self.kept_logs.get(key, []))

    def delete_log(self, key: Key, before: float) -> None:
        self.kept_logs[key] = [e for e in self.kept_logs.get(key, []) if e.time >= before]

    def insert_log(self, key: Key, entries: Sequence[LogEntry]) -> None:
        for e in entries:
            e.request = -1
        self.kept_logs.setdefault(key, []).extend(entries)

    def save_profiles(self, rows: Sequence[tuple[Key, ProfileRow]]) -> None:
        super().save_profiles(rows)
        for key, row in rows:
            row.dirty = False
            self.kept_rows[key] = row


GEO_VALIDATOR = Validator(
    time_skew=0.0,
    geo=lambda raw, ip: {"$city": raw["city"], "$region": "R"} if "city" in raw else None,
)


@st.composite
def busy_profile(draw: st.DrawFn) -> list[list[list[Raw]]]:
    """One profile: a long run of updates in order, then groups mixing late ones, new ones and
    resends, some with geolocation (the record's "city")."""
    rng = random.Random(draw(st.integers(0, 2**32)))

    def record(t: int, nonce: int) -> Raw:
        raw = random_record(rng, t, deletes=True)
        raw["nonce"] = nonce
        if rng.random() < 0.2:
            raw["city"] = rng.choice(["Paris", "Lima"])
        return raw

    n = draw(st.integers(40, 100))
    first = [record(t, t) for t in range(n)]
    groups = [[first[i : i + 20]] for i in range(0, n, 20)]
    nonce = n
    newest = n
    for _ in range(draw(st.integers(2, 6))):
        requests = []
        for _ in range(draw(st.integers(1, 3))):
            request = []
            for _ in range(draw(st.integers(1, 4))):
                kind = draw(st.sampled_from(["late", "late", "new", "again"]))
                if kind == "again":
                    request.append(dict(draw(st.sampled_from(first))))
                    continue
                nonce += 1
                if kind == "new":
                    newest += 1
                    request.append(record(newest, nonce))
                else:
                    request.append(record(draw(st.integers(0, newest)), nonce))
            requests.append(request)
        groups.append(requests)
    return groups


def geo_updates(group: list[list[Raw]]) -> list[list[Update]]:
    out = []
    for request in group:
        updates = []
        for i, raw in enumerate(request):
            u = GEO_VALIDATOR.validate(raw, i, NOW)
            assert isinstance(u, Update), u
            updates.append(u)
        out.append(updates)
    return out


def geo_reference(groups: list[list[list[Raw]]], max_properties: int) -> Props | None:
    """The fold of every accepted update in ($time, arrival) order (test_merge.reference, with
    geolocation, and resends of an earlier request's record dropped)."""
    accepted: list[tuple[float, int, Update]] = []
    seen: dict[bytes, tuple[int, int]] = {}
    tomb = -math.inf
    arrival = 0
    for r, group in enumerate(groups):
        for q, request in enumerate(geo_updates(group)):
            for u in request:
                arrival += 1
                key = orjson.dumps(group[q][u.index], option=orjson.OPT_SORT_KEYS)
                if u.time <= tomb or seen.get(key, (r, q)) != (r, q):
                    continue
                seen[key] = (r, q)
                accepted.append((u.time, arrival, u))
                if u.is_delete:
                    tomb = max(tomb, u.time)
    profile: Props | None = None
    for _, _, u in sorted(accepted, key=lambda item: (item[0], item[1])):
        profile = apply_update(profile, u, max_properties)
    return profile


def run_keeping(
    groups: list[list[list[Raw]]], merger: Merger, in_order: bool
) -> tuple[KeepingBackend, list[Any]]:
    backend = KeepingBackend(in_order)
    outcomes = []
    for group in groups:
        for r in merger.apply(backend, geo_updates(group)):
            outcomes.append((r.skips, r.dropped, r.late, r.beyond_window))
    return backend, outcomes


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_a_kept_index_gives_what_whole_folds_give(data: st.DataObject) -> None:
    groups = data.draw(busy_profile())
    in_order = data.draw(st.booleans())
    settings_ = data.draw(
        st.sampled_from(
            [{}, {"max_properties": 4}, {"max_log_entries": 30}, {"reorder_window": 40.0}]
        )
    )
    results = []
    for threshold in (1, 10**9):
        original = merge_module.TOUCHED_REPLAY_MIN
        merge_module.TOUCHED_REPLAY_MIN = threshold
        try:
            backend, outcomes = run_keeping(groups, Merger(**settings_), in_order)
        finally:
            merge_module.TOUCHED_REPLAY_MIN = original
        results.append((exact(backend.profile(TOKEN, "a")), outcomes))
    assert results[0] == results[1]
    if not settings_:
        assert results[0][0] == exact(geo_reference(groups, 2000))


def test_the_index_lives_with_the_row_and_follows_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(merge_module, "TOUCHED_REPLAY_MIN", 8)
    built: list[LogIndex] = []
    real_init = LogIndex.__init__

    def counting(self: LogIndex, entries: list[LogEntry]) -> None:
        built.append(self)
        real_init(self, entries)

    monkeypatch.setattr(LogIndex, "__init__", counting)

    def raw(t: int, nonce: int, **ops: Any) -> Raw:
        return {"$token": TOKEN, "$distinct_id": "a", "$time": T0 + t, "nonce": nonce, **ops}

    merger = Merger()
    backend = KeepingBackend()
    arrived = [raw(t, t, **{"$set": {"p": t}, "$add": {"n": 0.1}}) for t in range(10, 30)]
    merger.apply(backend, to_updates([arrived]))
    assert not built  # no late update yet: no index
    groups = [
        [raw(5, 100, **{"$add": {"n": 0.2}}), raw(40, 101, **{"$set": {"q": 1}})],
        [raw(41, 102, **{"$union": {"l": [1]}})],  # in order: the index takes it too
        [raw(6, 103, **{"$set": {"p": "late"}}), raw(7, 104, **{"$add": {"n": 0.7}})],
    ]
    for request in groups:
        arrived.extend(request)
        merger.apply(backend, to_updates([request]))
    (row,) = backend.kept_rows.values()
    assert len(built) == 1 and row.log_index is built[0]  # built once, kept up to date
    assert row.log_index.holds(
        sorted(backend.kept_logs[next(iter(backend.kept_logs))], key=LOG_ORDER)
    )
    assert exact(backend.profile(TOKEN, "a")) == exact(reference(arrived)["a"])
    # a $delete purges the log: the index is dropped, and built again by the next late update
    for request in ([raw(25, 105, **{"$delete": ""})], [raw(26, 106, **{"$add": {"n": 1}})]):
        arrived.extend(request)
        merger.apply(backend, to_updates([request]))
    for request in ([raw(t, 200 + t, **{"$add": {"n": 1}}) for t in range(50, 60)],):
        arrived.extend(request)
        merger.apply(backend, to_updates([request]))
    late = [raw(45, 300, **{"$add": {"n": 0.2}})]
    arrived.extend(late)
    merger.apply(backend, to_updates([late]))
    assert len(built) == 2 and row.log_index is built[1]
    assert exact(backend.profile(TOKEN, "a")) == exact(reference(arrived)["a"])
    # a row whose index does not hold the log read (a log changed behind it) builds a new one
    key = next(iter(backend.kept_logs))
    backend.kept_logs[key] = [
        LogEntry(e.time, e.seq, e.update, e.dedup) for e in backend.kept_logs[key]
    ]
    late = [raw(46, 301, **{"$add": {"n": 0.1}})]
    arrived.extend(late)
    merger.apply(backend, to_updates([late]))
    assert len(built) == 3 and row.log_index is built[2]
    assert exact(backend.profile(TOKEN, "a")) == exact(reference(arrived)["a"])
