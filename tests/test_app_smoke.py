"""The smallest end-to-end path through the app: one update in, the profile out."""

from __future__ import annotations

from tests.conftest import AppClient


async def test_set_then_query(client: AppClient) -> None:
    r = await client.http.post("/engage", json=[{"$token": "tok", "$distinct_id": "u1", "$set": {"plan": "pro"}}])
    assert r.status_code == 200
    assert r.text == "1"
    assert r.headers["x-content-type-options"] == "nosniff"
    q = await client.http.post("/api/query/engage", data={"distinct_id": "u1"}, headers=client.auth("tok"))
    assert q.status_code == 200
    body = q.json()
    assert body["total"] == 1
    assert body["results"][0]["$distinct_id"] == "u1"
    assert body["results"][0]["$properties"]["plan"] == "pro"
