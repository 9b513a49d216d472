"""The eight operations as pure functions (SPEC §3), $last_seen and geolocation (SPEC §5)."""

from __future__ import annotations

from typing import Any

import pytest

from peoplebase.ops import apply_update, format_time
from peoplebase.records import Validator
from peoplebase.types import Props, Skip, Update

T = 1_700_000_000.0  # 2023-11-14T22:13:20 UTC
T_TEXT = "2023-11-14T22:13:20"


def upd(
    ops: dict[str, Any],
    time: float = T,
    ignore_time: bool = True,
    geo: Props | None = None,
) -> Update:
    """An update built directly; $ignore_time by default so results show only the operation."""
    return Update(
        index=0,
        token="tok",
        distinct_id="u",
        time=time,
        explicit_time=True,
        ignore_time=ignore_time,
        ops=ops,
        geo=geo,
    )


def apply(profile: Props | None, ops: dict[str, Any], **kw: Any) -> Props | None:
    return apply_update(profile, upd(ops, **kw))


def apply_skips(profile: Props | None, ops: dict[str, Any]) -> tuple[Props | None, list[Skip]]:
    skips: list[Skip] = []
    return apply_update(profile, upd(ops), skips=skips), skips


# --- $set -------------------------------------------------------------------------------------


def test_set_creates_and_overwrites() -> None:
    assert apply(None, {"$set": {"a": 1}}) == {"a": 1}
    assert apply({"a": 1, "b": 2}, {"$set": {"a": "x"}}) == {"a": "x", "b": 2}


def test_set_replaces_nested_objects() -> None:
    before = {"o": {"x": 1, "y": 2}}
    assert apply(before, {"$set": {"o": {"z": 3}}}) == {"o": {"z": 3}}


def test_set_stores_null() -> None:
    out = apply({"a": 1}, {"$set": {"a": None}})
    assert out == {"a": None}
    assert "a" in out


def test_apply_does_not_mutate_its_input() -> None:
    before = {"a": 1, "l": [1]}
    apply(before, {"$set": {"a": 2}})
    apply(before, {"$union": {"l": [2]}})
    assert before == {"a": 1, "l": [1]}


# --- $set_once --------------------------------------------------------------------------------


def test_set_once_sets_missing_only() -> None:
    assert apply(None, {"$set_once": {"a": 1}}) == {"a": 1}
    assert apply({"a": 1}, {"$set_once": {"a": 2, "b": 3}}) == {"a": 1, "b": 3}


def test_set_once_null_counts_as_present() -> None:
    assert apply({"a": None}, {"$set_once": {"a": 5}}) == {"a": None}


# --- $add -------------------------------------------------------------------------------------


def test_add_missing_counts_as_zero() -> None:
    assert apply(None, {"$add": {"n": 5}}) == {"n": 5}


def test_add_ints_stay_ints() -> None:
    out = apply({"n": 2}, {"$add": {"n": 3}})
    assert out == {"n": 5}
    assert out is not None and isinstance(out["n"], int)


def test_add_floats_and_negative() -> None:
    assert apply({"n": 2}, {"$add": {"n": -0.5}}) == {"n": 1.5}
    assert apply({"n": 2}, {"$add": {"n": -7}}) == {"n": -5}


@pytest.mark.parametrize("existing", ["5", True, False, None, [1], {"a": 1}, "abc"])
def test_add_to_non_number_is_skipped(existing: Any) -> None:
    out, skips = apply_skips({"n": existing, "m": 1}, {"$add": {"n": 1, "m": 1}})
    assert out == {"n": existing, "m": 2}
    assert [s.field for s in skips] == ["$add.n"]


def test_add_numeric_strings_through_validator() -> None:
    raw = {"$token": "t", "$distinct_id": "d", "$ignore_time": 1}
    u = Validator().validate({**raw, "$add": {"a": "5", "b": "-2.5", "c": "x"}}, 0, T)
    assert isinstance(u, Update)
    out = apply_update({"a": 1, "b": 1}, u)
    assert out == {"a": 6, "b": -1.5}
    assert out is not None and isinstance(out["a"], int)
    assert [s.field for s in u.skips] == ["$add.c"]


