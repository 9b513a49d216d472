"""SPEC behaviours checked end to end through the app (real SQLite file, real writer thread).

Each test names the SPEC section it checks.
"""

from __future__ import annotations

import io
import os
import struct
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from peoplebase.app import PeoplebaseApp
from peoplebase.importer import import_lines
from peoplebase.settings import Settings
from peoplebase.store.sqlite import SqliteStore
from tests.conftest import AppClient

TOKEN = "tok-gaps"
DAY = 86400.0


def rec(did: str, **fields: Any) -> dict[str, Any]:
    return {"$token": TOKEN, "$distinct_id": did, **fields}


def profile(client: AppClient, did: str) -> dict[str, Any] | None:
    store = client.app.store
    project = store.project_by_token(TOKEN)
    assert project is not None
    rows = store.get_profiles(project.id, [did])
    return rows[0][1] if rows else None


def last_seen(t: float) -> str:
    return datetime.fromtimestamp(int(t), UTC).strftime("%Y-%m-%dT%H:%M:%S")


async def send(client: AppClient, *records: dict[str, Any]) -> str:
    r = await client.http.post("/engage", json=list(records))
    assert r.status_code == 200
    return r.text


def counted(client: AppClient, name: str) -> int:
    store = client.app.store
    project = store.project_by_token(TOKEN)
    assert project is not None
    return sum(n for _, what, n in store.stats(project.id, 0.0, 3600) if what == name)


# --- §7 img=1 -----------------------------------------------------------------------------------


async def test_img_is_a_one_by_one_transparent_gif(client: AppClient) -> None:
    """§7: `img=1`: a 1×1 transparent GIF."""
    r = await client.http.get(
        "/engage",
        params={"img": "1", "data": orjson.dumps(rec("g", **{"$set": {"a": 1}})).decode()},
    )
    gif = r.content
    assert gif[:6] in (b"GIF89a", b"GIF87a")
    width, height = struct.unpack("<HH", gif[6:10])
    assert (width, height) == (1, 1)
    # transparency lives in a Graphic Control Extension (0x21 0xF9) with its flag bit set
    gce = gif.find(b"\x21\xf9\x04")
    assert gce > 0, "no graphic control extension: the pixel is not transparent"
    assert gif[gce + 3] & 0x01, "transparency flag not set"
    assert gif.endswith(b"\x3b")  # GIF trailer


# --- §7 durability --------------------------------------------------------------------------------


async def test_default_sqlite_commits_with_synchronous_full(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """§7: a 200/`1` means committed and fsync'd (`synchronous=FULL`) unless opted out. The
    write connection commits with NORMAL and the store fsyncs the WAL itself after the
    COMMIT, before the answer (store/sqlite_write.py, Committer). With the writer thread, so
    that the commit happens in this process, where os.fsync is watched."""
    assert Settings().synchronous == "full"  # the default
    app = PeoplebaseApp(Settings(db=str(tmp_path / "d.db"), tokens="open", writer="thread"))
    app.startup()
    client = AppClient(app)
    try:
        store = app.store
        assert isinstance(store, SqliteStore)
        assert store.synchronous == "FULL"
        assert await send(client, rec("warm", **{"$set": {"a": 0}})) == "1"
        events: list[str] = []
        real_fsync = os.fsync
        wal = os.stat(store.path + "-wal").st_ino

        def fsync(fd: int) -> None:
            real_fsync(fd)
            if os.fstat(fd).st_ino == wal:
                events.append("fsync")

        def on_commit() -> bool:
            events.append("commit")
            return False

        monkeypatch.setattr(os, "fsync", fsync)
        store._writer().set_commit_hook(on_commit)
        assert await send(client, rec("d", **{"$set": {"a": 1}})) == "1"
        events.append("answered")
        # the group's COMMIT, then the WAL's fsync, and only then the answer
        assert events[events.index("commit") :] == ["commit", "fsync", "answered"]
    finally:
        await client.http.aclose()
        app.shutdown()


# --- §4 reorder window (default 7 days) and its counts ---------------------------------------------


async def test_default_reorder_window_is_seven_days(client: AppClient) -> None:
    """§4: the reorder window defaults to 7 days; older updates are applied on top, recorded with
    the newest `$time`, and counted."""
    newest = time.time() - 60
    assert await send(client, rec("w", **{"$time": newest, "$set": {"v": "newest"}})) == "1"
    # 6 days older: inside the window, so it sorts before the newest update and loses
    assert (
        await send(client, rec("w", **{"$time": newest - 6 * DAY, "$set": {"v": "six", "six": 1}}))
        == "1"
    )
    assert profile(client, "w") == {"v": "newest", "six": 1, "$last_seen": last_seen(newest)}
    assert counted(client, "beyond window") == 0
    # 8 days older: beyond the window, applied on top; $last_seen does not go backwards
    assert (
        await send(client, rec("w", **{"$time": newest - 8 * DAY, "$set": {"v": "eight"}})) == "1"
    )
    assert profile(client, "w") == {"v": "eight", "six": 1, "$last_seen": last_seen(newest)}
    assert counted(client, "beyond window") == 1


# --- §4 deletion is final for the past, and counted ---------------------------------------------------


async def test_update_older_than_a_delete_is_dropped_and_counted(client: AppClient) -> None:
    """§4: any update arriving later with `$time` ≤ t is dropped and counted, whatever the window."""
    t = time.time() - 3600
    await send(client, rec("x", **{"$time": t - 100, "$set": {"a": 1}}))
    await send(client, rec("x", **{"$time": t, "$delete": ""}))
    assert profile(client, "x") is None
    await send(client, rec("x", **{"$time": t - 10, "$set": {"b": 2}}))
    await send(client, rec("x", **{"$time": t - 30 * DAY, "$set": {"c": 3}}))  # beyond the window
    assert profile(client, "x") is None
    assert counted(client, "dropped") == 2
    await send(client, rec("x", **{"$time": t + 1, "$set": {"d": 4}}))
    assert profile(client, "x") == {"d": 4, "$last_seen": last_seen(t + 1)}


# --- §4 retries over HTTP ---------------------------------------------------------------------------


async def test_retry_in_a_later_request_counts_as_valid_and_changes_nothing(
    client: AppClient,
) -> None:
    """§4 + §7: a retry counts as valid (answer `1`) and changes nothing; a repeat within one
    request is applied."""
    t = time.time() - 60
    once = rec("r", **{"$time": t, "$add": {"n": 1}})
    assert await send(client, once, once) == "1"
    assert profile(client, "r") == {"n": 2, "$last_seen": last_seen(t)}
    assert await send(client, once) == "1"
    r = await client.http.post("/engage?verbose=1", json=[once])
    assert r.json() == {"status": 1, "error": None}
    assert profile(client, "r") == {"n": 2, "$last_seen": last_seen(t)}


# --- §2 numeric $distinct_id ----------------------------------------------------------------------


async def test_numeric_distinct_id_is_queried_as_its_string_form(client: AppClient) -> None:
    """§2: `$distinct_id` … or a number stored as its string form."""
    assert await send(client, {"$token": TOKEN, "$distinct_id": 12345, "$set": {"a": 1}}) == "1"
    r = await client.http.post(
        "/api/query/engage", data={"distinct_id": "12345"}, headers=client.auth(TOKEN)
    )
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["$distinct_id"] for x in results] == ["12345"]


