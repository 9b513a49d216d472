"""The limits of SPEC §6 over HTTP: the right status and body, and nothing applied on refusal.

Small limits are set through Settings where a setting exists, so the tests stay fast; the
fixed limits (string and name lengths, list size, nesting) are tested at their real values.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from peoplebase.app import PeoplebaseApp
from peoplebase.settings import Settings
from tests.conftest import AppClient

pytestmark = pytest.mark.all_backends  # every test on SQLite and on PostgreSQL

TOKEN = "tok-limits"
TOO_LARGE_STATUS = "Request Entity Too Large"


def record(did: str, **ops: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"$token": TOKEN, "$distinct_id": did}
    body.update({"$" + k: v for k, v in ops.items()} or {"$set": {"plan": "pro"}})
    return body


def stored(client: AppClient, did: str) -> dict[str, Any] | None:
    project = client.app.store.project_by_token(TOKEN)
    if project is None:
        return None
    rows = client.app.store.get_profiles(project.id, [did])
    return rows[0][1] if rows else None


def user_props(client: AppClient, did: str) -> dict[str, Any] | None:
    props = stored(client, did)
    return None if props is None else {k: v for k, v in props.items() if k != "$last_seen"}


def nothing_stored(client: AppClient) -> bool:
    store = client.app.store
    return all(store.list_profiles(p.id, 1, 0)[0] == 0 for p in store.list_projects())


@asynccontextmanager
async def app_client(db_url: str, **changes: Any) -> AsyncIterator[AppClient]:
    """A client of an app with changed limits, on this test's database (`db_url` fixture)."""
    app = PeoplebaseApp(Settings(db=db_url, tokens="open", **changes))
    app.startup()
    c = AppClient(app)
    try:
        yield c
    finally:
        await c.http.aclose()
        app.shutdown()


def too_large_body(limit: int) -> dict[str, Any]:
    return {
        "code": 413,
        "error": f"request exceeds max limit of {limit} bytes",
        "status": TOO_LARGE_STATUS,
    }


# --- request body size ----------------------------------------------------------------------


async def test_body_at_the_limit_is_accepted(db_url: str) -> None:
    async with app_client(db_url, max_body_bytes=1000) as c:
        body = json.dumps([record("edge")]).encode()
        body += b" " * (1000 - len(body))
        assert len(body) == 1000
        r = await c.http.post("/engage", content=body)
        assert (r.status_code, r.text) == (200, "1")
        assert user_props(c, "edge") == {"plan": "pro"}


@pytest.mark.parametrize("params", ["", "?verbose=1", "?strict=1", "?callback=cb"])
async def test_body_over_the_limit_is_413(db_url: str, params: str) -> None:
    async with app_client(db_url, max_body_bytes=1000) as c:
        body = json.dumps([record("big")]).encode()
        body += b" " * (1001 - len(body))
        r = await c.http.post("/engage" + params, content=body)
        assert r.status_code == 413
        assert r.headers["content-type"] == "application/json"
        assert r.json() == too_large_body(1000)
        assert nothing_stored(c)


async def test_streamed_body_is_not_read_past_the_limit(db_url: str) -> None:
    """A chunked body with no Content-Length: reading stops at the chunk crossing the limit."""
    chunk = b" " * 100
    sent = 0

    async def stream() -> AsyncIterator[bytes]:
        nonlocal sent
        yield json.dumps([record("streamed")]).encode()
        for _ in range(1000):  # 100 KB in all, far past the limit
            sent += len(chunk)
            yield chunk

    async with app_client(db_url, max_body_bytes=1000) as c:
        r = await c.http.post("/engage", content=stream())
        assert r.status_code == 413
        assert r.json() == too_large_body(1000)
        assert sent <= 1000 + len(chunk)
        assert nothing_stored(c)


