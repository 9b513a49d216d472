"""The PostgreSQL store on a real server: migrations, the same answers as SQLite, several writers."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import psycopg
import pytest

from peoplebase.merge import MemoryBackend, Merger
from peoplebase.store import open_store
from peoplebase.store.base import StoreUnavailable, UnknownProject
from peoplebase.store.postgres import PostgresStore, migrations
from peoplebase.store.sqlite import SqliteStore
from peoplebase.types import Update

from .conftest import PostgresDatabases, pg_url

NOW = time.time()


def update(
    index: int, did: str, t: float, ops: dict, token: str = "tok", dedup: int | None = None
) -> Update:
    return Update(index, token, did, t, True, False, ops, received=NOW, dedup=dedup)


@pytest.fixture
def store(postgres_url: str):
    s = PostgresStore(postgres_url)
    s.open()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def empty_url(postgres_databases: PostgresDatabases):
    """A database with no schema at all (not cloned from the template)."""
    name = postgres_databases.prefix + "empty_" + str(random.randrange(10**9))
    postgres_databases.admin.execute(f'CREATE DATABASE "{name}"')
    return pg_url(name)


def test_open_store_picks_postgres_for_urls(postgres_url: str, tmp_path: Path) -> None:
    assert isinstance(open_store(postgres_url), PostgresStore)
    assert isinstance(
        open_store(postgres_url.replace("postgresql://", "postgres://")), PostgresStore
    )
    assert isinstance(open_store(str(tmp_path / "x.db")), SqliteStore)


def test_unmigrated_database_is_refused_until_migrate(empty_url: str) -> None:
    s = PostgresStore(empty_url)
    with pytest.raises(StoreUnavailable, match="schema version 0.*peoplebase migrate"):
        s.open()
    latest = migrations()[-1][0]
    assert s.migrate() == latest
    assert s.migrate() == latest  # idempotent
    s.open()
    assert s.schema_version() == latest
    s.close()


def test_concurrent_migrations_apply_each_version_once(empty_url: str) -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(PostgresStore(empty_url).migrate())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    latest = migrations()[-1][0]
    assert results == [latest] * 3
    with psycopg.connect(empty_url) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == [v for v, _ in migrations()]


def test_migration_4_counts_every_profiles_log(empty_url: str) -> None:
    # A database at version 3 has no log_n: migration 0004 counts each profile's log rows.
    s = PostgresStore(empty_url, synchronous="normal")
    s.migrate()
    s.open()
    try:
        for did, n in {"a": 5, "b": 1}.items():
            for t in range(n):
                s.write_group([[update(0, did, 1_700_000_000 + t, {"$set": {"p": t}})]])
    finally:
        s.close()
    with psycopg.connect(empty_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE profiles DROP COLUMN log_n, DROP COLUMN log_floor")
        conn.execute("DELETE FROM schema_migrations WHERE version >= 4")
    again = PostgresStore(empty_url, synchronous="normal", max_log_entries=4)
    assert again.migrate() == migrations()[-1][0]
    again.open()
    try:
        with psycopg.connect(empty_url) as conn:
            counted = dict(conn.execute("SELECT distinct_id, log_n FROM profiles").fetchall())
        assert counted == {"a": 5, "b": 1}
        # the counts drive the limit from the first write on: a's log is cut to 3 entries
        again.write_group([[update(0, "a", 1_700_000_100, {"$set": {"p": 100}})]])
        project = again.project_by_token("tok")
        assert project is not None
        times = [e["time"] for e in again.profile_history(project.id, "a")]
        assert sorted(times) == [1_700_000_003, 1_700_000_004, 1_700_000_100]
    finally:
        again.close()


def test_newer_schema_is_refused(store: PostgresStore, postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version) VALUES (9999)")
    with pytest.raises(StoreUnavailable, match="newer than this Peoplebase"):
        PostgresStore(postgres_url).open()


def test_unreachable_server_is_store_unavailable() -> None:
    s = PostgresStore("postgresql://postgres@127.0.0.1:1/nothing?connect_timeout=2")
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        s.open()
    with pytest.raises(StoreUnavailable):
        s.write_group([[update(0, "a", NOW, {"$set": {"a": 1}})]])


def test_projects(store: PostgresStore) -> None:
    project, secret = store.create_project("t1", "One")
    assert project.token == "t1" and project.name == "One"
    with pytest.raises(ValueError, match="already exists"):
        store.create_project("t1")
    assert store.project_by_secret(secret) == project
    rotated, new = store.rotate_secret("t1")
    assert rotated == project and new != secret
    assert store.project_by_secret(secret) is None
    assert store.project_by_secret(new) == project
    assert store.project_by_id(project.id) == project
    assert store.list_projects() == [project]
    with pytest.raises(UnknownProject):
        store.rotate_secret("nope")


def test_closed_tokens_do_not_create_projects(postgres_url: str) -> None:
    s = PostgresStore(postgres_url, open_tokens=False)
    s.open()
    s.write_group([[update(0, "a", NOW, {"$set": {"a": 1}}, token="unknown")]])
    assert s.list_projects() == []
    s.close()


def _workload(seed: int) -> list[list[Update]]:
    """Groups of requests over a few profiles, with shuffled times, deletes and retries."""
    rng = random.Random(seed)
    ids = ["a", "b", "Zed", "é-user", "日本", "a b"]
    requests: list[list[Update]] = []
    for r in range(30):
        batch = []
        for i in range(rng.randint(1, 6)):
            did = rng.choice(ids)
            t = NOW - rng.randint(0, 20_000)
            kind = rng.random()
            if kind < 0.05:
                ops: dict = {"$delete": True}
            elif kind < 0.1:
                ops = {"$unset": ["x"]}
            else:
                ops = {
                    "$set": {"x": r * 10 + i},
                    "$append": {"log": r * 10 + i},
                    "$add": {"n": 1},
                    "$set_once": {"first": r * 10 + i},
                }
            batch.append(update(i, did, t, ops, dedup=rng.randrange(3) if kind > 0.9 else None))
        requests.append(batch)
    return requests


def _copy(requests: list[list[Update]]) -> list[list[Update]]:
    return [
        [update(u.index, u.distinct_id, u.time, dict(u.ops), u.token, u.dedup) for u in batch]
        for batch in requests
    ]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_answers_as_sqlite_and_the_reference(
    store: PostgresStore, tmp_path: Path, seed: int
) -> None:
    requests = _workload(seed)
    lite = SqliteStore(str(tmp_path / "lite.db"), reorder_window=3600.0)
    lite.open()
    store.merger.window = 3600.0  # small window: compaction and beyond-window updates happen
    reference = MemoryBackend()
    merger = Merger(3600.0)
    groups = [requests[i : i + 4] for i in range(0, len(requests), 4)]
    for group in groups:
        got = store.write_group(_copy(group))
        want = lite.write_group(_copy(group))
        merger.apply(reference, _copy(group))
        assert got == want
    pg_project = store.project_by_token("tok")
    lite_project = lite.project_by_token("tok")
    assert pg_project is not None and lite_project is not None
    ids = ["a", "b", "Zed", "é-user", "日本", "a b", "missing"]
    assert store.get_profiles(pg_project.id, ids) == lite.get_profiles(lite_project.id, ids)
    total, rows = store.list_profiles(pg_project.id, 100, 0)
    assert (total, rows) == lite.list_profiles(lite_project.id, 100, 0)
    assert [did for did, _ in rows] == sorted(did for did, _ in rows)  # byte order, as SQLite
    assert store.list_profiles(pg_project.id, 2, 1) == lite.list_profiles(lite_project.id, 2, 1)
    for did in ids:
        # arrival numbers are per profile on PostgreSQL, global on SQLite: same order, other values
        pg_log = [
            {k: v for k, v in e.items() if k != "seq"}
            for e in store.profile_history(pg_project.id, did)
        ]
        lite_log = [
            {k: v for k, v in e.items() if k != "seq"}
            for e in lite.profile_history(lite_project.id, did)
        ]
        assert pg_log == lite_log
        assert dict(store.get_profiles(pg_project.id, [did])).get(did) == reference.profile(
            "tok", did
        )
    lite.close()


def test_arrival_order_breaks_ties_across_groups_and_stores(postgres_url: str) -> None:
    """Two stores (two nodes) on one database: equal $time keeps commit (arrival) order."""
    one, two = PostgresStore(postgres_url), PostgresStore(postgres_url)
    one.open()
    two.open()
    t = NOW - 100
    one.write_group([[update(0, "p", t, {"$set": {"v": "first"}})]])
    two.write_group([[update(0, "p", t, {"$set": {"v": "second"}})]])
    # a late update forces a replay from the log: the tie must still resolve the same way
    one.write_group([[update(0, "p", t - 50, {"$set": {"w": 1}})]])
    pid = one.project_by_token("tok").id  # type: ignore[union-attr]
    assert one.get_profiles(pid, ["p"])[0][1]["v"] == "second"
    seqs = [e["seq"] for e in one.profile_history(pid, "p")]
    assert seqs[1] < seqs[2] and len(set(seqs)) == 3
    one.close()
    two.close()


def test_concurrent_writers_lose_nothing(postgres_url: str) -> None:
    """Four stores writing to the same profiles at once: every update applied exactly once."""
    stores = [PostgresStore(postgres_url) for _ in range(4)]
    for s in stores:
        s.open()
    per_writer = 40
    errors: list[BaseException] = []

    def run(w: int, s: PostgresStore) -> None:
        try:
            for i in range(per_writer):
                keys = ["k1", "k2", "k3"] if i % 2 else ["k3", "k2", "k1"]
                s.write_group(
                    [
                        [
                            update(
                                j,
                                k,
                                NOW - 1000 + w * per_writer + i,
                                {"$add": {"n": 1}, "$append": {"l": [w, i]}},
                            )
                            for j, k in enumerate(keys)
                        ]
                    ]
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w, s)) for w, s in enumerate(stores)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    pid = stores[0].project_by_token("tok").id  # type: ignore[union-attr]
    for did, props in stores[0].get_profiles(pid, ["k1", "k2", "k3"]):
        assert props["n"] == 4 * per_writer, did
        expected = [[w, i] for w in range(4) for i in range(per_writer)]  # $time order
        assert props["l"] == expected, did
    assert len(stores[0].list_projects()) == 1  # one project, created once, across writers
    for s in stores:
        s.close()


def test_normal_durability_turns_off_synchronous_commit(postgres_url: str) -> None:
    fast = PostgresStore(postgres_url, synchronous="normal")
    fast.open()
    assert fast._writer().execute("SHOW synchronous_commit").fetchone() == ("off",)
    full = PostgresStore(postgres_url)
    full.open()
    assert full._writer().execute("SHOW synchronous_commit").fetchone() == ("on",)
    fast.close()
    full.close()


def test_migrate_command_and_profiles_on_postgres(empty_url: str) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "peoplebase", *args, "--db", empty_url],
            capture_output=True,
            text=True,
        )

    refused = cli("projects", "list")
    assert refused.returncode != 0 and "peoplebase migrate" in refused.stderr
    done = cli("migrate")
    assert done.returncode == 0, done.stderr
    assert f"schema version {migrations()[-1][0]}" in done.stdout
    assert cli("projects", "create", "--token", "t").returncode == 0
    assert "t" in cli("projects", "list").stdout