def test_add_int_overflow_becomes_float() -> None:
    out = apply({"n": 2**63 - 1}, {"$add": {"n": 1}})
    assert out is not None
    assert isinstance(out["n"], float) and out["n"] == float(2**63)


def test_add_float_overflow_is_skipped() -> None:
    out, skips = apply_skips({"n": 1.7e308}, {"$add": {"n": 1.7e308}})
    assert out == {"n": 1.7e308}
    assert [s.field for s in skips] == ["$add.n"]


# --- $union -----------------------------------------------------------------------------------


def test_union_missing_property_gets_deduplicated_list() -> None:
    assert apply(None, {"$union": {"l": [1, 1.0, "1", True, 1]}}) == {"l": [1, "1", True]}


def test_union_adds_only_new_elements_in_order() -> None:
    out = apply({"l": ["a", 2]}, {"$union": {"l": [3, "a", 2.0, {"k": 1}, {"k": 1}]}})
    assert out == {"l": ["a", 2, 3, {"k": 1}]}


def test_union_existing_scalar_is_a_one_element_list() -> None:
    assert apply({"l": "a"}, {"$union": {"l": ["a", "b"]}}) == {"l": ["a", "b"]}
    assert apply({"l": 7}, {"$union": {"l": ["7"]}}) == {"l": [7, "7"]}


def test_union_existing_null_is_a_one_element_list() -> None:
    assert apply({"l": None}, {"$union": {"l": ["b"]}}) == {"l": [None, "b"]}


def test_union_keeps_existing_duplicates() -> None:
    # only new elements are deduplicated against the list; the list itself is not rewritten
    assert apply({"l": [1, 1]}, {"$union": {"l": [1, 2]}}) == {"l": [1, 1, 2]}


# --- $append ----------------------------------------------------------------------------------


def test_append_missing_and_existing_list() -> None:
    assert apply(None, {"$append": {"l": 1}}) == {"l": [1]}
    assert apply({"l": [1]}, {"$append": {"l": 1}}) == {"l": [1, 1]}


def test_append_list_and_object_as_one_element() -> None:
    assert apply({"l": [0]}, {"$append": {"l": [1, 2]}}) == {"l": [0, [1, 2]]}
    assert apply({"l": []}, {"$append": {"l": {"k": "v"}}}) == {"l": [{"k": "v"}]}


@pytest.mark.parametrize("existing", ["s", 3, True, None, {"k": 1}])
def test_append_existing_scalar(existing: Any) -> None:
    assert apply({"l": existing}, {"$append": {"l": "x"}}) == {"l": [existing, "x"]}


def test_append_beyond_size_limit_is_skipped() -> None:
    big = ["x" * 255] * 1020  # just under 256 KB
    out, skips = apply_skips({"l": big}, {"$append": {"l": "y" * 255}})
    assert out is not None and out["l"] == big
    assert [s.field for s in skips] == ["$append.l"]


# --- $remove ----------------------------------------------------------------------------------


def test_remove_all_equal_elements() -> None:
    before = {"l": [1, "1", 1.0, True, 2, 1]}
    assert apply(before, {"$remove": {"l": 1}}) == {"l": ["1", True, 2]}
    assert apply({"l": [{"a": 1}, {"a": 2}]}, {"$remove": {"l": {"a": 1.0}}}) == {"l": [{"a": 2}]}
    assert apply({"l": [[1, 2], 1]}, {"$remove": {"l": [1, 2]}}) == {"l": [1]}


@pytest.mark.parametrize("existing", ["abc", 1, None, {"a": 1}])
def test_remove_from_non_list_changes_nothing(existing: Any) -> None:
    assert apply({"l": existing}, {"$remove": {"l": existing}}) == {"l": existing}


def test_remove_missing_property_changes_nothing() -> None:
    assert apply({"a": 1}, {"$remove": {"l": 1}}) == {"a": 1}


# --- $unset, $delete --------------------------------------------------------------------------