async def test_declared_content_length_over_the_limit_reads_nothing(db_url: str) -> None:
    """With Content-Length over the limit the body is refused before any of it is read."""
    async with app_client(db_url, max_body_bytes=1000) as c:
        reads = 0
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            nonlocal reads
            reads += 1
            return {"type": "http.request", "body": b" " * 5000, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/engage",
            "query_string": b"",
            "headers": [(b"content-length", b"5000"), (b"content-type", b"application/json")],
            "client": ("203.0.113.9", 5555),
        }
        await c.app(scope, receive, send)
        assert sent[0]["status"] == 413
        assert json.loads(sent[1]["body"]) == too_large_body(1000)
        assert reads == 0


@pytest.mark.parametrize("limit", [1000, 10 * 1024 * 1024])
async def test_gzip_bomb_is_413(db_url: str, limit: int) -> None:
    payload = json.dumps([record("bomb", set={"pad": "x"})]).encode()
    inflated = payload[:-1] + b" " * (limit * 2) + b"]"
    compressed = gzip.compress(inflated, compresslevel=9)
    assert len(compressed) < limit  # small on the wire, too big once inflated
    kwargs = {} if limit == 10 * 1024 * 1024 else {"max_body_bytes": limit}
    async with app_client(db_url, **kwargs) as c:
        r = await c.http.post(
            "/engage",
            content=compressed,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )
        assert r.status_code == 413
        assert r.json() == too_large_body(limit)
        assert nothing_stored(c)


async def test_gzip_under_the_limit_once_inflated_is_accepted(db_url: str) -> None:
    async with app_client(db_url, max_body_bytes=1000) as c:
        body = json.dumps([record("gz")]).encode()
        r = await c.http.post(
            "/engage", content=gzip.compress(body), headers={"Content-Encoding": "gzip"}
        )
        assert r.text == "1"
        assert user_props(c, "gz") == {"plan": "pro"}


async def test_event_endpoint_body_over_the_limit_is_413(db_url: str) -> None:
    async with app_client(db_url, max_body_bytes=1000) as c:
        r = await c.http.post("/track", content=b"data=" + b"x" * 2000)
        assert r.status_code == 413
        assert r.json() == too_large_body(1000)


# --- records per request --------------------------------------------------------------------


@pytest.mark.parametrize("params", ["", "?verbose=1", "?strict=1", "?callback=cb", "?img=1"])
async def test_too_many_records_is_400_and_nothing_applied(db_url: str, params: str) -> None:
    async with app_client(db_url, max_records=5) as c:
        recs = [record(f"r{i}") for i in range(6)]
        r = await c.http.post("/engage" + params, json=recs)
        assert r.status_code == 400
        body = r.json()
        assert set(body) == {"code", "error", "status"}
        assert body["code"] == 400
        assert body["status"] == "Bad Request"
        assert "6" in body["error"] and "5" in body["error"]
        assert nothing_stored(c)
        r = await c.http.post("/engage" + params, json=recs[:5])
        assert r.status_code == 200
        assert user_props(c, "r4") == {"plan": "pro"}


async def test_default_record_limit_is_2000(client: AppClient) -> None:
    recs = [record(f"d{i}", set={"i": i}) for i in range(2001)]
    r = await client.http.post("/engage", json=recs)
    assert r.status_code == 400
    assert nothing_stored(client)
    r = await client.http.post("/engage?strict=1", json=recs[:2000])
    assert r.json() == {"code": 200, "num_records_imported": 2000, "status": "OK"}
    assert user_props(client, "d1999") == {"i": 1999}


# --- one record -----------------------------------------------------------------------------


async def test_record_over_the_size_limit_is_invalid_others_applied(db_url: str) -> None:
    async with app_client(db_url, max_record_bytes=2000) as c:
        big = record("big", set={f"p{i}": "v" * 200 for i in range(20)})
        recs = [record("small-1"), big, record("small-2")]
        r = await c.http.post("/engage?strict=1", json=recs)
        assert r.status_code == 400
        body = r.json()
        assert body["num_records_imported"] == 2
        assert body["failed_records"] == [
            {
                "index": 1,
                "$distinct_id": "big",
                "field": "record",
                "message": body["failed_records"][0]["message"],
            }
        ]
        assert "2000" in body["failed_records"][0]["message"]
        assert stored(c, "big") is None
        assert user_props(c, "small-1") == {"plan": "pro"}
        assert user_props(c, "small-2") == {"plan": "pro"}
        r = await c.http.post("/engage?verbose=1", json=[big])
        body = r.json()
        assert body["status"] == 0 and body["error"].startswith("record, ")


