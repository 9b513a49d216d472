"""The Engage query API (SPEC §9): auth, parameters and Mixpanel's response shape."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from peoplebase.app import PeoplebaseApp
from peoplebase.settings import Settings
from tests.conftest import AppClient

pytestmark = pytest.mark.all_backends  # every test on SQLite and on PostgreSQL

TOKEN = "tok-query"
OTHER = "tok-other"
ROUTES = ["/api/query/engage", "/api/2.0/engage", "/api/query/engage/"]


async def ingest(client: AppClient, *records: dict[str, Any]) -> None:
    r = await client.http.post("/engage?strict=1", json=list(records))
    assert r.status_code == 200, r.text


def rec(did: str, token: str = TOKEN, **ops: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"$token": token, "$distinct_id": did}
    body.update({"$" + k: v for k, v in ops.items()})
    return body


async def seed(client: AppClient) -> None:
    await ingest(
        client,
        rec("alice", set={"plan": "pro", "age": 31, "city": "Paris"}, time=1700000000),
        rec("bob", set={"plan": "free", "age": 25}, time=1700000100),
        rec("carol", set={"plan": "pro"}, union={"tags": ["a"]}, time=1700000200),
        rec("dave", set={"plan": "gone"}, time=1700000300),
        rec("eve", token=OTHER, set={"plan": "other project"}),
    )
    await ingest(client, rec("dave", delete="", time=1700000400))


async def query(
    client: AppClient, route: str, method: str, auth: dict[str, str], **params: str
) -> Any:
    if method == "GET":
        return await client.http.get(route, params=params, headers=auth)
    return await client.http.post(route, data=params, headers=auth)


def check_shape(body: dict[str, Any]) -> None:
    assert set(body) == {"page", "page_size", "session_id", "status", "total", "results"}
    assert body["status"] == "ok"
    assert isinstance(body["session_id"], str) and body["session_id"]
    assert isinstance(body["page_size"], int) and body["page_size"] > 0
    for result in body["results"]:
        assert set(result) == {"$distinct_id", "$properties"}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_list_all_profiles(client: AppClient, route: str, method: str) -> None:
    await seed(client)
    r = await query(client, route, method, client.auth(TOKEN))
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    check_shape(body)
    assert body["page"] == 0
    assert body["page_size"] == 1000
    assert body["total"] == 3
    by_id = {x["$distinct_id"]: x["$properties"] for x in body["results"]}
    assert by_id == {
        "alice": {
            "plan": "pro",
            "age": 31,
            "city": "Paris",
            "$last_seen": "2023-11-14T22:13:20",
        },
        "bob": {"plan": "free", "age": 25, "$last_seen": "2023-11-14T22:15:00"},
        "carol": {"plan": "pro", "tags": ["a"], "$last_seen": "2023-11-14T22:16:40"},
    }


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_distinct_id(client: AppClient, method: str) -> None:
    await seed(client)
    r = await query(client, ROUTES[0], method, client.auth(TOKEN), distinct_id="bob")
    body = r.json()
    check_shape(body)
    assert body["total"] == 1
    assert body["results"] == [
        {
            "$distinct_id": "bob",
            "$properties": {"plan": "free", "age": 25, "$last_seen": "2023-11-14T22:15:00"},
        }
    ]


async def test_distinct_id_unknown_or_deleted_or_other_project(client: AppClient) -> None:
    await seed(client)
    auth = client.auth(TOKEN)
    for did in ("nobody", "dave", "eve"):
        r = await query(client, ROUTES[1], "POST", auth, distinct_id=did)
        assert r.status_code == 200
        body = r.json()
        assert (body["total"], body["results"]) == (0, []), did


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_distinct_ids(client: AppClient, method: str) -> None:
    await seed(client)
    r = await query(
        client,
        ROUTES[0],
        method,
        client.auth(TOKEN),
        distinct_ids=json.dumps(["carol", "alice", "dave", "nobody", "eve"]),
    )
    body = r.json()
    check_shape(body)
    assert body["total"] == 2
    assert sorted(x["$distinct_id"] for x in body["results"]) == ["alice", "carol"]


async def test_output_properties(client: AppClient) -> None:
    await seed(client)
    r = await query(
        client,
        ROUTES[0],
        "POST",
        client.auth(TOKEN),
        output_properties=json.dumps(["plan", "tags", "missing"]),
    )
    body = r.json()
    by_id = {x["$distinct_id"]: x["$properties"] for x in body["results"]}
    assert by_id == {
        "alice": {"plan": "pro"},
        "bob": {"plan": "free"},
        "carol": {"plan": "pro", "tags": ["a"]},
    }
    r = await query(
        client,
        ROUTES[0],
        "GET",
        client.auth(TOKEN),
        distinct_id="alice",
        output_properties=json.dumps(["age"]),
    )
    assert r.json()["results"] == [{"$distinct_id": "alice", "$properties": {"age": 31}}]


async def test_deleted_profiles_absent_from_listing(client: AppClient) -> None:
    await seed(client)
    await ingest(client, rec("bob", delete="", time=1700000500))
    r = await query(client, ROUTES[0], "GET", client.auth(TOKEN))
    body = r.json()
    assert body["total"] == 2
    assert sorted(x["$distinct_id"] for x in body["results"]) == ["alice", "carol"]


async def test_other_project_sees_only_its_profiles(client: AppClient) -> None:
    await seed(client)
    r = await query(client, ROUTES[0], "GET", client.auth(OTHER))
    body = r.json()
    assert body["total"] == 1
    assert body["results"][0]["$distinct_id"] == "eve"
    assert body["results"][0]["$properties"]["plan"] == "other project"


async def test_session_id_echoed(client: AppClient) -> None:
    await seed(client)
    auth = client.auth(TOKEN)
    first = (await query(client, ROUTES[0], "POST", auth)).json()
    session = first["session_id"]
    r = await query(client, ROUTES[0], "POST", auth, session_id=session, page="0")
    assert r.json()["session_id"] == session


async def test_project_id_of_own_project_accepted(client: AppClient) -> None:
    await seed(client)
    project = client.app.store.project_by_token(TOKEN)
    assert project is not None
    r = await query(client, ROUTES[0], "GET", client.auth(TOKEN), project_id=str(project.id))
    assert r.status_code == 200
    assert r.json()["total"] == 3


# --- authentication -------------------------------------------------------------------------


def basic(user: str, password: str = "") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize("route", ROUTES[:2])
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_401_without_credentials(client: AppClient, route: str, method: str) -> None:
    await seed(client)
    r = await query(client, route, method, {})
    assert r.status_code == 401
    body = r.json()
    assert set(body) == {"error", "status"}
    assert body["status"] == "error"
    assert isinstance(body["error"], str) and body["error"]
    assert "alice" not in r.text


@pytest.mark.parametrize(
    "auth",
    [
        basic("not-the-secret"),
        basic(""),
        {"Authorization": "Bearer something"},
        {"Authorization": "Basic %%%"},
    ],
)
async def test_401_with_bad_credentials(client: AppClient, auth: dict[str, str]) -> None:
    await seed(client)
    client.auth(TOKEN)  # the project has a secret, just not this one
    r = await query(client, ROUTES[0], "POST", auth)
    assert r.status_code == 401
    assert r.json()["status"] == "error"
    assert "alice" not in r.text


async def test_401_with_secret_and_a_password(client: AppClient) -> None:
    secret = client.secret_for(TOKEN)
    r = await query(client, ROUTES[0], "GET", basic(secret, "extra"))
    assert r.status_code == 401
    assert r.json()["status"] == "error"


async def test_rotated_secret_replaces_the_old_one(client: AppClient) -> None:
    await seed(client)
    old = client.secret_for(TOKEN)
    new = client.secret_for(TOKEN)
    assert old != new
    assert (await query(client, ROUTES[0], "GET", basic(old))).status_code == 401
    assert (await query(client, ROUTES[0], "GET", basic(new))).status_code == 200


async def test_403_with_project_id_of_another_project(client: AppClient) -> None:
    await seed(client)
    other = client.app.store.project_by_token(OTHER)
    assert other is not None
    for method in ("GET", "POST"):
        r = await query(client, ROUTES[0], method, client.auth(TOKEN), project_id=str(other.id))
        assert r.status_code == 403
        body = r.json()
        assert set(body) == {"error", "status"}
        assert body["status"] == "error"
        assert "eve" not in r.text and "alice" not in r.text


async def test_bad_parameters_are_400(client: AppClient) -> None:
    await seed(client)
    auth = client.auth(TOKEN)
    for params in (
        {"distinct_ids": "not json"},
        {"output_properties": '{"a": 1}'},
        {"page": "-1"},
        {"page": "x"},
    ):
        r = await query(client, ROUTES[0], "POST", auth, **params)
        assert r.status_code == 400, params
        assert r.json()["code"] == 400


async def test_query_routes_refuse_other_methods(client: AppClient) -> None:
    r = await client.http.delete(ROUTES[0], headers=client.auth(TOKEN))
    assert r.status_code == 405


async def test_pages_return_every_match_once(tmp_path: Path) -> None:
    app = PeoplebaseApp(Settings(db=str(tmp_path / "pages.db"), tokens="open", page_size=2))
    app.startup()
    c = AppClient(app)
    try:
        await ingest(c, *(rec(f"user-{i}", set={"i": i}) for i in range(5)))
        auth = c.auth(TOKEN)
        first = (await query(c, ROUTES[0], "POST", auth)).json()
        assert (first["page"], first["page_size"], first["total"]) == (0, 2, 5)
        seen = [x["$distinct_id"] for x in first["results"]]
        for page in (1, 2):
            body = (
                await query(
                    c, ROUTES[0], "GET", auth, page=str(page), session_id=first["session_id"]
                )
            ).json()
            check_shape(body)
            assert body["page"] == page and body["total"] == 5
            seen += [x["$distinct_id"] for x in body["results"]]
        assert sorted(seen) == [f"user-{i}" for i in range(5)]
        empty = await query(c, ROUTES[0], "GET", auth, page="3", session_id=first["session_id"])
        assert empty.json()["results"] == []
    finally:
        await c.http.aclose()
        app.shutdown()


async def test_single_profile_lookup_does_not_wait_for_a_thread(client: AppClient, backend: str) -> None:
    """On SQLite a distinct_id lookup runs on the event loop: with every thread of the default
    executor busy it is still answered at once, while a query that needs a thread waits."""
    import asyncio
    import concurrent.futures
    import time

    await seed(client)
    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    busy = [loop.run_in_executor(None, time.sleep, 1.5) for _ in range(2)]
    await asyncio.sleep(0.05)
    auth = client.auth(TOKEN)
    started = time.monotonic()
    r = await client.http.post("/api/query/engage", data={"distinct_id": "alice"}, headers=auth)
    lookup = time.monotonic() - started
    assert r.status_code == 200 and r.json()["results"][0]["$distinct_id"] == "alice"
    started = time.monotonic()
    r = await client.http.post("/api/query/engage", data={"where": 'properties["plan"] == "pro"'}, headers=auth)
    scan = time.monotonic() - started
    assert r.status_code == 200
    await asyncio.gather(*busy)
    if backend == "sqlite":
        assert lookup < 0.5 < scan
    else:  # PostgreSQL reads go over the network: they stay off the event loop
        assert lookup > 0.5
