"""Service accounts: user:secret plus project_id, scoped to their projects."""

from __future__ import annotations

import base64

import pytest

from tests.conftest import AppClient

pytestmark = pytest.mark.all_backends  # on SQLite and on PostgreSQL


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_service_account_scoped_to_its_projects(client: AppClient) -> None:
    r = await client.http.post(
        "/engage",
        json=[
            {"$token": "a", "$distinct_id": "u", "$set": {"x": 1}},
            {"$token": "b", "$distinct_id": "v", "$set": {"x": 2}},
        ],
    )
    assert r.text == "1"
    store = client.app.store
    pa, pb = store.project_by_token("a"), store.project_by_token("b")
    assert pa and pb
    account, secret = store.create_service_account("CI reader", [pa.id])
    assert ":" not in account.username and secret not in str(store.list_service_accounts())
    ok = await client.http.post(
        "/api/query/engage",
        data={"project_id": pa.id, "distinct_id": "u"},
        headers=basic(account.username, secret),
    )
    assert ok.status_code == 200 and ok.json()["results"][0]["$properties"]["x"] == 1
    other = await client.http.post(
        "/api/query/engage", data={"project_id": pb.id}, headers=basic(account.username, secret)
    )
    assert other.status_code == 403 and other.json()["status"] == "error"
    missing = await client.http.post(
        "/api/query/engage", data={}, headers=basic(account.username, secret)
    )
    assert missing.status_code == 401 and "project_id" in missing.json()["error"]
    bad = await client.http.post(
        "/api/query/engage",
        data={"project_id": pa.id},
        headers=basic(account.username, secret + "x"),
    )
    assert bad.status_code == 401
    plain = await client.http.post(
        "/api/query/engage",
        data={"project_id": pa.id},
        headers={"Authorization": f"Basic {account.username}:{secret}"},
    )
    assert plain.status_code == 200  # plain-text Basic credentials, as Mixpanel accepts
    # the project secret still works beside it
    assert (
        await client.http.post(
            "/api/query/engage", data={"distinct_id": "v"}, headers=client.auth("b")
        )
    ).status_code == 200
