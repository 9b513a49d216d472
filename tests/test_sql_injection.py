"""SQL injection attempts through every query parameter are harmless: they are values."""

from __future__ import annotations

import orjson
import pytest

from tests.conftest import AppClient

PAYLOADS = [
    "' OR 1=1 --",
    '") OR 1=1 --',
    "x'; DROP TABLE profiles; --",
    '$."a") OR json_type(props, \'$.b\') IS NULL OR ("',
    "%s%s%s",
    "\\",
]


@pytest.mark.parametrize("payload", PAYLOADS)
async def test_injection_is_harmless(client: AppClient, payload: str) -> None:
    r = await client.http.post(
        "/engage",
        json=[
            {"$token": "t", "$distinct_id": f"u{i}", "$set": {"name": f"n{i}"}} for i in range(3)
        ],
    )
    assert r.text == "1"
    auth = client.auth("t")
    q = orjson.dumps(payload).decode()
    attempts = [
        {"where": f"properties[{q}] == 1"},
        {"where": f'properties["name"] == {q}'},
        {"where": f'{q} in properties["name"]'},
        {"where": payload},
        {"distinct_id": payload},
        {"distinct_ids": orjson.dumps([payload, "u1"]).decode()},
        {"output_properties": orjson.dumps([payload]).decode()},
        {"page": payload},
        {"session_id": payload, "page": "1"},
        {"project_id": payload},
    ]
    for params in attempts:
        r = await client.http.post("/api/query/engage", data=params, headers=auth)
        assert r.status_code in (200, 400, 403), (params, r.text)
        if r.status_code == 200 and (
            "where" in params or "distinct_id" in params or "distinct_ids" in params
        ):
            ids = {p["$distinct_id"] for p in r.json()["results"]}
            assert ids <= {"u1"}, params  # nothing matched but what was asked for
        if "output_properties" in params:
            assert all(p["$properties"] == {} for p in r.json()["results"])
    r = await client.http.post(
        "/api/query/export", data={"where": f"properties[{q}] == 1"}, headers=auth
    )
    assert r.status_code == 200 and r.text == ""
    everything = await client.http.post("/api/query/engage", data={}, headers=auth)
    assert everything.json()["total"] == 3  # the table is intact