async def test_record_over_one_megabyte_is_invalid(client: AppClient) -> None:
    big = record("mega", set={f"p{i}": "v" * 250 for i in range(4500)})
    assert len(json.dumps(big)) > 1_000_000
    r = await client.http.post("/engage?strict=1", json=[big, record("fine")])
    assert r.status_code == 400
    body = r.json()
    assert body["num_records_imported"] == 1
    assert [(f["index"], f["field"]) for f in body["failed_records"]] == [(0, "record")]
    assert stored(client, "mega") is None
    assert user_props(client, "fine") == {"plan": "pro"}


async def test_distinct_id_over_255_characters_is_invalid(client: AppClient) -> None:
    r = await client.http.post(
        "/engage?verbose=1", json=[record("x" * 256), record("y" * 255, set={"ok": 1})]
    )
    assert r.json() == {"status": 1, "error": None}
    assert stored(client, "x" * 256) is None
    assert user_props(client, "y" * 255) == {"ok": 1}
    r = await client.http.post("/engage?verbose=1", json=[record("x" * 256)])
    body = r.json()
    assert body["status"] == 0 and body["error"].startswith("$distinct_id, ")


# --- names and strings ----------------------------------------------------------------------


async def test_strings_truncated_to_255_utf8_bytes(client: AppClient) -> None:
    values = {
        "ascii": "x" * 300,
        "two": "é" * 200,  # 2 bytes each
        "three": "€" * 100,  # 3 bytes each
        "four": "😀" * 70,  # 4 bytes each
        "short": "Zoë ☃",
    }
    r = await client.http.post("/engage?strict=1", json=[record("t", set=values)])
    assert r.json() == {"code": 200, "num_records_imported": 1, "status": "OK"}
    props = user_props(client, "t")
    assert props == {
        "ascii": "x" * 255,
        "two": "é" * 127,
        "three": "€" * 85,
        "four": "😀" * 63,
        "short": "Zoë ☃",
    }


async def test_strings_inside_lists_and_objects_truncated(client: AppClient) -> None:
    long = "y" * 400
    r = await client.http.post(
        "/engage",
        json=[
            record(
                "nested",
                set={"obj": {"a": long, "b": [long, 1]}, "lst": [long, {"c": long}]},
                union={"tags": [long]},
                append={"events": long},
            )
        ],
    )
    assert r.text == "1"
    cut = "y" * 255
    assert user_props(client, "nested") == {
        "obj": {"a": cut, "b": [cut, 1]},
        "lst": [cut, {"c": cut}],
        "tags": [cut],
        "events": [cut],
    }


async def test_property_names_truncated_to_255_characters(client: AppClient) -> None:
    name = "n" * 300
    r = await client.http.post(
        "/engage", json=[record("names", set={name: 1, "o": {name: 2}}, add={"é" * 300: 3})]
    )
    assert r.text == "1"
    assert user_props(client, "names") == {"n" * 255: 1, "o": {"n" * 255: 2}, "é" * 255: 3}
    r = await client.http.post("/engage", json=[record("names", unset=[name])])
    assert user_props(client, "names") == {"o": {"n" * 255: 2}, "é" * 255: 3}


# --- properties per profile -----------------------------------------------------------------


