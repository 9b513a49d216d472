"""Record validation: the envelope, operation types and the limits (SPEC §2, §6)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peoplebase.records import Validator, parse_time, truthy
from peoplebase.types import KNOWN_OPS, Rejection, Update

NOW = 1_700_000_000.0


def rec(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"$token": "tok", "$distinct_id": "u1"}
    for key, value in fields.items():
        base["$" + key] = value
    return base


def ok(raw: Any, v: Validator | None = None, **kw: Any) -> Update:
    out = (v or Validator()).validate(raw, 3, NOW, **kw)
    assert isinstance(out, Update), out
    return out


def bad(raw: Any, v: Validator | None = None, **kw: Any) -> Rejection:
    out = (v or Validator()).validate(raw, 3, NOW, **kw)
    assert isinstance(out, Rejection), out
    assert out.index == 3
    return out


# --- envelope ---------------------------------------------------------------------------------


def test_valid_record() -> None:
    u = ok(rec(set={"a": 1}))
    assert (u.token, u.distinct_id, u.index) == ("tok", "u1", 3)
    assert u.ops == {"$set": {"a": 1}}
    assert u.time == NOW and not u.explicit_time and u.received == NOW
    assert u.dedup is None and not u.ignore_time and u.skips == []


@pytest.mark.parametrize("raw", [[1], "x", 5, None])
def test_record_must_be_an_object(raw: Any) -> None:
    r = bad(raw)
    assert r.error == "record, must be a JSON object"


@pytest.mark.parametrize("token", [None, "", 5, ["tok"], {}])
def test_token_missing_or_empty(token: Any) -> None:
    raw = {"$distinct_id": "u1", "$set": {"a": 1}}
    if token is not None:
        raw["$token"] = token
    r = bad(raw)
    assert r.error == "$token, missing or empty"
    assert r.distinct_id == "u1"


@pytest.mark.parametrize("did", [None, "", True, [1], {"a": 1}])
def test_distinct_id_missing_or_empty(did: Any) -> None:
    raw: dict[str, Any] = {"$token": "tok", "$set": {"a": 1}}
    if did is not None:
        raw["$distinct_id"] = did
    assert bad(raw).error == "$distinct_id, missing or empty"


@pytest.mark.parametrize(("did", "text"), [(42, "42"), (-7, "-7"), (42.0, "42"), (1.5, "1.5")])
def test_numeric_distinct_id_is_stored_as_string(did: Any, text: str) -> None:
    assert ok({"$token": "t", "$distinct_id": did, "$set": {}}).distinct_id == text


def test_distinct_id_length_limit() -> None:
    assert ok(rec(distinct_id="é" * 255, set={})).distinct_id == "é" * 255
    r = bad(rec(distinct_id="x" * 256, set={}))
    assert r.field == "$distinct_id" and "255" in r.message


def test_closed_tokens() -> None:
    v = Validator(token_known=lambda t: t == "known")
    assert ok({"$token": "known", "$distinct_id": "u", "$set": {}}, v).token == "known"
    assert bad(rec(set={}), v).error == "$token, unknown project"


def test_unknown_top_level_keys_ignored() -> None:
    raw = rec(set={"a": 1})
    raw.update({"$device_id": "d", "$user_id": "u", "$had_persisted_distinct_id": True})
    raw.update({"mp_lib": "web", "$ignore_alias": True, "whatever": [1]})
    u = ok(raw)
    assert u.ops == {"$set": {"a": 1}}
    assert u.skips == []


# --- $time ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (1_600_000_000, 1_600_000_000.0),
        (1_600_000_000_123, 1_600_000_000.123),
        (1_600_000_000.5, 1_600_000_000.5),
        ("1600000000", 1_600_000_000.0),
        ("1600000000123", 1_600_000_000.123),
        (" 1600000000.25 ", 1_600_000_000.25),
        ("1.6e9", 1_600_000_000.0),
        (99_999_999_999, 99_999_999_999.0),  # just under 1e11: still seconds (clamped below)
        (100_000_000_000, 100_000_000.0),  # 1e11: milliseconds
        (0, 0.0),
    ],
)
def test_parse_time(value: Any, seconds: float) -> None:
    assert parse_time(value) == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize(
    "value",
    ["abc", "", "12abc", True, False, [1], {}, -5, "-5", "0x10", -0.5, float("inf"), float("nan")],
)
def test_invalid_time(value: Any) -> None:
    assert parse_time(value) is None
    r = bad(rec(set={}, time=value))
    assert r.field == "$time"
    assert r.error.startswith("$time, ")


def test_time_seconds_and_milliseconds() -> None:
    assert ok(rec(set={}, time=1_600_000_000)).time == 1_600_000_000.0
    u = ok(rec(set={}, time=1_600_000_000_500))
    assert u.time == pytest.approx(1_600_000_000.5)
    assert u.explicit_time


def test_future_time_clamped_with_skew() -> None:
    v = Validator(time_skew=60.0)
    assert ok(rec(set={}, time=NOW + 59), v).time == NOW + 59
    assert ok(rec(set={}, time=NOW + 61), v).time == NOW
    assert ok(rec(set={}, time=(NOW + 3600) * 1000), v).time == NOW
    assert ok(rec(set={}, time=NOW + 61), Validator(time_skew=120.0)).time == NOW + 61


def test_null_time_is_missing() -> None:
    u = ok(rec(set={}, time=None))
    assert u.time == NOW and not u.explicit_time and u.dedup is None


# --- operations -------------------------------------------------------------------------------


def test_delete_alone() -> None:
    u = ok(rec(delete=""))
    assert u.is_delete and u.ops == {"$delete": True}


@pytest.mark.parametrize(
    "other", [{"$set": {"a": 1}}, {"$unset": ["a"]}, {"$add": {"n": 1}}, {"$remove": {}}]
)
def test_delete_combined_is_invalid(other: dict[str, Any]) -> None:
    r = bad({**rec(delete=None), **other})
    assert r.field == "$delete"
    assert "combined" in r.message


def test_no_operation_is_invalid() -> None:
    r = bad(rec(time=NOW, ignore_time=True, ip="1.2.3.4"))
    assert r.field == "record"
    assert "no operation" in r.message and "$set" in r.message
    assert bad(rec(Set={"a": 1})).field == "record"  # op names are case-sensitive


@pytest.mark.parametrize(
    ("op", "value"),
    [
        ("$set", [1]),
        ("$set", "a"),
        ("$set", None),
        ("$set_once", 1),
        ("$add", ["n"]),
        ("$union", "l"),
        ("$append", True),
        ("$remove", [1]),
        ("$unset", {"a": 1}),
        ("$unset", 5),
        ("$unset", None),
    ],
)
def test_ill_typed_operation_is_invalid(op: str, value: Any) -> None:
    r = bad({**rec(), op: value})
    assert r.field == op
    assert r.message.startswith("must be")


def test_ill_typed_operation_invalidates_whole_record() -> None:
    r = bad({**rec(set={"a": 1}), "$add": "n"})
    assert r.field == "$add"


@pytest.mark.parametrize("flag", [True, 1, 1.0, "true", "1", "TRUE", " True "])
def test_truthy(flag: Any) -> None:
    assert truthy(flag)
    assert ok(rec(set={}, ignore_time=flag)).ignore_time


@pytest.mark.parametrize("flag", [False, 0, 2, "0", "false", "yes", "", None, [1], {}])
def test_not_truthy(flag: Any) -> None:
    assert not truthy(flag)
    assert not ok(rec(set={}, ignore_time=flag)).ignore_time


@pytest.mark.parametrize("op", ["$set", "$set_once"])
def test_reserved_names_in_set_skipped_and_reported(op: str) -> None:
    u = ok({**rec(), op: {"$ip": "1.2.3.4", "$ignore_time": True, "plan": "pro"}})
    assert u.ops == {op: {"plan": "pro"}}
    assert not u.ignore_time  # $ignore_time inside $set is not the modifier
    assert sorted(s.field for s in u.skips) == [f"{op}.$ignore_time", f"{op}.$ip"]
    assert all("reserved" in s.message for s in u.skips)


def test_add_values() -> None:
    u = ok(rec(add={"a": 1, "b": "5", "c": "-2.5", "d": " 3 ", "e": 1.5, "f": "+4", "g": ".5"}))
    assert u.ops["$add"] == {"a": 1, "b": 5, "c": -2.5, "d": 3, "e": 1.5, "f": 4, "g": 0.5}
    assert isinstance(u.ops["$add"]["b"], int)
    assert isinstance(u.ops["$add"]["c"], float)


@pytest.mark.parametrize("value", [True, False, None, "abc", "1e3", "", "0x1", [1], {"a": 1}])
def test_add_non_numeric_value_skipped(value: Any) -> None:
    u = ok(rec(add={"bad": value, "good": 1}))
    assert u.ops["$add"] == {"good": 1}
    assert [s.field for s in u.skips] == ["$add.bad"]


def test_union_scalar_wrapped() -> None:
    u = ok(rec(union={"l": "a", "m": ["b", "c"], "n": None}))
    assert u.ops["$union"] == {"l": ["a"], "m": ["b", "c"], "n": [None]}


def test_append_and_remove_values_kept_as_given() -> None:
    u = ok(rec(append={"l": [1, 2]}, remove={"l": {"a": 1}}))
    assert u.ops == {"$append": {"l": [1, 2]}, "$remove": {"l": {"a": 1}}}


def test_unset_values() -> None:
    assert ok(rec(unset="a")).ops == {"$unset": ["a"]}
    u = ok(rec(unset=["a", 1, None, "b"]))
    assert u.ops == {"$unset": ["a", "b"]}
    assert [s.field for s in u.skips] == ["$unset[1]", "$unset[2]"]


def test_skipped_keys_never_invalidate() -> None:
    u = ok(rec(add={"n": "x"}))  # every key skipped, record still valid
    assert u.ops == {"$add": {}}
    assert len(u.skips) == 1


# --- §6 limits --------------------------------------------------------------------------------


def test_property_names_truncated() -> None:
    long = "n" * 300
    u = ok(rec(set={long: 1}, add={long: 2}, unset=[long]))
    short = "n" * 255
    assert u.ops == {"$set": {short: 1}, "$add": {short: 2}, "$unset": [short]}


def test_string_values_truncated_everywhere() -> None:
    s = "é" * 200  # 400 bytes
    cut = "é" * 127  # 254 bytes
    u = ok(
        rec(
            set={"s": s, "l": [s, 1], "o": {"k": s, "n": {"m": [s]}}},
            set_once={"s": "x" * 300},
            union={"u": [s]},
            append={"a": s},
            remove={"r": s},
        )
    )
    assert u.ops["$set"] == {"s": cut, "l": [cut, 1], "o": {"k": cut, "n": {"m": [cut]}}}
    assert u.ops["$set_once"] == {"s": "x" * 255}
    assert u.ops["$union"] == {"u": [cut]}
    assert u.ops["$append"] == {"a": cut}
    assert u.ops["$remove"] == {"r": cut}
    assert u.skips == []


def test_nested_object_keys_truncated() -> None:
    u = ok(rec(set={"o": {"k" * 300: 1}}))
    assert u.ops["$set"] == {"o": {"k" * 255: 1}}


@pytest.mark.parametrize("op", ["$set", "$set_once", "$union", "$append"])
def test_list_over_256kb_skipped(op: str) -> None:
    big = ["x" * 250] * 1100
    u = ok({**rec(), op: {"big": big, "small": ["a"]}})
    assert "big" not in u.ops[op] and "small" in u.ops[op]
    assert [s.field for s in u.skips] == [f"{op}.big"]
    assert "262144" in u.skips[0].message


def test_object_over_256kb_skipped() -> None:
    # 200 keys (under the key limit) of 1500-byte lists: over 256 KB
    big = {f"k{i}": ["y" * 250] * 6 for i in range(200)}
    u = ok(rec(set={"big": big, "ok": 1}))
    assert u.ops["$set"] == {"ok": 1}
    assert [s.field for s in u.skips] == ["$set.big"]


def test_object_depth_and_width_limits() -> None:
    three = {"a": {"b": {"c": 1}}}
    four = {"a": {"b": {"c": {"d": 1}}}}
    wide = {f"k{i}": i for i in range(256)}
    at_limit = {f"k{i}": i for i in range(255)}
    u = ok(rec(set={"three": three, "four": four, "wide": wide, "at": at_limit}))
    assert u.ops["$set"] == {"three": three, "at": at_limit}
    assert sorted(s.field for s in u.skips) == ["$set.four", "$set.wide"]
    u = ok(rec(append={"l": four}, union={"u": [four, 1]}))
    assert u.ops == {"$append": {}, "$union": {}}
    assert sorted(s.field for s in u.skips) == ["$append.l", "$union.u"]


def test_record_size_limit_only_when_checked() -> None:
    raw = rec(set={f"k{i}": "x" * 250 for i in range(4100)})  # over 1 MB of JSON
    assert len(orjson.dumps(raw)) > 1_000_000
    r = bad(raw, check_size=True)
    assert r.field == "record" and "1000000" in r.message
    assert isinstance(Validator().validate(raw, 0, NOW, check_size=False), Update)
    small = rec(set={"a": "x" * 900})
    assert isinstance(Validator(max_record_bytes=1000).validate(small, 0, NOW, True), Update)
    assert bad(small, Validator(max_record_bytes=500), check_size=True).field == "record"


# --- dedup identity ---------------------------------------------------------------------------


def test_dedup_only_with_explicit_time() -> None:
    assert ok(rec(set={"a": 1})).dedup is None
    a = ok(rec(set={"a": 1}, time=1_600_000_000))
    b = ok({"$set": {"a": 1}, "$time": 1_600_000_000, "$distinct_id": "u1", "$token": "tok"})
    assert a.dedup is not None
    assert a.dedup == b.dedup  # key order does not matter
    assert a.dedup != ok(rec(set={"a": 2}, time=1_600_000_000)).dedup
    assert a.dedup != ok(rec(set={"a": 1}, time=1_600_000_001)).dedup
    assert a.dedup != ok(rec(set={"a": 1}, time=1_600_000_000, device_id="x")).dedup


# --- geolocation hook -------------------------------------------------------------------------


def test_geo_resolved_only_for_set_and_set_once() -> None:
    calls: list[tuple[Any, Any]] = []

    def geo(raw: dict[str, Any], ip: str | None) -> dict[str, Any]:
        calls.append((raw.get("$ip"), ip))
        return {"$country_code": "FR"}

    v = Validator(geo=geo)
    u = ok(rec(set={"a": 1}, ip="8.8.8.8"), v, request_ip="9.9.9.9")
    assert u.geo == {"$country_code": "FR"}
    assert u.ops == {"$set": {"a": 1}}  # the IP is not a property
    assert ok(rec(set_once={"a": 1}), v).geo == {"$country_code": "FR"}
    assert ok(rec(add={"n": 1}), v).geo is None
    assert ok(rec(delete=True), v).geo is None
    assert calls == [("8.8.8.8", "9.9.9.9"), (None, None)]


@pytest.mark.parametrize("digits", [30, 400, 5000])
def test_add_huge_numeric_strings(digits: int) -> None:
    u = ok(rec(add={"n": "9" * digits, "m": 1}))
    if digits == 30:
        assert u.ops["$add"] == {"n": float("9" * 30), "m": 1}
    else:  # past the float range: skipped, never an error
        assert u.ops["$add"] == {"m": 1}
        assert [s.field for s in u.skips] == ["$add.n"]


# --- any JSON: an Update or a Rejection, never an exception -----------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=300),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
top_keys = st.sampled_from(
    [
        "$token",
        "$distinct_id",
        "$time",
        "$ignore_time",
        "$ip",
        "$delete",
        "$set",
        "$set_once",
        "$add",
        "$union",
        "$append",
        "$remove",
        "$unset",
        "other",
    ]
)


@given(st.dictionaries(top_keys, json_values, max_size=6), st.booleans())
@settings(max_examples=200, deadline=None)
def test_any_record_validates_without_error(raw: dict[str, Any], check_size: bool) -> None:
    out = Validator().validate(raw, 0, NOW, check_size=check_size)
    if isinstance(out, Rejection):
        assert out.field and out.message
        return
    assert out.token == raw["$token"] and out.distinct_id
    assert out.ops and set(out.ops) <= KNOWN_OPS
    # what is kept is storable JSON, within the string, name and nesting limits
    orjson.dumps(out.ops)
    for value in out.ops.values():
        if isinstance(value, dict):
            for name, item in value.items():
                assert len(name) <= 255
                assert_within_limits(item, 0)


def assert_within_limits(value: Any, depth: int) -> None:
    if isinstance(value, str):
        assert len(value.encode("utf-8", "surrogatepass")) <= 255
    elif isinstance(value, list):
        for item in value:
            assert_within_limits(item, depth)
    elif isinstance(value, dict):
        assert depth < 3 and len(value) <= 255
        for name, item in value.items():
            assert len(name) <= 255
            assert_within_limits(item, depth + 1)


def test_updates_survive_pickling_field_for_field() -> None:
    """`--writer process` sends validated updates to the writer process by pickle."""
    import dataclasses
    import pickle

    from peoplebase.types import Skip, Update

    update = Update(3, "tok", "d", 1.5, True, True, {"$set": {"a": [1]}}, 2.5, {"$city": "X"}, -7, True, [Skip("f", "m")])
    copy = pickle.loads(pickle.dumps(update, protocol=5))
    assert copy == update and copy is not update
    assert [f.name for f in dataclasses.fields(Update)] == [
        "index", "token", "distinct_id", "time", "explicit_time", "ignore_time", "ops",
        "received", "geo", "dedup", "clamped", "skips",
    ]  # fmt: skip


# --- the $set / $set_once shortcut agrees with the per-property rules ------------------------

_EDGE_NAMES = st.sampled_from(
    ["plan", "$ip", "$ignore_time", "$name", "a" * 255, "b" * 256, "nul\x00name", ""]
)
_EDGE_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 0.5, float("inf")]),
    st.floats(allow_nan=True),
    st.text(max_size=70),
    st.sampled_from(["x" * 63, "x" * 64, "é" * 63, "é" * 64, "with\x00nul", "\U0001f600" * 64]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
)


@settings(max_examples=400, deadline=None)
@given(
    op=st.sampled_from(["$set", "$set_once"]),
    props=st.dictionaries(st.one_of(_EDGE_NAMES, st.text(max_size=8)), _EDGE_VALUES, max_size=6),
)
def test_set_shortcut_matches_the_rules_of_each_property(op: str, props: dict[str, Any]) -> None:
    """Validation keeps plain values of $set and $set_once without a call per property; the
    outcome must be what the per-property rules give (truncation, limits, skips)."""
    from peoplebase.records import _props, _set_value

    expected_skips: list[Any] = []
    expected = _props(op, props, expected_skips, _set_value)  # property by property
    u = Validator().validate({**rec(), op: props}, 0, NOW)
    assert isinstance(u, Update)
    assert orjson.dumps(u.ops[op]) == orjson.dumps(expected)  # key order and value types too
    assert u.skips == expected_skips