def test_unset() -> None:
    assert apply({"a": 1, "b": 2, "c": 3}, {"$unset": ["a", "c", "zz"]}) == {"b": 2}


def test_unset_single_string_through_validator() -> None:
    u = Validator().validate({"$token": "t", "$distinct_id": "d", "$unset": "a"}, 0, T)
    assert isinstance(u, Update)
    assert u.ops == {"$unset": ["a"]}
    u.ignore_time = True
    assert apply_update({"a": 1, "b": 2}, u) == {"b": 2}


def test_delete() -> None:
    assert apply({"a": 1}, {"$delete": True}) is None
    assert apply(None, {"$delete": True}) is None


# --- which operations create a profile --------------------------------------------------------


@pytest.mark.parametrize(
    ("ops", "expected"),
    [
        ({"$set": {}}, {}),
        ({"$set_once": {"a": 1}}, {"a": 1}),
        ({"$add": {"n": 1}}, {"n": 1}),
        ({"$union": {"l": [1]}}, {"l": [1]}),
        ({"$append": {"l": 1}}, {"l": [1]}),
        ({"$remove": {"l": 1}}, None),
        ({"$unset": ["a"]}, None),
        ({"$remove": {"l": 1}, "$unset": ["a"]}, None),
        ({"$delete": True}, None),
    ],
)
def test_which_operations_create_a_profile(ops: dict[str, Any], expected: Props | None) -> None:
    assert apply(None, ops) == expected


def test_non_creating_ops_leave_no_last_seen_on_missing_profile() -> None:
    assert apply(None, {"$unset": ["a"]}, ignore_time=False) is None


# --- several operations in one record: the fixed order ----------------------------------------


def test_operations_apply_in_fixed_order() -> None:
    # keys given in reverse order; $set, $set_once, $add, $union, $append, $remove, $unset
    raw = {
        "$token": "t",
        "$distinct_id": "d",
        "$ignore_time": True,
        "$unset": ["gone"],
        "$remove": {"l": "b"},
        "$append": {"l": "c"},
        "$union": {"l": ["a", "b"]},
        "$add": {"n": 2},
        "$set_once": {"n": 10, "once": 1},
        "$set": {"n": 1, "gone": True, "l": []},
    }
    u = Validator().validate(raw, 0, T)
    assert isinstance(u, Update)
    assert list(u.ops) == ["$set", "$set_once", "$add", "$union", "$append", "$remove", "$unset"]
    # $set n=1, set_once n ignored, add → 3; l: [] ∪ [a, b] + c − b = [a, c]; gone unset
    assert apply_update({"n": 100}, u) == {"n": 3, "once": 1, "l": ["a", "c"]}


# --- $last_seen (SPEC §5) ---------------------------------------------------------------------


def test_format_time() -> None:
    assert format_time(T) == T_TEXT
    assert format_time(T + 0.999) == T_TEXT
    assert format_time(0) == "1970-01-01T00:00:00"


def test_last_seen_set_to_record_time() -> None:
    assert apply(None, {"$set": {"a": 1}}, ignore_time=False) == {"a": 1, "$last_seen": T_TEXT}
    assert apply({"a": 1}, {"$unset": ["a"]}, ignore_time=False) == {"$last_seen": T_TEXT}


def test_last_seen_overrides_set_without_ignore_time() -> None:
    out = apply(None, {"$set": {"$last_seen": "2001-01-01T00:00:00"}}, ignore_time=False)
    assert out == {"$last_seen": T_TEXT}


def test_ignore_time_keeps_last_seen_given_in_set() -> None:
    given = "2001-01-01T00:00:00"
    assert apply(None, {"$set": {"$last_seen": given}}, ignore_time=True) == {"$last_seen": given}
    assert apply({"$last_seen": given}, {"$add": {"n": 1}}, ignore_time=True) == {
        "$last_seen": given,
        "n": 1,
    }