async def test_property_count_limit_small(db_url: str) -> None:
    async with app_client(db_url, max_properties=5) as c:
        r = await c.http.post(
            "/engage?strict=1", json=[record("many", set={f"p{i}": i for i in range(8)})]
        )
        assert r.status_code == 400
        body = r.json()
        assert body["num_records_imported"] == 1
        fields = [f["field"] for f in body["failed_records"]]
        assert fields == ["$set.p5", "$set.p6", "$set.p7"]
        assert all(f["index"] == 0 for f in body["failed_records"])
        assert all(f["$distinct_id"] == "many" for f in body["failed_records"])
        assert user_props(c, "many") == {f"p{i}": i for i in range(5)}
        # overwriting existing properties is still allowed; new ones are skipped
        r = await c.http.post(
            "/engage?strict=1", json=[record("many", set={"p0": "new"}, add={"p1": 10, "q": 1})]
        )
        assert [f["field"] for f in r.json()["failed_records"]] == ["$add.q"]
        props = user_props(c, "many")
        assert props is not None and props["p0"] == "new" and props["p1"] == 11
        assert "q" not in props
        # after an $unset there is room again
        await c.http.post("/engage", json=[record("many", unset=["p4"])])
        r = await c.http.post("/engage?strict=1", json=[record("many", set={"q": 1})])
        assert r.status_code == 200
        assert user_props(c, "many") == {"p0": "new", "p1": 11, "p2": 2, "p3": 3, "q": 1}


async def test_property_count_limit_default_2000(client: AppClient) -> None:
    r = await client.http.post(
        "/engage?strict=1", json=[record("full", set={f"p{i}": i for i in range(2001)})]
    )
    assert r.status_code == 400
    assert [f["field"] for f in r.json()["failed_records"]] == ["$set.p2000"]
    props = user_props(client, "full")
    assert props is not None and len(props) == 2000 and "p2000" not in props


# --- list and object values -----------------------------------------------------------------

S255 = "s" * 250


def big_list(n: int, prefix: str = "") -> list[str]:
    return [f"{prefix}{i:05d}{S255}" for i in range(n)]


async def test_list_over_256kb_skipped_and_reported(client: AppClient) -> None:
    big = big_list(1100)  # about 290 KB
    assert len(json.dumps(big)) > 256 * 1024
    r = await client.http.post(
        "/engage?strict=1", json=[record("lists", set={"big": big, "small": [1, 2]})]
    )
    assert r.status_code == 400
    body = r.json()
    assert body["num_records_imported"] == 1
    assert [(f["index"], f["field"]) for f in body["failed_records"]] == [(0, "$set.big")]
    assert user_props(client, "lists") == {"small": [1, 2]}
    # without strict the record is still valid
    r = await client.http.post("/engage?verbose=1", json=[record("lists2", set={"big": big})])
    assert r.json() == {"status": 1, "error": None}
    assert user_props(client, "lists2") == {}


async def test_union_and_append_that_would_pass_256kb_skipped(client: AppClient) -> None:
    base = big_list(900)  # about 237 KB
    await client.http.post("/engage", json=[record("grow", set={"l": base, "m": base})])
    r = await client.http.post(
        "/engage?strict=1",
        json=[
            record("grow", union={"l": big_list(200, "n")}),
            record("grow", append={"m": big_list(200, "a")}),
        ],
    )
    assert r.status_code == 400
    body = r.json()
    assert body["num_records_imported"] == 2
    assert [(f["index"], f["field"]) for f in body["failed_records"]] == [
        (0, "$union.l"),
        (1, "$append.m"),
    ]
    assert user_props(client, "grow") == {"l": base, "m": base}


async def test_objects_too_deep_or_too_wide_skipped(client: AppClient) -> None:
    ok_deep = {"a": {"b": {"c": 1}}}
    too_deep = {"a": {"b": {"c": {"d": 1}}}}
    too_wide = {f"k{i}": i for i in range(256)}
    ok_wide = {f"k{i}": i for i in range(255)}
    r = await client.http.post(
        "/engage?strict=1",
        json=[
            record(
                "objs",
                set={"deep": too_deep, "okdeep": ok_deep, "wide": too_wide, "okwide": ok_wide},
            )
        ],
    )
    assert r.status_code == 400
    fields = sorted(f["field"] for f in r.json()["failed_records"])
    assert fields == ["$set.deep", "$set.wide"]
    assert user_props(client, "objs") == {"okdeep": ok_deep, "okwide": ok_wide}
