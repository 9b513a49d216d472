"""Equality filters on indexed properties use an index, and never change results."""

from __future__ import annotations

import random
from typing import Any

import pytest

from peoplebase.query import where
from peoplebase.query.indexes import (
    BadIndexedProperty,
    parse_names,
    postgres_index_name,
    sqlite_index_name,
    sqlite_indexed,
)
from peoplebase.records import Validator
from peoplebase.store import open_store

pytestmark = pytest.mark.all_backends


@pytest.fixture
def make_store(db_url: str):  # type: ignore[no-untyped-def]
    stores = []

    def make(names=("$email", "plan", "plän")):  # type: ignore[no-untyped-def]
        store = open_store(db_url)
        if db_url.startswith("postgresql"):
            store.migrate()  # type: ignore[attr-defined]
        store.open()
        store.sync_property_indexes(names)  # type: ignore[attr-defined]
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def _fill(store: Any, n: int = 300) -> None:
    rng = random.Random(5)
    v = Validator()
    updates = []
    for i in range(n):
        props = {"$email": f"u{i % 50}@x.test", "plan": rng.choice(["free", "pro", 3, 3.0, True]), "n": i}
        if i % 7 == 0:
            del props["plan"]
        if i % 11 == 0:  # the name in a value and as a nested key: the SQLite index's
            # substring prefilter matches these, its JSON test must not
            props["note"] = "plan"
            props["o"] = {"plan": "pro"}
            props.pop("plan", None)
        if i % 13 == 0:
            props["plän"] = "pro"  # a name that is not ASCII
        updates.append(v.validate({"$token": "t", "$distinct_id": f"d{i}", "$set": props}, i, 1e9))
    store.write_group([updates])  # type: ignore[list-item]


def _ids(store: Any, expr: str) -> list[str]:
    return [did for did, _ in store.browse_profiles(1, where=expr, limit=10_000)]


def test_plan_uses_the_property_index(make_store, backend: str) -> None:  # type: ignore[no-untyped-def]
    store = make_store()
    _fill(store)
    cond, params = store._where_sql(where.parse('properties["$email"] == "u3@x.test" and properties["n"] > 5'))
    if backend == "sqlite":
        store.analyze()  # the server does this at start and every 10 minutes of writes
        sql = "EXPLAIN QUERY PLAN SELECT distinct_id FROM profiles WHERE project_id = ? AND props IS NOT NULL AND "
        plan = store._reader().execute(sql + cond, (1, *params)).fetchall()  # values are bound
        text = " ".join(str(row[-1]) for row in plan)
    else:
        sql = "EXPLAIN SELECT distinct_id FROM profiles WHERE project_id = %s AND props IS NOT NULL AND "
        with store._reads().connection() as conn:
            conn.execute("SET enable_seqscan = off")  # a 300-row table would be scanned anyway
            text = " ".join(r[0] for r in conn.execute(sql + cond, (1, *params)))  # values are bound
    index_name = sqlite_index_name if backend == "sqlite" else postgres_index_name
    assert index_name("$email") in text, text


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
        'properties["plän"] == "pro"',
    ],
)
def test_results_equal_with_and_without_indexes(make_store, expr: str) -> None:  # type: ignore[no-untyped-def]
    indexed = make_store()
    _fill(indexed)
    expected = _ids(indexed, expr)
    indexed.sync_property_indexes(())
    assert _ids(indexed, expr) == expected
    assert expected == sorted(expected)
    # and the reference evaluator agrees
    from peoplebase.query.evaluate import matches

    rows = indexed.browse_profiles(1, limit=10_000)
    assert [did for did, props in rows if matches(where.parse(expr), props)] == expected


def test_indexes_follow_the_setting(make_store, backend: str) -> None:  # type: ignore[no-untyped-def]
    store = make_store(("$email", "plan"))

    def names() -> set[str]:
        if backend == "sqlite":
            rows = store._reader().execute("SELECT name FROM sqlite_master WHERE name LIKE 'profiles_prop_%'")
        else:
            rows = store._read("SELECT indexname FROM pg_indexes WHERE indexname LIKE 'profiles_prop_%%'")
        return {r[0] for r in rows}

    index_name = sqlite_index_name if backend == "sqlite" else postgres_index_name
    assert names() == {index_name("$email"), index_name("plan")}
    store.sync_property_indexes(("$name",))
    assert names() == {index_name("$name")}


def test_sqlite_indexes_are_partial_and_replace_full_ones(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Profiles without the property cost the index nothing; older full indexes are replaced."""
    from peoplebase.store.sqlite import SqliteStore

    path = str(tmp_path / "p.db")
    store = SqliteStore(path, indexed_properties=())
    store.open()
    old = postgres_index_name("$email")  # the name full indexes had before
    conn = store._writer()
    conn.execute(f"CREATE INDEX \"{old}\" ON profiles (project_id, json_extract(props, '$.\"$email\"'))")
    store.sync_property_indexes(("$email",))
    rows = dict(store._reader().execute("SELECT name, sql FROM sqlite_master WHERE name LIKE 'profiles_prop_%'"))
    assert list(rows) == [sqlite_index_name("$email")]
    assert "instr(props, '\"$email\"') > 0 AND" in rows[sqlite_index_name("$email")]
    assert "IS NOT NULL" in rows[sqlite_index_name("$email")]
    _fill(store)
    v = Validator()
    store.write_group([[v.validate({"$token": "t", "$distinct_id": f"x{i}", "$set": {"a": i}}, i, 1e9) for i in range(40)]])  # type: ignore[list-item]
    index = sqlite_index_name("$email")
    sql = "SELECT count(*) FROM profiles INDEXED BY {} WHERE project_id = 1 AND {}"
    # sql: reviewed: our own index name and the checked condition
    entries = _one_value(store, sql.format(f'"{index}"', sqlite_indexed("$email")))
    with_email = _one_value(store, "SELECT count(*) FROM profiles WHERE json_extract(props, '$.\"$email\"') IS NOT NULL")
    without = _one_value(store, "SELECT count(*) FROM profiles WHERE json_extract(props, '$.\"$email\"') IS NULL")
    assert entries == with_email > 0 and without > 0
    store.close()


def _one_value(store, sql: str) -> int:  # type: ignore[no-untyped-def]
    return int(store._reader().execute(sql).fetchone()[0])


@pytest.mark.parametrize("bad", ['a"b', "a'b", "a\\b", "a\nb"])
def test_unindexable_names_are_refused(bad: str) -> None:
    with pytest.raises(BadIndexedProperty):
        parse_names(f"$email,{bad}")


def test_parse_names_dedups_and_trims() -> None:
    assert parse_names(" $email , plan,$email,, ") == ("$email", "plan")
