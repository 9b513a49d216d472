"""Equality filters on indexed properties use an index, and never change results."""

from __future__ import annotations

import random

import pytest

from peoplebase.query import where
from peoplebase.query.indexes import BadIndexedProperty, parse_names, sqlite_index_name
from peoplebase.records import Validator
from peoplebase.store.sqlite import SqliteStore


def _store(tmp_path, names=("$email", "plan")) -> SqliteStore:  # type: ignore[no-untyped-def]
    store = SqliteStore(str(tmp_path / "idx.db"))
    store.open()
    store.sync_property_indexes(names)
    return store


def _fill(store: SqliteStore, n: int = 300) -> None:
    rng = random.Random(5)
    v = Validator()
    updates = []
    for i in range(n):
        props = {"$email": f"u{i % 50}@x.test", "plan": rng.choice(["free", "pro", 3, 3.0, True]), "n": i}
        if i % 7 == 0:
            del props["plan"]
        updates.append(v.validate({"$token": "t", "$distinct_id": f"d{i}", "$set": props}, i, 1e9))
    store.write_group([updates])  # type: ignore[list-item]


def _ids(store: SqliteStore, expr: str) -> list[str]:
    return [did for did, _ in store.browse_profiles(1, where=expr, limit=10_000)]


def test_plan_uses_the_property_index(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = _store(tmp_path)
    _fill(store)
    store.analyze()  # the server does this at start and every 10 minutes of writes
    cond, params = store._where_sql(where.parse('properties["$email"] == "u3@x.test" and properties["n"] > 5'))
    sql = "EXPLAIN QUERY PLAN SELECT distinct_id FROM profiles WHERE project_id = ? AND props IS NOT NULL AND "
    plan = store._reader().execute(
        sql + cond,  # compiled by the store: values are bound
        (1, *params),
    ).fetchall()
    text = " ".join(str(row[-1]) for row in plan)
    assert sqlite_index_name("$email") in text, text


@pytest.mark.parametrize(
    "expr",
    [
        'properties["$email"] == "u3@x.test"',
        'properties["plan"] == "pro"',
        'properties["plan"] == 3',
        '"pro" == properties["plan"] and properties["n"] < 100',
        'properties["plan"] == "pro" or properties["n"] == 4',
        'not (properties["plan"] == "free")',
        'properties["plan"] == true',
    ],
)
def test_results_equal_with_and_without_indexes(tmp_path, expr: str) -> None:  # type: ignore[no-untyped-def]
    indexed = _store(tmp_path)
    _fill(indexed)
    expected = _ids(indexed, expr)
    indexed.sync_property_indexes(())
    assert _ids(indexed, expr) == expected
    assert expected == sorted(expected)
    # and the reference evaluator agrees
    from peoplebase.query.evaluate import matches

    rows = indexed.browse_profiles(1, limit=10_000)
    assert [did for did, props in rows if matches(where.parse(expr), props)] == expected


def test_indexes_follow_the_setting(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = _store(tmp_path, ("$email", "plan"))

    def names() -> set[str]:
        rows = store._reader().execute("SELECT name FROM sqlite_master WHERE name LIKE 'profiles_prop_%'")
        return {r[0] for r in rows}

    assert names() == {sqlite_index_name("$email"), sqlite_index_name("plan")}
    store.sync_property_indexes(("$name",))
    assert names() == {sqlite_index_name("$name")}


@pytest.mark.parametrize("bad", ['a"b', "a'b", "a\\b", "a\nb"])
def test_unindexable_names_are_refused(bad: str) -> None:
    with pytest.raises(BadIndexedProperty):
        parse_names(f"$email,{bad}")


def test_parse_names_dedups_and_trims() -> None:
    assert parse_names(" $email , plan,$email,, ") == ("$email", "plan")