# --- §9 import: $time is the line's $last_seen ----------------------------------------------------


async def test_import_time_is_the_lines_last_seen(client: AppClient) -> None:
    """§9: an imported line is a `$set` at its `$last_seen` (else the import time), with
    `$ignore_time`: it sorts before newer updates and keeps its `$last_seen` as given."""
    recent = time.time() - 3600
    await send(client, rec("old", **{"$time": recent, "$set": {"plan": "live"}}))
    await send(client, rec("new", **{"$time": recent, "$set": {"plan": "live"}}))
    two_days_ago = last_seen(recent - 2 * DAY)
    lines = [
        {
            "$distinct_id": "old",
            "$properties": {"plan": "exported", "x": 1, "$last_seen": two_days_ago},
        },
        {"$distinct_id": "new", "$properties": {"plan": "exported", "x": 1}},  # no $last_seen
    ]
    rejected = io.BytesIO()
    summary = import_lines(
        client.app.store, TOKEN, [orjson.dumps(line) for line in lines], rejected
    )
    assert (summary.accepted, summary.rejected) == (2, 0), rejected.getvalue()
    # older than the live update: the live value wins, and $last_seen stays the live one
    assert profile(client, "old") == {"plan": "live", "x": 1, "$last_seen": last_seen(recent)}
    # no $last_seen: the import time, newer than the live update, so the export wins; with
    # $ignore_time the import does not move $last_seen
    assert profile(client, "new") == {"plan": "exported", "x": 1, "$last_seen": last_seen(recent)}


# --- max_log_entries, end to end (server, writer process, SQLite) -------------------------------


async def test_max_log_entries_reaches_the_writer(settings: Settings) -> None:
    """With the limit set, an update older than the log's cut is applied on top and counted
    beyond the window, through the app and its writer process (the default)."""
    app = PeoplebaseApp(settings.replace(max_log_entries=4))
    assert app.write_process is not None
    app.startup()
    client = AppClient(app)
    try:
        t0 = time.time() - 3600
        for i in range(8):
            await send(client, rec("c", **{"$time": t0 + i, "$set": {"v": i}}))
        assert profile(client, "c") == {"v": 7, "$last_seen": last_seen(t0 + 7)}
        # older than the cut (inside the 7-day window): applied on top, not put in its place
        await send(client, rec("c", **{"$time": t0 + 0.5, "$set": {"v": "old"}}))
        assert profile(client, "c") == {"v": "old", "$last_seen": last_seen(t0 + 7)}
        assert counted(client, "beyond window") == 1
    finally:
        await client.http.aclose()
        app.shutdown()
