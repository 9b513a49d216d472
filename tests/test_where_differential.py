"""Random `where` expressions agree between the Python reference evaluator and the SQL they
compile to, on random profiles: in SQLite (the embedded store's engine) and in a real
PostgreSQL (a scratch database created for this run)."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from typing import Any

import apsw
import orjson
import psycopg
import pytest

from peoplebase.query.compile import compile_where
from peoplebase.query.evaluate import matches
from peoplebase.query.where import parse

PG_DSN = os.environ.get("PEOPLEBASE_TEST_PG", "host=127.0.0.1 user=postgres")
NAMES = ["a", "b", "plan", "tags", "$last_seen", 'we"ird', "n"]
STRINGS = [
    "",
    "pro",
    "Pro",
    "free",
    "12",
    "-3.5",
    "007",
    "x1",
    "é",
    "2024-01-15",
    "2024-02-30T12:30",
    "2023-12-31T23:59:59Z",
    "2024-01-15 08:00",
    "1.",
    "ab c",
]
NUMBERS = [0, 1, -1, 2, 3.5, -2.25, 12, 1e12, 1705300000, 100, 7]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.random()
    if choice < 0.3:
        return rng.choice(STRINGS)
    if choice < 0.6:
        return rng.choice(NUMBERS)
    if choice < 0.7:
        return rng.choice([True, False])
    if choice < 0.78:
        return None
    if choice < 0.93 and depth == 0:
        return [random_value(rng, 1) for _ in range(rng.randint(0, 4))]
    if depth == 0:
        return {"k": random_value(rng, 1)} if rng.random() < 0.7 else {}
    return rng.choice(STRINGS)


def random_profile(rng: random.Random) -> dict[str, Any]:
    return {name: random_value(rng) for name in NAMES if rng.random() < 0.6}


def literal(rng: random.Random) -> str:
    choice = rng.random()
    if choice < 0.4:
        return orjson.dumps(rng.choice(STRINGS)).decode()
    if choice < 0.8:
        return repr(rng.choice(NUMBERS)).replace("e+", "e")
    return rng.choice(["true", "false", "null"])


def prop(rng: random.Random) -> str:
    return f"properties[{orjson.dumps(rng.choice(NAMES)).decode()}]"


def value_expr(rng: random.Random, depth: int) -> str:
    choice = rng.random()
    if depth <= 0 or choice < 0.35:
        return prop(rng)
    if choice < 0.55:
        return literal(rng)
    if choice < 0.8:
        fn = rng.choice(["number", "string", "boolean", "datetime"])
        return f"{fn}({value_expr(rng, depth - 1)})"
    op = rng.choice(["+", "-", "*", "/", "%"])
    return f"({value_expr(rng, depth - 1)} {op} {value_expr(rng, depth - 1)})"


def condition(rng: random.Random, depth: int) -> str:
    choice = rng.random()
    if depth > 0 and choice < 0.25:
        op = rng.choice(["and", "or"])
        return f"({condition(rng, depth - 1)}) {op} ({condition(rng, depth - 1)})"
    if depth > 0 and choice < 0.32:
        return f"not ({condition(rng, depth - 1)})"
    if choice < 0.42:
        return f"{rng.choice(['defined', 'not defined'])}({value_expr(rng, 1)})"
    if choice < 0.55:
        if rng.random() < 0.5:
            items = ", ".join(literal(rng) for _ in range(rng.randint(0, 3)))
            return f"{value_expr(rng, 1)} in [{items}]"
        return f"{value_expr(rng, 1)} {rng.choice(['in', 'not in'])} {prop(rng)}"
    if choice < 0.6:
        return value_expr(rng, 1)
    op = rng.choice(["==", "!=", "<", "<=", ">", ">="])
    return f"{value_expr(rng, 2)} {op} {value_expr(rng, 2)}"


PROFILES = [random_profile(random.Random(1000 + i)) for i in range(60)]
EXPRESSIONS = [condition(random.Random(i), 3) for i in range(400)]
HANDWRITTEN = [
    'properties["plan"] == "pro" and number(properties["n"]) > 2',
    'datetime(properties["$last_seen"]) > datetime("2024-01-01")',
    'datetime(properties["$last_seen"]) >= 1705300000',
    '"pro" in properties["tags"] or "x" in properties["plan"]',
    'not defined(properties["a"])',
    'properties["n"] % 3 == 1',
    'string(properties["n"]) == "12"',
    'boolean(properties["tags"])',
    "properties[" + orjson.dumps('we"ird').decode() + "] != null",
    'properties["a"] in [1, "pro", true, null]',
]


def expected(expr: str) -> list[int]:
    node = parse(expr)
    return [i for i, p in enumerate(PROFILES) if matches(node, p)]


@pytest.fixture(scope="module")
def sqlite_db() -> Iterator[apsw.Connection]:
    conn = apsw.Connection(":memory:")
    conn.execute("CREATE TABLE profiles (id INTEGER, props TEXT)")
    for i, p in enumerate(PROFILES):
        conn.execute("INSERT INTO profiles VALUES (?, ?)", (i, orjson.dumps(p).decode()))
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def pg_db() -> Iterator[psycopg.Connection[Any]]:
    name = f"pb_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN + " dbname=postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with psycopg.connect(PG_DSN + f" dbname={name}", autocommit=True) as conn:
            conn.execute("SET jit = off")  # compiling each one-off query costs more than it saves
            conn.execute(
                "CREATE TABLE profiles (project_id bigint, distinct_id text, id int, props jsonb)"
            )
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO profiles VALUES (1, %s, %s, %s::jsonb)",
                    [(str(i), i, orjson.dumps(p).decode()) for i, p in enumerate(PROFILES)],
                )
            yield conn
    finally:
        with psycopg.connect(PG_DSN + " dbname=postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sqlite_ids(conn: apsw.Connection, expr: str) -> list[int]:
    sql, params = compile_where(parse(expr), "sqlite")
    query = "SELECT id FROM profiles WHERE " + sql + " ORDER BY id"  # noqa: S608 - compiled SQL
    return [r[0] for r in conn.execute(query, params)]


def pg_ids(conn: psycopg.Connection[Any], expr: str) -> list[int]:
    sql, params = compile_where(parse(expr), "postgres")
    query = "SELECT id FROM profiles WHERE " + sql + " ORDER BY id"  # noqa: S608 - compiled SQL
    rows = conn.execute(query, params).fetchall()  # type: ignore[call-overload]
    return [r[0] for r in rows]


def test_generator_makes_interesting_expressions() -> None:
    outcomes = [len(expected(e)) for e in EXPRESSIONS]
    assert sum(1 for n in outcomes if 0 < n < len(PROFILES)) > 60  # many are selective


@pytest.mark.parametrize("chunk", range(8))
def test_sqlite_agrees_with_reference(sqlite_db: apsw.Connection, chunk: int) -> None:
    for expr in [*HANDWRITTEN, *EXPRESSIONS][chunk::8]:
        assert sqlite_ids(sqlite_db, expr) == expected(expr), expr


@pytest.mark.parametrize("chunk", range(8))
def test_postgres_agrees_with_reference(pg_db: psycopg.Connection[Any], chunk: int) -> None:
    for expr in [*HANDWRITTEN, *EXPRESSIONS][chunk::8]:
        assert pg_ids(pg_db, expr) == expected(expr), expr


def test_handwritten_cases_select_something(sqlite_db: apsw.Connection) -> None:
    assert all(
        expected(e) != list(range(len(PROFILES))) or e.startswith("boolean")
        for e in HANDWRITTEN[:3]
    )
    assert any(expected(e) for e in HANDWRITTEN)
