"""GET /openapi.json describes every route truthfully.

- The served document is the one peoplebase/openapi.py builds, and names every route app.py
  routes (ingestion, event routes, query, export, health, the web page, itself).
- Every documented operation, called plainly, answers a status and a content type the document
  declares for it.
- Schemathesis fuzzes a real server from the served document: no 5xx, and every status code,
  content type and JSON body conforms to the document.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from peoplebase import app as app_module
from peoplebase.openapi import build
from tests.conftest import AppClient, ServerProcess

# Requests per operation; PEOPLEBASE_API_FUZZ_EXAMPLES sets more (docs/reliability.md).
FUZZ_EXAMPLES = int(os.environ.get("PEOPLEBASE_API_FUZZ_EXAMPLES", "25"))


async def test_served_document_is_the_built_one(client: AppClient) -> None:
    r = await client.http.get("/openapi.json")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.json() == build()
    assert r.json()["openapi"].startswith("3.0")


def test_document_names_every_route_of_the_app() -> None:
    paths = set(build()["paths"])
    routes = {
        "/engage",
        "/engage/",
        "/healthz",
        "/openapi.json",
        "/",
        "/ui/",
        "/ui/login",
        "/ui/logout",
        "/ui/profiles",
        "/ui/profiles/{distinct_id}",
        app_module.EXPORT_ROUTE,
        *app_module.QUERY_ROUTES,
        *(f"/{r}" for r in app_module.EVENT_ROUTES),
    }
    assert routes <= paths, routes - paths


def _declared(op: dict[str, Any], status: int) -> dict[str, Any]:
    responses = op["responses"]
    assert str(status) in responses, f"status {status} not declared: {sorted(responses)}"
    return dict(responses[str(status)])


async def test_every_operation_answers_as_documented(client: AppClient) -> None:
    doc = build()
    auth = client.auth("openapi")
    concrete = {"{distinct_id}": "someone", "{name}": "ui.css"}
    called = 0
    for path, item in doc["paths"].items():
        url = path
        for placeholder, value in concrete.items():
            url = url.replace(placeholder, value)
        for method, op in item.items():
            headers = auth if op.get("security") else {}
            r = await client.http.request(method.upper(), url, headers=headers)
            declared = _declared(op, r.status_code)
            content = declared.get("content")
            if content:
                ctype = r.headers["content-type"].split(";")[0].strip()
                assert ctype in content, (method, path, r.status_code, ctype)
            assert r.headers["x-content-type-options"] == "nosniff", (method, path)
            called += 1
    assert called >= 30


# --- schemathesis against a real server --------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    db = Path(tmp_path_factory.mktemp("openapi")) / "fuzz.db"
    server = ServerProcess(db, "--tokens", "open", "--auth-fail-limit", "0").start()
    try:
        yield server
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def fuzz_auth(fuzz_server: ServerProcess) -> dict[str, str]:
    httpx.post(
        fuzz_server.url + "/engage", json={"$token": "fuzz", "$distinct_id": "u", "$set": {"a": 1}}
    )
    secret = fuzz_server.secret("fuzz")
    return {"Authorization": "Basic " + base64.b64encode(f"{secret}:".encode()).decode()}


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.mark.e2e
def test_schemathesis_fuzz(fuzz_server: ServerProcess, fuzz_auth: dict[str, str]) -> None:
    """Each operation of the served document, FUZZ_EXAMPLES generated requests."""
    api = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 30
    cases = 0
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def fuzz(case: Any) -> None:
            nonlocal cases
            cases += 1
            case.call_and_validate(headers=fuzz_auth, checks=CHECKS, timeout=30)

        fuzz()
    assert cases >= len(operations) * 5
    print(f"schemathesis: {cases} requests over {len(operations)} operations")
