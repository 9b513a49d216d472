"""Profile rows written behind the journal (SQLite `write_behind`; store/writeback.py).

A group's transaction keeps its updates in the journal and writes profile rows later. What
that must never change: every acknowledged update is read back at once (the overlay for a
profile, a full write before a read that scans); a restart at any point (rows of some
profiles written, others not) replays the journal into exactly the rows a write-through
store writes; another store on the same file (a CLI import, a second server) never merges
onto rows that miss the journal's updates; a group that fails leaves nothing behind.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import apsw
import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from peoplebase.journal import JournalFormatError, decode_group, encode_group
from peoplebase.store import SqliteStore, StoreUnavailable
from peoplebase.store.overlay import Overlay
from peoplebase.store.sqlite_write import OverlayDelta
from peoplebase.types import Update
from tests.conftest import ServerProcess
from tests.test_merge import (
    IDS,
    TOKEN,
    arrivals,
    rec,
    records,
    reference,
    tied_times,
    to_updates,
)
from tests.test_writeback import Clock, open_sqlite, run, table_rows

_tokens = itertools.count()


def file_props(store: SqliteStore, token: str = TOKEN) -> dict[str, Any]:
    """The props column of every profile row, read straight from the file."""
    conn = apsw.Connection(store.path)
    try:
        return {
            str(did): props
            for did, props in conn.execute(
                "SELECT p.distinct_id, p.props FROM profiles p JOIN projects j "
                "ON j.id = p.project_id WHERE j.token = ?",
                (token,),
            )
        }
    finally:
        conn.close()


def journal_rows(path: str) -> int:
    conn = apsw.Connection(path)
    try:
        return int(conn.execute("SELECT count(*) FROM journal").fetchone()[0])  # type: ignore[index]
    finally:
        conn.close()


def read(store: SqliteStore, token: str = TOKEN) -> dict[str, Any]:
    project = store.project_by_token(token)
    assert project is not None
    return dict(store.get_profiles(project.id, list(IDS)))


def test_rows_are_written_behind_and_every_update_is_read_back(tmp_path: Path) -> None:
    store = open_sqlite(tmp_path / "p.db", write_behind=1.0)
    clock = Clock(0.0)
    store.clock = clock
    first = [rec(1, set={"p": 1}, did=did) for did in ("a", "b", "c")]
    second = [rec(2, add={"n": 5}), rec(2, did="b", set={"q": 1})]
    try:
        store.write_group(to_updates([first]))
        # acknowledged: durable in the journal; the rows are written within the interval
        assert journal_rows(store.path) == 1
        assert file_props(store) == {}
        clock.now += 0.4  # 0.4 of the interval: one row of the cycle's three (key order)
        store.write_group(to_updates([second]))
        assert journal_rows(store.path) == 2
        assert set(file_props(store)) == {"a"}
        # the row holds the state this group left, $add included: the overlay no longer needs it
        assert orjson.loads(file_props(store)["a"])["n"] == 5
        assert {key[1] for key in store.overlay._entries} == {"b", "c"}
        expected = reference([*first, *second])
        assert read(store) == expected
        # a read that scans makes every row current first
        project = store.project_by_token(TOKEN)
        assert project is not None
        total, rows = store.list_profiles(project.id, 10, 0)
        assert total == 3 and dict(rows) == expected
        assert journal_rows(store.path) == 0 and len(store.overlay) == 0
        assert {k: orjson.loads(v) for k, v in file_props(store).items()} == expected
    finally:
        store.close()


def test_a_restart_replays_the_journal(tmp_path: Path) -> None:
    arrived = [
        rec(5, set={"p": 1}, add={"n": 1}),
        rec(3, add={"n": 10}),  # late
        rec(6, did="b", union={"l": ["x"]}),
        rec(7, did="b", delete=True),
        rec(8, did="b", set={"q": 2}),
        rec(4, append={"l": 1}),  # late again
    ]
    crashed = open_sqlite(tmp_path / "p.db", write_behind=3600.0)
    for raw in arrived:
        crashed.write_group(to_updates([[raw]]))
    assert journal_rows(crashed.path) == len(arrived)
    # no close(): as after a crash, the rows were never written
    restarted = open_sqlite(tmp_path / "p.db")
    try:
        restarted.catch_up()
        assert journal_rows(restarted.path) == 0
        expected = reference(arrived)
        assert read(restarted) == {k: v for k, v in expected.items() if v is not None}
        plain = open_sqlite(tmp_path / "plain.db")
        run(plain, [[[raw]] for raw in arrived])
        assert table_rows(restarted, TOKEN) == table_rows(plain, TOKEN)
        plain.close()
    finally:
        restarted.close()


def test_any_crash_point_replays_into_the_same_rows(tmp_path: Path) -> None:
    """Rows written a few at a time (each group sees a third of the interval pass), then a
    crash after a random group: some rows hold the newest groups, others are older than the
    oldest journal row. The replay must skip exactly what each row holds already."""
    skipped_some: list[bool] = []

    @hypothesis_settings(max_examples=60, deadline=None)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        recs = data.draw(records(tied_times, max_size=16))
        groups = data.draw(arrivals(recs))
        name = f"case-{next(_tokens)}"
        crashed = open_sqlite(tmp_path / f"{name}.db", write_behind=1.0, clock=0.34)
        outcomes = run(crashed, groups)
        conn = apsw.Connection(crashed.path)
        oldest = conn.execute("SELECT min(id) FROM journal").fetchone()[0]  # type: ignore[index]
        newest_row = conn.execute("SELECT max(jid) FROM profiles").fetchone()[0]  # type: ignore[index]
        conn.close()
        skipped_some.append(oldest is not None and newest_row is not None and newest_row >= oldest)
        # no close(): the process is gone; the next one replays the journal
        restarted = open_sqlite(tmp_path / f"{name}.db")
        plain = open_sqlite(tmp_path / f"{name}-plain.db")
        try:
            assert run(plain, groups) == outcomes
            assert table_rows(restarted, TOKEN) == table_rows(plain, TOKEN)
        finally:
            restarted.close()
            plain.close()

    check()
    assert any(skipped_some)  # some rows held groups the journal still had: they were skipped


def test_a_write_through_store_on_the_same_file_catches_up_first(tmp_path: Path) -> None:
    # a server writing behind, and `peoplebase import` (write-through) on the same file
    server = open_sqlite(tmp_path / "p.db", write_behind=3600.0)
    cli = open_sqlite(tmp_path / "p.db")
    arrived = [
        rec(1, set={"p": 1}, add={"n": 1}),
        rec(2, add={"n": 10}),
        rec(3, add={"n": 100}, append={"l": "cli"}),
        rec(4, add={"n": 1000}, append={"l": "server"}),
        rec(0, did="b", set={"q": 0}),
    ]
    try:
        server.write_group(to_updates([[arrived[0]]]))
        server.write_group(to_updates([[arrived[1]]]))
        cli.write_group(to_updates([[arrived[2]]]))  # replays the server's journal first
        assert journal_rows(cli.path) == 0
        server.write_group(to_updates([[arrived[3]]]))  # drops what it held, reads the file
        cli.write_group(to_updates([[arrived[4]]]))
        expected = {k: v for k, v in reference(arrived).items() if v is not None}
        assert read(server) == expected
        cli.fresh()
        assert read(cli) == expected
        assert read(server)["a"]["n"] == 1111
    finally:
        server.close()
        cli.close()


def test_a_reader_store_on_the_same_file_sees_the_journal(tmp_path: Path) -> None:
    # `peoplebase profiles get` or `export` while a server runs
    server = open_sqlite(tmp_path / "p.db", write_behind=3600.0)
    try:
        server.write_group(to_updates([[rec(1, set={"p": 1})]]))
        reader = open_sqlite(tmp_path / "p.db")
        reader.fresh()
        assert read(reader)["a"]["p"] == 1
        server.write_group(to_updates([[rec(2, set={"p": 2})]]))
        project = reader.project_by_token(TOKEN)
        assert project is not None
        # one profile: no overlay here, the row is behind...
        assert reader.get_profiles(project.id, ["a"])[0][1]["p"] == 1
        reader.fresh()  # ...until the reader asks for every row
        assert reader.get_profiles(project.id, ["a"])[0][1]["p"] == 2
        server.write_group(to_updates([[rec(3, set={"p": 3})]]))
        # several profiles are read after every row is written: what the server holds too
        assert read(reader)["a"]["p"] == 3
        server.write_group(to_updates([[rec(4, add={"n": 1})]]))
        assert read(server)["a"] == reference(
            [rec(1, set={"p": 1}), rec(2, set={"p": 2}), rec(3, set={"p": 3}), rec(4, add={"n": 1})]
        )["a"]
        reader.close()
    finally:
        server.close()


def test_a_failed_group_leaves_nothing_behind(tmp_path: Path) -> None:
    store = open_sqlite(tmp_path / "p.db", write_behind=3600.0)
    try:
        store.write_group(to_updates([[rec(2, add={"n": 1}), rec(2, did="b", set={"x": 1})]]))
        conn = store._writer()
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON journal "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        with pytest.raises((apsw.Error, StoreUnavailable)):
            store.write_group(to_updates([[rec(1, add={"n": 1000}), rec(3, did="b", set={"x": 3})]]))
        conn.execute("DROP TRIGGER refuse")
        # the failed group's changes were in the held states: they are gone, the journal's kept
        store.write_group(to_updates([[rec(9, add={"n": 10})]]))
        assert read(store)["a"]["n"] == 11
        assert read(store)["b"]["x"] == 1
        assert store.pipeline.replayed >= 1
    finally:
        store.close()


def test_close_writes_every_row(tmp_path: Path) -> None:
    store = open_sqlite(tmp_path / "p.db", write_behind=3600.0)
    store.write_group(to_updates([[rec(1, set={"p": 1}), rec(1, did="c", set={"p": 3})]]))
    store.close()
    assert journal_rows(store.path) == 0
    assert set(file_props(store)) == {"a", "c"}


def test_idle_writes_what_is_due(tmp_path: Path) -> None:
    store = open_sqlite(tmp_path / "p.db", write_behind=1.0)
    clock = Clock(0.0)
    store.clock = clock
    try:
        store.write_group(to_updates([[rec(1, set={"p": 1}, did=did) for did in IDS]]))
        assert file_props(store) == {}  # the cycle starts: nothing due yet
        clock.now += 0.7  # no group comes; the writer's idle call writes what is due
        store.idle()
        assert set(file_props(store)) == {"a", "b"}
        assert {key[1] for key in store.overlay._entries} == {"c"}
        clock.now += 1.0
        store.idle()  # the cycle ends: every row written, the journal emptied
        assert set(file_props(store)) == {"a", "b", "c"}
        assert journal_rows(store.path) == 0 and len(store.overlay) == 0
        assert store.idle() is None  # nothing left to do
    finally:
        store.close()


# --- the overlay --------------------------------------------------------------------------------


def test_overlay_takes_changes_then_drops_what_rows_hold() -> None:
    overlay = Overlay()
    overlay.apply(OverlayDelta(changed=[((1, "a"), 10, '{"p":1}'), ((1, "b"), 10, None)]))
    assert overlay.get((1, "a")) == (10, '{"p":1}') and overlay.get((1, "b")) == (10, None)
    # a row written with an older state than the overlay's does not drop it
    overlay.apply(OverlayDelta(changed=[((1, "a"), 12, '{"p":2}')], written=[((1, "a"), 10)]))
    assert overlay.get((1, "a")) == (12, '{"p":2}')
    overlay.apply(OverlayDelta(written=[((1, "a"), 12)]))
    assert overlay.get((1, "a")) is None and len(overlay) == 1
    overlay.apply(OverlayDelta(changed=[((1, "c"), 13, "{}")], reset=True))
    assert overlay.get((1, "b")) is None and overlay.get((1, "c")) == (13, "{}")
    overlay.enabled = False
    overlay.apply(OverlayDelta(changed=[((1, "d"), 14, "{}")]))
    assert overlay.get((1, "d")) is None


# --- the journal's encoding ---------------------------------------------------------------------


def test_a_group_survives_the_journal_exactly() -> None:
    @hypothesis_settings(max_examples=150, deadline=None)
    @given(records(tied_times, max_size=8), st.data())
    def check(recs: list[dict[str, Any]], data: st.DataObject) -> None:
        groups = data.draw(arrivals(recs))
        for group in groups:
            requests = to_updates(group)
            for updates in requests:
                for u in updates:
                    if data.draw(st.booleans()):
                        u.geo = {"$city": "Paris", "$country_code": "FR"}
                    u.received = u.time + 0.25
            decoded = decode_group(encode_group(requests))
            fields = [[_fields(u) for u in updates] for updates in requests]
            assert [[_fields(u) for u in updates] for updates in decoded] == fields

    check()


def _fields(u: Update) -> tuple[Any, ...]:
    return (
        u.index,
        u.token,
        u.distinct_id,
        u.time,
        type(u.time),
        u.explicit_time,
        u.ignore_time,
        u.ops,
        u.received,
        u.geo,
        u.dedup,
        u.clamped,
    )


def test_bytes_that_are_not_a_group_are_refused() -> None:
    for body in (b"", b"[2, []]", b"{}", b"[1]"):
        with pytest.raises(JournalFormatError):
            decode_group(body)


# --- through a server ---------------------------------------------------------------------------


def post(server: ServerProcess, *records: dict[str, Any]) -> None:
    r = httpx.post(server.url + "/engage?verbose=1", json=list(records), timeout=30)
    assert r.json() == {"status": 1, "error": None}, r.text


def file_row(path: Path, did: str) -> dict[str, Any] | None:
    conn = apsw.Connection(str(path))
    try:
        row = conn.execute("SELECT props FROM profiles WHERE distinct_id = ?", (did,)).fetchone()
        return orjson.loads(row[0]) if row is not None and row[0] is not None else None
    finally:
        conn.close()


@pytest.mark.e2e
@pytest.mark.parametrize("writer", ["process", "thread"])
def test_a_server_reads_back_what_its_rows_do_not_hold_yet(tmp_path: Path, writer: str) -> None:
    db = tmp_path / "wb.db"
    server = ServerProcess(db, "--tokens", "open", "--writer", writer, "--write-behind", "3600")
    server.start()
    try:
        for n in range(3):
            post(server, {"$token": "wb", "$distinct_id": "a", "$set": {"n": n}, "$add": {"k": 1}})
        post(server, {"$token": "wb", "$distinct_id": "b", "$set": {"n": 7}})
        assert file_row(db, "a") is None  # acknowledged, in the journal only
        assert journal_rows(str(db)) >= 1
        # one profile: the newest acknowledged state, from the overlay the writer feeds
        props = server.query("wb", distinct_id="a")["results"][0]["$properties"]
        assert (props["n"], props["k"]) == (2, 3)
        # a where query scans rows: the writer writes them all first
        body = server.query("wb", where='properties["n"] == 2')
        assert [r["$distinct_id"] for r in body["results"]] == ["a"]
        assert file_row(db, "a") == props and file_row(db, "b") is not None
        assert journal_rows(str(db)) == 0
        # and after more updates, export too sees them
        post(server, {"$token": "wb", "$distinct_id": "b", "$add": {"k": 5}})
        secret = server.secret("wb")
        r = httpx.get(server.url + "/api/query/export", auth=(secret, ""), timeout=30)
        exported = {line["$distinct_id"]: line["$properties"] for line in map(orjson.loads, r.text.splitlines())}
        assert exported["b"]["k"] == 5 and exported["a"] == props
    finally:
        assert server.stop() == 0
    assert journal_rows(str(db)) == 0  # a clean stop writes every row


@pytest.mark.e2e
def test_an_idle_server_writes_its_rows_within_the_interval(tmp_path: Path) -> None:
    db = tmp_path / "idle.db"
    server = ServerProcess(db, "--tokens", "open", "--write-behind", "0.3").start()
    try:
        post(server, *({"$token": "i", "$distinct_id": f"u{i}", "$set": {"n": i}} for i in range(20)))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if journal_rows(str(db)) == 0 and file_row(db, "u19") == {"n": 19, "$last_seen": ANY}:
                break
            time.sleep(0.05)
        assert journal_rows(str(db)) == 0
        assert all(file_row(db, f"u{i}") is not None for i in range(20))
    finally:
        assert server.stop() == 0
