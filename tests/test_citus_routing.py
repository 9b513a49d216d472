"""Citus readiness: every write-path statement names one profile by its full distribution key.

Citus is not installed here, so this checks what can be checked on PostgreSQL: the SQL the
store really sends while merging a varied workload (recorded at the driver), and that the
Citus layout (sql/postgres/citus.sql) places every table of the migrated schema.
"""

from __future__ import annotations

import re
import time
from typing import Any

import psycopg
import pytest

from peoplebase.store.postgres import (
    DROP_PLACEHOLDER,
    WRITE_PATH_SQL,
    PostgresStore,
    citus_sql,
)
from peoplebase.types import Update

PROFILE_TABLES = ("profiles", "updates")
KEY_FILTER = re.compile(r"\bWHERE project_id = %s AND distinct_id = %s\b")


class RecordingCursor(psycopg.Cursor[Any]):
    statements: list[str] = []

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        RecordingCursor.statements.append(str(query))
        return super().execute(query, params, **kwargs)

    def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> Any:
        RecordingCursor.statements.append(str(query))
        return super().executemany(query, params_seq, **kwargs)


def routed_by_full_key(sql: str) -> bool:
    """One profile, named by (project_id, distinct_id): a single-row INSERT or a key filter."""
    text = " ".join(sql.split())
    if re.search(r"\b(JOIN|UNION| OR |ANY\(| IN \(|SELECT .* FROM .* FROM)", text, re.I):
        return False
    insert = re.match(r"INSERT INTO (\w+) \(([^)]*)\) VALUES \(([^)]*)\)(.*)$", text)
    if insert:
        columns = [c.strip() for c in insert.group(2).split(",")]
        values = [v.strip() for v in insert.group(3).split(",")]
        rest = insert.group(4)
        return (
            columns[:2] == ["project_id", "distinct_id"]
            and values[:2] == ["%s", "%s"]
            and "VALUES" not in rest  # one row per statement
            and (not rest or rest.lstrip().startswith("ON CONFLICT (project_id, distinct_id)"))
        )
    return bool(KEY_FILTER.search(text))


def update(
    i: int, did: str, t: float, ops: dict, token: str = "tok", dedup: int | None = None
) -> Update:
    return Update(i, token, did, t, True, False, ops, received=time.time(), dedup=dedup)


def test_the_checker_refuses_multi_profile_statements() -> None:
    assert routed_by_full_key(
        "UPDATE profiles SET x = 1 WHERE project_id = %s AND distinct_id = %s"
    )
    assert not routed_by_full_key("UPDATE profiles SET x = 1 WHERE project_id = %s")
    assert not routed_by_full_key(
        "SELECT 1 FROM profiles WHERE project_id = %s AND distinct_id = ANY(%s)"
    )
    assert not routed_by_full_key(
        "INSERT INTO updates (project_id, distinct_id) VALUES (%s, %s), (%s, %s)"
    )
    assert not routed_by_full_key("INSERT INTO updates (time, project_id) VALUES (%s, %s)")
    assert not routed_by_full_key(
        "DELETE FROM updates WHERE project_id = %s AND distinct_id = %s OR time < %s"
    )


@pytest.fixture
def recording_store(postgres_url: str):
    store = PostgresStore(postgres_url, reorder_window=600.0)
    store.open()
    store._writer().cursor_factory = RecordingCursor
    RecordingCursor.statements = []
    try:
        yield store
    finally:
        store.close()


def test_every_write_path_statement_filters_on_the_full_key(recording_store: PostgresStore) -> None:
    now = time.time()
    store = recording_store
    groups = [
        # new profiles in two projects, several operations
        [
            [
                update(0, "a", now - 5000, {"$set": {"x": 1}}),
                update(1, "b", now - 5000, {"$add": {"n": 1}}),
            ],
            [update(0, "a", now - 4990, {"$append": {"l": 1}}, token="other")],
        ],
        # a late update (replay from the log), a retry, a removal on a missing profile
        [
            [update(0, "a", now - 5500, {"$set": {"y": 2}}, dedup=11)],
            [update(0, "c", now - 10, {"$remove": {"l": 1}})],
        ],
        [[update(0, "a", now - 5500, {"$set": {"y": 2}}, dedup=11)]],
        # beyond the window, then compaction as time moves on
        [[update(0, "a", now - 2000, {"$set": {"z": 3}})]],
        [[update(0, "a", now - 9000, {"$set": {"old": 1}})]],
        # a delete, and an update older than it (dropped)
        [
            [update(0, "b", now - 100, {"$delete": True})],
            [update(0, "b", now - 200, {"$set": {"q": 1}})],
        ],
    ]
    for group in groups:
        store.write_group(group, {("tok", "rejected"): 1})
    statements = RecordingCursor.statements
    assert statements, "nothing was recorded"
    on_profiles = [
        s for s in statements if re.search(r"\b(" + "|".join(PROFILE_TABLES) + r")\b", s)
    ]
    bad = [s for s in on_profiles if not routed_by_full_key(s)]
    assert bad == []
    # the workload reached every statement of the write path
    assert set(WRITE_PATH_SQL) - {DROP_PLACEHOLDER} <= set(statements)
    # what else the write path sends: the project lookup (reference table) and the per-node
    # counters (distributed by project_id), each naming its own key
    others = [s for s in statements if s not in on_profiles]
    for s in others:
        text = " ".join(s.split())
        assert re.search(r"\b(projects|stats)\b", text), text
        if "stats" in text:
            assert text.startswith("INSERT INTO stats (project_id,") and text.count("VALUES") == 1


def test_all_write_path_constants_pass_the_checker() -> None:
    for sql in WRITE_PATH_SQL:
        assert routed_by_full_key(sql), sql


def test_citus_layout_places_every_table(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        tables = {
            t
            for (t,) in conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
            )
        } - {"schema_migrations"}
        keyed = {
            t
            for (t,) in conn.execute(
                "SELECT table_name FROM information_schema.columns "
                "WHERE table_schema = 'public' AND column_name = 'distinct_id' "
                "AND table_name IN (SELECT table_name FROM information_schema.key_column_usage "
                "WHERE column_name = 'project_id')"
            )
        }
    layout = citus_sql()
    distributed = dict(re.findall(r"create_distributed_table\('(\w+)', '(\w+)'", layout))
    reference = set(re.findall(r"create_reference_table\('(\w+)'\)", layout))
    # profile tables are distributed by distinct_id (their primary key includes project_id)
    assert keyed == {"profiles", "updates"}
    assert {t: distributed.get(t) for t in keyed} == {t: "distinct_id" for t in keyed}
    # every table has exactly one place on Citus
    assert tables == set(distributed) | reference
    assert not set(distributed) & reference
