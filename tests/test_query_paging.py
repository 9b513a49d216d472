"""Mixpanel's paging over /api/query/engage: sessions freeze the matches at page 0, the
paginator loop walks every match exactly once while updates keep arriving."""

from __future__ import annotations

import asyncio

import pytest

from peoplebase.settings import Settings
from tests.conftest import AppClient

pytestmark = pytest.mark.all_backends  # every test on SQLite and on PostgreSQL


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(db=db_url, tokens="open", page_size=10, query_session_ttl=60.0)


async def ingest(client: AppClient, records: list[dict]) -> None:
    r = await client.http.post("/engage", json=records)
    assert r.status_code == 200 and r.text == "1"


async def test_paginator_walks_every_match_once_under_writes(client: AppClient) -> None:
    await ingest(
        client,
        [
            {
                "$token": "t",
                "$distinct_id": f"u{i:03}",
                "$set": {"n": i, "plan": "pro" if i % 3 else "free"},
            }
            for i in range(95)
        ],
    )
    auth = client.auth("t")
    where = 'properties["plan"] == "pro"'
    expected = {f"u{i:03}" for i in range(95) if i % 3}
    seen: list[str] = []
    r = await client.http.post("/api/query/engage", data={"where": where}, headers=auth)
    body = r.json()
    assert body["page"] == 0 and body["page_size"] == 10 and body["total"] == len(expected)
    session = body["session_id"]
    page = body
    writes = 0
    while True:
        seen += [p["$distinct_id"] for p in page["results"]]
        assert all(p["$properties"].get("plan") in ("pro", "free", None) for p in page["results"])
        # updates keep arriving: new matches, matches that stop matching, deletes
        await ingest(
            client,
            [
                {"$token": "t", "$distinct_id": f"new{writes}", "$set": {"plan": "pro"}},
                {
                    "$token": "t",
                    "$distinct_id": f"u{(writes * 7) % 95:03}",
                    "$set": {"plan": "free"},
                },
            ],
        )
        if writes == 2:
            await ingest(client, [{"$token": "t", "$distinct_id": "u094", "$delete": ""}])
        writes += 1
        if len(page["results"]) < page["page_size"]:
            break
        r = await client.http.post(
            "/api/query/engage",
            data={"where": where, "page": page["page"] + 1, "session_id": session},
            headers=auth,
        )
        assert r.status_code == 200, r.text
        page = r.json()
        assert page["session_id"] == session and page["total"] == len(expected)
    assert len(seen) == len(set(seen)) == len(expected)
    assert set(seen) == expected
    # a new page 0 sees the new state
    fresh = (
        await client.http.post("/api/query/engage", data={"where": where}, headers=auth)
    ).json()
    assert fresh["session_id"] != session and fresh["total"] != len(expected)


async def test_later_pages_show_profiles_as_they_are_when_read(client: AppClient) -> None:
    """A session freezes which profiles match at page 0, not their properties (SPEC §9)."""
    await ingest(
        client,
        [{"$token": "t", "$distinct_id": f"u{i:02}", "$set": {"v": 0}} for i in range(25)],
    )
    auth = client.auth("t")
    first = (await client.http.post("/api/query/engage", data={}, headers=auth)).json()
    assert [p["$distinct_id"] for p in first["results"]] == [f"u{i:02}" for i in range(10)]
    await ingest(
        client,
        [
            {"$token": "t", "$distinct_id": "u15", "$set": {"v": 1}, "$add": {"n": 2}},
            {"$token": "t", "$distinct_id": "u17", "$unset": ["v"]},
        ],
    )
    r = await client.http.post(
        "/api/query/engage", data={"page": 1, "session_id": first["session_id"]}, headers=auth
    )
    assert r.status_code == 200, r.text
    props = {p["$distinct_id"]: p["$properties"] for p in r.json()["results"]}
    assert list(props) == [f"u{i:02}" for i in range(10, 20)]
    assert props["u15"]["v"] == 1 and props["u15"]["n"] == 2
    assert "v" not in props["u17"]
    assert props["u16"]["v"] == 0


async def test_later_pages_need_a_live_session(client: AppClient) -> None:
    await ingest(
        client, [{"$token": "t", "$distinct_id": f"u{i}", "$set": {"a": 1}} for i in range(25)]
    )
    auth = client.auth("t")
    r = await client.http.post("/api/query/engage", data={"page": 1}, headers=auth)
    assert r.status_code == 400 and "session_id, required" in r.json()["error"]
    r = await client.http.post(
        "/api/query/engage", data={"page": 1, "session_id": "nope"}, headers=auth
    )
    assert r.status_code == 400 and "unknown or expired" in r.json()["error"]
    first = (await client.http.post("/api/query/engage", data={}, headers=auth)).json()
    assert first["total"] == 25 and len(first["results"]) == 10
    # a session of another project is not usable
    other = client.auth("t2")
    r = await client.http.post(
        "/api/query/engage", data={"page": 1, "session_id": first["session_id"]}, headers=other
    )
    assert r.status_code == 400
    # expiry
    client.app.settings = client.app.settings.replace(query_session_ttl=0.5)
    client.app.query_api.settings = client.app.settings
    expired = (await client.http.post("/api/query/engage", data={}, headers=auth)).json()
    await asyncio.sleep(0.6)
    r = await client.http.post(
        "/api/query/engage", data={"page": 1, "session_id": expired["session_id"]}, headers=auth
    )
    assert r.status_code == 400 and "expired" in r.json()["error"]


async def test_where_errors_and_output_properties(client: AppClient) -> None:
    await ingest(client, [{"$token": "t", "$distinct_id": "a", "$set": {"x": 1, "y": 2}}])
    auth = client.auth("t")
    r = await client.http.post(
        "/api/query/engage", data={"where": 'properties["x"] = 1'}, headers=auth
    )
    assert r.status_code == 400 and "position 16" in r.json()["error"]
    r = await client.http.post(
        "/api/query/engage",
        data={"where": 'properties["x"] == 1', "output_properties": '["y"]'},
        headers=auth,
    )
    assert r.json()["results"] == [{"$distinct_id": "a", "$properties": {"y": 2}}]
    r = await client.http.post(
        "/api/query/engage",
        data={"distinct_ids": '["a","b"]', "where": 'properties["x"] == 2'},
        headers=auth,
    )
    assert r.json()["total"] == 0


async def test_concurrency_cap_answers_429(client: AppClient) -> None:
    auth = client.auth("t")
    project = client.app.store.project_by_token("t")
    assert project is not None
    client.app.query_api._running[project.id] = client.app.settings.query_concurrency
    r = await client.http.post("/api/query/engage", data={}, headers=auth)
    assert r.status_code == 429 and r.headers["retry-after"]
    client.app.query_api._running.clear()
    r = await client.http.post("/api/query/engage", data={}, headers=auth)
    assert r.status_code == 200


async def test_query_timeout(client: AppClient) -> None:
    await ingest(
        client,
        [{"$token": "t", "$distinct_id": f"u{i}", "$set": {"s": "x" * 200}} for i in range(2000)],
    )
    client.app.settings = client.app.settings.replace(query_timeout=1e-6)
    client.app.query_api.settings = client.app.settings
    where = " or ".join(f'"{i}" in properties["s"]' for i in range(50))
    r = await client.http.post("/api/query/engage", data={"where": where}, headers=client.auth("t"))
    assert r.status_code == 400 and "longer than" in r.json()["error"]