def test_ignore_time_flag_from_record() -> None:
    v = Validator()
    for flag in (True, 1, "true", "1"):
        u = v.validate({"$token": "t", "$distinct_id": "d", "$set": {}, "$ignore_time": flag}, 0, T)
        assert isinstance(u, Update) and u.ignore_time
        assert apply_update(None, u) == {}
    u = v.validate({"$token": "t", "$distinct_id": "d", "$set": {}, "$ignore_time": "no"}, 0, T)
    assert isinstance(u, Update) and not u.ignore_time
    assert apply_update(None, u) == {"$last_seen": T_TEXT}


# --- the 2000-properties limit ----------------------------------------------------------------


def test_property_limit_skips_additions_only() -> None:
    full = {f"p{i}": i for i in range(2000)}
    skips: list[Skip] = []
    out = apply_update(
        full,
        upd({"$set": {"p0": "changed", "new": 1}, "$add": {"p1": 1, "n": 1}, "$union": {"l": [1]}}),
        skips=skips,
    )
    assert out is not None
    assert out["p0"] == "changed" and out["p1"] == 2
    assert "new" not in out and "n" not in out and "l" not in out
    assert len(out) == 2000
    assert sorted(s.field for s in skips) == ["$add.n", "$set.new", "$union.l"]


def test_property_limit_after_unset_room_is_back() -> None:
    full = {f"p{i}": i for i in range(2000)}
    out = apply(full, {"$unset": ["p0"]})
    out = apply(out, {"$set": {"new": 1}})
    assert out is not None and out["new"] == 1 and len(out) == 2000


def test_property_limit_does_not_count_last_seen() -> None:
    almost: Props = {f"p{i}": i for i in range(1999)}
    almost["$last_seen"] = T_TEXT
    out = apply(almost, {"$set": {"new": 1, "newer": 2}}, ignore_time=False)
    assert out is not None
    assert out["new"] == 1 and "newer" not in out
    assert len(out) == 2001  # 2000 properties and $last_seen


def test_property_limit_configurable() -> None:
    skips: list[Skip] = []
    out = apply_update({}, upd({"$set": {"a": 1, "b": 2, "c": 3}}), max_properties=2, skips=skips)
    assert out == {"a": 1, "b": 2}
    assert [s.field for s in skips] == ["$set.c"]


# --- geolocation: implicit $set before the record's own operations ----------------------------

GEO = {"$city": "Paris", "$region": "IDF", "$country_code": "FR", "$timezone": "Europe/Paris"}


def test_geo_applied_before_own_ops() -> None:
    out = apply(None, {"$set_once": {"$city": "Lyon", "x": 1}}, geo=GEO)
    assert out == {**GEO, "x": 1}  # $set_once sees the implicit $set already there
    out = apply(None, {"$unset": ["$timezone"], "$set": {"x": 1}}, geo=GEO)
    assert out == {"$city": "Paris", "$region": "IDF", "$country_code": "FR", "x": 1}


def test_geo_overwrites_previous_location() -> None:
    out = apply({"$city": "Berlin", "$country_code": "DE"}, {"$set": {"x": 1}}, geo=GEO)
    assert out == {**GEO, "x": 1}


@pytest.mark.parametrize("name", ["$city", "$region", "$country_code", "$timezone"])
def test_geo_skipped_when_set_names_a_geo_property(name: str) -> None:
    out = apply({"$city": "Berlin"}, {"$set": {name: "given"}}, geo=GEO)
    assert out == {"$city": "Berlin", name: "given"}


def test_geo_not_skipped_for_set_once_naming_geo() -> None:
    out = apply(None, {"$set_once": {"$country_code": "US"}}, geo=GEO)
    assert out == GEO


@pytest.mark.parametrize("t", [0.0, 0.5, T, T + 0.999, 1_796_458_116.971, 4_102_444_800.25])
def test_last_seen_of_an_update_is_format_time_of_its_time(t: float) -> None:
    """apply_update formats $last_seen itself (not through format_time, one call fewer per
    update); a replay uses format_time: both must write the same text."""
    update = Update(0, "tok", "d", t, True, False, {"$set": {"a": 1}}, t)
    assert apply_update(None, update) == {"a": 1, "$last_seen": format_time(t)}
