"""Ingestion over HTTP (SPEC §1, §7, §8): every request form, parameter and response shape.

Each test sends real requests through the ASGI app into a real SQLite file and then reads the
stored profile back, so "accepted" always means "stored" and "refused" means "nothing stored".
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from peoplebase.app import PeoplebaseApp
from peoplebase.settings import Settings
from tests.conftest import AppClient

pytestmark = pytest.mark.all_backends  # every test on SQLite and on PostgreSQL

TOKEN = "tok-ingest"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
GIF_MAGIC = b"GIF89a"


def record(did: str = "u1", **ops: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"$token": TOKEN, "$distinct_id": did}
    if not ops:
        ops = {"$set": {"plan": "pro"}}
    body.update({k if k.startswith("$") else "$" + k: v for k, v in ops.items()})
    return body


def b64(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def stored(client: AppClient, did: str, token: str = TOKEN) -> dict[str, Any] | None:
    store = client.app.store
    project = store.project_by_token(token)
    if project is None:
        return None
    rows = store.get_profiles(project.id, [did])
    return rows[0][1] if rows else None


def user_props(client: AppClient, did: str, token: str = TOKEN) -> dict[str, Any] | None:
    props = stored(client, did, token)
    if props is None:
        return None
    return {k: v for k, v in props.items() if k != "$last_seen"}


def with_padding_chars(value: str) -> dict[str, Any]:
    """A record whose base64 holds `+`, `/` and `=` (the characters forms mangle)."""
    for extra in range(64):
        rec = record("b64-user", set={"v": value + "~" * extra})
        encoded = b64(rec)
        if "+" in encoded and "/" in encoded and encoded.endswith("="):
            return rec
    raise AssertionError("no record found whose base64 has + / and =")


@pytest.fixture
async def closed_client(tmp_path: Path) -> AsyncIterator[AppClient]:
    app = PeoplebaseApp(Settings(db=str(tmp_path / "closed.db"), tokens="closed"))
    app.startup()
    c = AppClient(app)
    try:
        yield c
    finally:
        await c.http.aclose()
        app.shutdown()


# --- routes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/engage", "/engage/", "/mp/engage", "/a/b/engage/"])
async def test_engage_routes_accept_get_and_post(client: AppClient, path: str) -> None:
    r = await client.http.post(path, json=[record("post" + path)])
    assert (r.status_code, r.text) == (200, "1")
    r = await client.http.get(path, params={"data": b64(record("get" + path))})
    assert (r.status_code, r.text) == (200, "1")
    assert user_props(client, "post" + path) == {"plan": "pro"}
    assert user_props(client, "get" + path) == {"plan": "pro"}


async def test_unknown_route_is_404_with_error_body(client: AppClient) -> None:
    r = await client.http.post("/engaged", json=[record()])
    assert r.status_code == 404
    assert set(r.json()) == {"code", "error", "status"}
    assert r.headers["x-content-type-options"] == "nosniff"
    assert stored(client, "u1") is None


async def test_other_methods_are_405(client: AppClient) -> None:
    r = await client.http.put("/engage", json=[record()])
    assert r.status_code == 405
    assert r.json()["code"] == 405
    assert stored(client, "u1") is None


# --- request forms --------------------------------------------------------------------------


async def test_get_data_base64(client: AppClient) -> None:
    r = await client.http.get("/engage", params={"data": b64(record("g1"))})
    assert (r.status_code, r.text) == (200, "1")
    assert r.headers["content-type"].startswith("text/plain")
    assert user_props(client, "g1") == {"plan": "pro"}


async def test_get_data_json(client: AppClient) -> None:
    r = await client.http.get("/engage", params={"data": json.dumps(record("g2"))})
    assert r.text == "1"
    assert user_props(client, "g2") == {"plan": "pro"}


async def test_get_data_base64_with_plus_slash_escaped(client: AppClient) -> None:
    rec = with_padding_chars("??>>")
    r = await client.http.get("/engage?data=" + quote(b64(rec), safe=""))
    assert r.text == "1"
    assert user_props(client, "b64-user") == rec["$set"]


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", None, "text/plain"]
)
async def test_post_json_body(client: AppClient, content_type: str | None) -> None:
    body = json.dumps([record("j1"), record("j2", set={"n": 2})]).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    r = await client.http.post("/engage", content=body, headers=headers)
    assert (r.status_code, r.text) == (200, "1")
    assert user_props(client, "j1") == {"plan": "pro"}
    assert user_props(client, "j2") == {"n": 2}


async def test_post_json_body_detected_by_first_byte_after_whitespace(client: AppClient) -> None:
    body = b"  \n\t" + json.dumps(record("ws")).encode()
    r = await client.http.post("/engage", content=body, headers=FORM)
    assert r.text == "1"
    assert user_props(client, "ws") == {"plan": "pro"}


async def test_post_json_body_single_object(client: AppClient) -> None:
    r = await client.http.post("/engage", json=record("one"))
    assert r.text == "1"
    assert user_props(client, "one") == {"plan": "pro"}


async def test_form_data_json(client: AppClient) -> None:
    rec = record("f1", set={"text": "a+b c&d=e Zoë ☃"})
    r = await client.http.post("/engage", data={"data": json.dumps(rec)})
    assert r.text == "1"
    assert user_props(client, "f1") == {"text": "a+b c&d=e Zoë ☃"}


async def test_form_data_json_python_sdk_style(client: AppClient) -> None:
    """quote_plus'd compact JSON with \\u escapes, then verbose=1&ip=0 in the body."""
    rec = record("py", set={"uni": "Zoë ☃ a+b"})
    payload = json.dumps(rec, separators=(",", ":"), ensure_ascii=True)
    body = f"data={quote_plus(payload)}&verbose=1&ip=0"
    r = await client.http.post("/engage", content=body, headers=FORM)
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"status": 1, "error": None}
    assert user_props(client, "py") == {"uni": "Zoë ☃ a+b"}


async def test_form_data_base64_url_encoded(client: AppClient) -> None:
    rec = with_padding_chars("??>>")
    r = await client.http.post("/engage", content="data=" + quote(b64(rec), safe=""), headers=FORM)
    assert r.text == "1"
    assert user_props(client, "b64-user") == rec["$set"]


async def test_form_data_base64_unescaped_plus_read_as_space(client: AppClient) -> None:
    """Node and PHP put raw base64 in the form body: `+` arrives as a space."""
    rec = with_padding_chars("??>>")
    encoded = b64(rec)
    assert "+" in encoded
    r = await client.http.post("/engage", content="data=" + encoded, headers=FORM)
    assert r.text == "1"
    assert user_props(client, "b64-user") == rec["$set"]


async def test_form_data_base64_with_newlines_and_no_padding(client: AppClient) -> None:
    rec = with_padding_chars("??>>")
    encoded = b64(rec).rstrip("=")
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76)) + "\r\n"
    r = await client.http.post("/engage", content="data=" + quote(wrapped, safe=""), headers=FORM)
    assert r.text == "1"
    assert user_props(client, "b64-user") == rec["$set"]


async def test_send_beacon_text_plain_form_body(client: AppClient) -> None:
    body = "data=" + quote(b64(record("beacon")), safe="")
    r = await client.http.post(
        "/engage/?ip=1&_=1795891735030",
        content=body,
        headers={"Content-Type": "text/plain;charset=UTF-8"},
    )
    assert (r.status_code, r.text) == (200, "1")
    assert user_props(client, "beacon") == {"plan": "pro"}


@pytest.mark.parametrize("form", [False, True])
async def test_gzip_content_encoding(client: AppClient, form: bool) -> None:
    if form:
        raw = ("data=" + quote(b64([record("gz")]), safe="")).encode()
        headers = {**FORM, "Content-Encoding": "gzip"}
    else:
        raw = json.dumps([record("gz")]).encode()
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    r = await client.http.post("/engage", content=gzip.compress(raw), headers=headers)
    assert (r.status_code, r.text) == (200, "1")
    assert user_props(client, "gz") == {"plan": "pro"}


async def test_invalid_gzip_is_a_data_error(client: AppClient) -> None:
    r = await client.http.post(
        "/engage?verbose=1",
        content=b"not gzip at all",
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == 0 and body["error"].startswith("data, ")


async def test_list_of_records_in_form_data(client: AppClient) -> None:
    recs = [record(f"l{i}", set={"i": i}) for i in range(5)]
    r = await client.http.post("/engage", data={"data": json.dumps(recs)})
    assert r.text == "1"
    for i in range(5):
        assert user_props(client, f"l{i}") == {"i": i}


async def test_ignored_parameters_and_authorization_header(client: AppClient) -> None:
    r = await client.http.get(
        "/engage",
        params={
            "data": b64(record("ign")),
            "_": "1795891722419",
            "test": "1",
            "api_key": "whatever",
            "project_id": "999",
            "ip": "1",
        },
        headers={"Authorization": "Basic Zm9vOg=="},
    )
    assert (r.status_code, r.text) == (200, "1")
    assert user_props(client, "ign") == {"plan": "pro"}


# --- parameters from the query string and the form body --------------------------------------


@pytest.mark.parametrize("where", ["query", "body"])
async def test_verbose_from_query_or_body(client: AppClient, where: str) -> None:
    data = quote(json.dumps(record("v")), safe="")
    if where == "query":
        r = await client.http.post("/engage?verbose=1", content=f"data={data}", headers=FORM)
    else:
        r = await client.http.post("/engage", content=f"data={data}&verbose=1", headers=FORM)
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"status": 1, "error": None}


@pytest.mark.parametrize("value", ["0", "", "no"])
async def test_verbose_off_values(client: AppClient, value: str) -> None:
    r = await client.http.get("/engage", params={"data": b64(record()), "verbose": value})
    assert r.text == "1"
    assert r.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize("value", ["1", "2", "true"])
async def test_verbose_on_values(client: AppClient, value: str) -> None:
    r = await client.http.get("/engage", params={"data": b64(record()), "verbose": value})
    assert r.json() == {"status": 1, "error": None}


@pytest.mark.parametrize("where", ["query", "body"])
async def test_strict_from_query_or_body(client: AppClient, where: str) -> None:
    data = quote(json.dumps([record("s1"), record("s2")]), safe="")
    if where == "query":
        r = await client.http.post("/engage?strict=1", content=f"data={data}", headers=FORM)
    else:
        r = await client.http.post("/engage", content=f"data={data}&strict=1", headers=FORM)
    assert r.status_code == 200
    assert r.json() == {"code": 200, "num_records_imported": 2, "status": "OK"}


@pytest.mark.parametrize("where", ["query", "body"])
async def test_callback_and_img_from_query_or_body(client: AppClient, where: str) -> None:
    data = quote(json.dumps(record()), safe="")
    for extra, check in (
        ("callback=cb", lambda r: r.text == "cb(1)"),
        ("img=1", lambda r: r.content.startswith(GIF_MAGIC)),
    ):
        if where == "query":
            r = await client.http.post(f"/engage?{extra}", content=f"data={data}", headers=FORM)
        else:
            r = await client.http.post("/engage", content=f"data={data}&{extra}", headers=FORM)
        assert r.status_code == 200
        assert check(r), (extra, r.content)


# --- default and verbose responses ----------------------------------------------------------


DATA_ERRORS = [
    ("", "data, missing or empty"),
    ("!!!not-base64!!!", "data, invalid base64 encoding"),
    ("{not json", "data, invalid json"),
    (base64.b64encode(b"{not json").decode(), "data, invalid json"),
    ("[]", "data, missing or empty"),
]


@pytest.mark.parametrize(("data", "message"), DATA_ERRORS)
async def test_data_errors(client: AppClient, data: str, message: str) -> None:
    r = await client.http.post("/engage", data={"data": data})
    assert (r.status_code, r.text) == (200, "0")
    r = await client.http.post("/engage", data={"data": data, "verbose": "1"})
    assert r.status_code == 200
    assert r.json() == {"status": 0, "error": message}


async def test_missing_data_parameter(client: AppClient) -> None:
    r = await client.http.get("/engage?verbose=1")
    assert r.json() == {"status": 0, "error": "data, missing or empty"}
    r = await client.http.post("/engage", content=b"", headers=FORM)
    assert (r.status_code, r.text) == (200, "0")


RECORD_ERRORS = [
    ({"$distinct_id": "x", "$set": {"a": 1}}, "$token, missing or empty"),
    ({"$token": "", "$distinct_id": "x", "$set": {"a": 1}}, "$token, missing or empty"),
    ({"$token": TOKEN, "$set": {"a": 1}}, "$distinct_id, missing or empty"),
    ({"$token": TOKEN, "$distinct_id": "", "$set": {"a": 1}}, "$distinct_id, missing or empty"),
]


@pytest.mark.parametrize(("rec", "message"), RECORD_ERRORS)
async def test_record_errors_verbose_messages(
    client: AppClient, rec: dict[str, Any], message: str
) -> None:
    r = await client.http.post("/engage?verbose=1", json=[rec])
    assert r.json() == {"status": 0, "error": message}
    r = await client.http.post("/engage", json=[rec])
    assert r.text == "0"
    assert stored(client, "x") is None


async def test_verbose_reports_first_invalid_record(client: AppClient) -> None:
    bad1 = {"$token": TOKEN, "$set": {"a": 1}}
    bad2 = {"$distinct_id": "x", "$set": {"a": 1}}
    r = await client.http.post("/engage?verbose=1", json=[bad1, bad2])
    assert r.json() == {"status": 0, "error": "$distinct_id, missing or empty"}


async def test_record_without_known_operation_is_invalid(client: AppClient) -> None:
    rec = {"$token": TOKEN, "$distinct_id": "noop", "$frobnicate": {"a": 1}}
    r = await client.http.post("/engage?verbose=1", json=[rec])
    body = r.json()
    assert body["status"] == 0
    assert body["error"].startswith("record, ")
    assert stored(client, "noop") is None


async def test_valid_records_applied_when_others_fail(client: AppClient) -> None:
    recs = [
        {"$token": TOKEN, "$set": {"a": 1}},
        record("good-1", set={"a": 1}),
        {"$token": TOKEN, "$distinct_id": "bad-time", "$time": "yesterday", "$set": {"a": 1}},
        record("good-2", add={"n": 3}),
    ]
    r = await client.http.post("/engage?verbose=1", json=recs)
    assert r.json() == {"status": 1, "error": None}
    assert user_props(client, "good-1") == {"a": 1}
    assert user_props(client, "good-2") == {"n": 3}
    assert stored(client, "bad-time") is None


# --- strict ---------------------------------------------------------------------------------


async def test_strict_all_valid(client: AppClient) -> None:
    r = await client.http.post("/engage?strict=1", json=[record("a"), record("b")])
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"code": 200, "num_records_imported": 2, "status": "OK"}


async def test_strict_failed_records_shape(client: AppClient) -> None:
    recs = [
        record("ok-1"),
        {"$token": TOKEN, "$distinct_id": "no-op"},
        {"$token": TOKEN, "$distinct_id": "bad-set", "$set": "not an object"},
        record("ok-2", set={"fine": 1, "$ip": "1.2.3.4"}),
        {"$token": TOKEN, "$set": {"a": 1}},
    ]
    r = await client.http.post("/engage?strict=1", json=recs)
    assert r.status_code == 400
    body = r.json()
    assert set(body) == {"code", "error", "failed_records", "num_records_imported", "status"}
    assert body["code"] == 400
    assert body["status"] == "Bad Request"
    assert body["error"] == "some data points in the request failed validation"
    assert body["num_records_imported"] == 2
    failed = body["failed_records"]
    assert [f["index"] for f in failed] == [1, 2, 3, 4]
    for f in failed:
        assert set(f) == {"index", "$distinct_id", "field", "message"}
        assert isinstance(f["message"], str) and f["message"]
    assert failed[0]["$distinct_id"] == "no-op"
    assert failed[1]["$distinct_id"] == "bad-set"
    assert failed[1]["field"] == "$set"
    assert failed[2] == {
        "index": 3,
        "$distinct_id": "ok-2",
        "field": "$set.$ip",
        "message": failed[2]["message"],
    }
    assert failed[3]["field"] == "$distinct_id"
    # the valid records were applied, the reserved key was not stored
    assert user_props(client, "ok-1") == {"plan": "pro"}
    assert user_props(client, "ok-2") == {"fine": 1}
    assert stored(client, "no-op") is None
    assert stored(client, "bad-set") is None


async def test_strict_request_level_errors(client: AppClient) -> None:
    for data in ("", "{not json", "!!!"):
        r = await client.http.post("/engage", data={"data": data, "strict": "1"})
        assert r.status_code == 400
        body = r.json()
        assert set(body) == {"code", "error", "status"}
        assert body["code"] == 400 and body["status"] == "Bad Request"
        assert body["error"].startswith("data, ")


async def test_strict_takes_precedence(client: AppClient) -> None:
    params = {"strict": "1", "verbose": "1", "callback": "cb", "img": "1"}
    r = await client.http.post("/engage", params=params, json=[record("p1")])
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"code": 200, "num_records_imported": 1, "status": "OK"}
    bad = {"$token": TOKEN, "$set": {"a": 1}}
    r = await client.http.post("/engage", params=params, json=[bad])
    assert r.status_code == 400
    assert r.json()["num_records_imported"] == 0


async def test_strict_ignores_a_callback_it_would_refuse(client: AppClient) -> None:
    r = await client.http.post(
        "/engage", params={"strict": "1", "callback": "alert(1)//"}, json=[record("p2")]
    )
    assert r.status_code == 200
    assert "alert" not in r.text
    assert user_props(client, "p2") == {"plan": "pro"}


# --- JSONP and image ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["cb", "mixpanel._jsc", "mp.cb[0]", "$_x9", "a.b.c", "(function(){})"]
)
async def test_jsonp_callback(client: AppClient, name: str) -> None:
    r = await client.http.get("/engage", params={"data": b64(record("cb")), "callback": name})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/javascript")
    assert r.text == f"{name}(1)"
    r = await client.http.get(
        "/engage", params={"data": b64(record("cb")), "callback": name, "verbose": "1"}
    )
    assert r.text.startswith(name + "(") and r.text.endswith(")")
    assert json.loads(r.text[len(name) + 1 : -1]) == {"status": 1, "error": None}


async def test_jsonp_callback_with_invalid_record(client: AppClient) -> None:
    r = await client.http.get(
        "/engage", params={"data": b64({"$token": TOKEN}), "callback": "cb", "verbose": "1"}
    )
    assert r.text == 'cb({"status":0,"error":"$distinct_id, missing or empty"})'


@pytest.mark.parametrize(
    "name",
    [
        "alert(1)//",
        "<script>alert(1)</script>",
        "a;b",
        "a b",
        "cb()",
        "x=1",
        "1abc",
        "a.",
        "a[b]",
        "(function(){alert(1)})",
        "a" * 300,
    ],
)
async def test_reflected_script_callbacks_refused(client: AppClient, name: str) -> None:
    r = await client.http.get("/engage", params={"data": b64(record("xss")), "callback": name})
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert set(r.json()) == {"code", "error", "status"}
    assert name not in r.text
    assert stored(client, "xss") is None


async def test_img_answers_a_gif(client: AppClient) -> None:
    r = await client.http.get("/engage", params={"data": b64(record("img")), "img": "1"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/gif"
    assert r.content.startswith(GIF_MAGIC)
    assert user_props(client, "img") == {"plan": "pro"}
    r = await client.http.get("/engage", params={"data": "", "img": "1"})
    assert r.headers["content-type"] == "image/gif"


# --- headers: nosniff and CORS -------------------------------------------------------------


async def test_nosniff_on_every_response(client: AppClient) -> None:
    auth = client.auth(TOKEN)
    responses = [
        await client.http.post("/engage", json=[record()]),
        await client.http.post("/engage?verbose=1", json=[{"$token": TOKEN}]),
        await client.http.post("/engage?strict=1", json=[{"$token": TOKEN}]),
        await client.http.get("/engage", params={"callback": "a;b", "data": b64(record())}),
        await client.http.get("/engage", params={"img": "1", "data": b64(record())}),
        await client.http.options("/engage", headers={"Origin": "http://x.test"}),
        await client.http.post("/track", data={"data": "{}"}),
        await client.http.get("/nowhere"),
        await client.http.get("/api/query/engage"),
        await client.http.get("/api/query/engage", headers=auth),
        await client.http.get("/healthz"),
    ]
    for r in responses:
        assert r.headers.get("x-content-type-options") == "nosniff", r.request.url


ORIGIN = "http://localhost:8769"


@pytest.mark.parametrize(
    "path", ["/engage", "/engage/", "/track/", "/import", "/decide", "/flags/", "/record"]
)
async def test_cors_echo_origin_with_credentials(client: AppClient, path: str) -> None:
    r = await client.http.post(
        path + "?ip=1", data={"data": b64(record("cors"))}, headers={"Origin": ORIGIN}
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert r.headers["access-control-allow-credentials"] == "true"


async def test_cors_on_error_responses_of_ingestion(client: AppClient) -> None:
    r = await client.http.get(
        "/engage", params={"callback": "a;b", "data": "x"}, headers={"Origin": ORIGIN}
    )
    assert r.status_code == 400
    assert r.headers["access-control-allow-origin"] == ORIGIN


async def test_no_cors_headers_without_origin(client: AppClient) -> None:
    r = await client.http.post("/engage", json=[record()])
    assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("path", ["/engage/", "/track/", "/groups/"])
async def test_cors_preflight(client: AppClient, path: str) -> None:
    r = await client.http.options(
        path + "?ip=1&_=1",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-cap",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert r.headers["access-control-allow-credentials"] == "true"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "x-cap" in r.headers["access-control-allow-headers"].lower()


async def test_query_api_sends_no_cors_allow_headers(client: AppClient) -> None:
    auth = client.auth(TOKEN)
    for method in ("GET", "POST", "OPTIONS"):
        r = await client.http.request(
            method,
            "/api/query/engage",
            headers={**auth, "Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in r.headers, method
        assert "access-control-allow-credentials" not in r.headers, method


# --- event endpoints ------------------------------------------------------------------------

EVENT_MESSAGE = "events are not stored here; send only engage and groups to Peoplebase"


@pytest.mark.parametrize(
    "path", ["/track", "/track/", "/import", "/import/", "/decide", "/flags/", "/record"]
)
async def test_event_endpoints_answer_zero(client: AppClient, path: str) -> None:
    event = {"event": "Signed Up", "properties": {"token": TOKEN, "distinct_id": "ev"}}
    r = await client.http.post(path, data={"data": json.dumps(event)})
    assert (r.status_code, r.text) == (200, "0")
    r = await client.http.get(path, params={"data": b64(event), "verbose": "1"})
    assert r.status_code == 200
    assert r.json() == {"status": 0, "error": EVENT_MESSAGE}
    assert stored(client, "ev") is None


@pytest.mark.parametrize("path", ["/groups", "/groups/"])
async def test_groups_answers_zero_and_stores_nothing(client: AppClient, path: str) -> None:
    """SPEC §1: /groups is accepted and answered, group profiles are not stored yet."""
    # a $distinct_id too: were the record applied as an /engage one, profile "ev" would exist
    update = {
        "$token": TOKEN,
        "$distinct_id": "ev",
        "$group_key": "company",
        "$group_id": "Acme",
        "$set": {"a": 1},
    }
    r = await client.http.post(path, data={"data": json.dumps([update])})
    assert (r.status_code, r.text) == (200, "0")
    r = await client.http.get(path, params={"data": b64([update]), "verbose": "1"})
    assert r.status_code == 200
    assert r.json() == {
        "status": 0,
        "error": "group profiles are not stored here yet; send only engage and groups to "
        "Peoplebase",
    }
    assert stored(client, "ev") is None


async def test_event_endpoint_verbose_in_form_body(client: AppClient) -> None:
    """The Python SDK sends verbose=1 in the body of /track too."""
    event = {"event": "e", "properties": {"token": TOKEN, "distinct_id": "ev"}}
    r = await client.http.post(
        "/track", content=f"data={quote_plus(json.dumps(event))}&verbose=1&ip=0", headers=FORM
    )
    assert r.status_code == 200
    assert r.json() == {"status": 0, "error": EVENT_MESSAGE}


async def test_event_endpoints_are_counted(client: AppClient) -> None:
    before = client.app.counters["events_ignored"]
    for path in ("/track", "/import/", "/decide"):
        await client.http.post(path, data={"data": "{}"})
    assert client.app.counters["events_ignored"] == before + 3


# --- tokens ---------------------------------------------------------------------------------


async def test_open_mode_creates_projects(client: AppClient) -> None:
    r = await client.http.post("/engage", json=[record("o1") | {"$token": "brand-new"}])
    assert r.text == "1"
    assert client.app.store.project_by_token("brand-new") is not None
    assert user_props(client, "o1", "brand-new") == {"plan": "pro"}


async def test_closed_mode_rejects_unknown_tokens(closed_client: AppClient) -> None:
    c = closed_client
    r = await c.http.post("/engage?verbose=1", json=[record("c1")])
    assert r.json() == {"status": 0, "error": "$token, unknown project"}
    r = await c.http.post("/engage?strict=1", json=[record("c1")])
    assert r.status_code == 400
    failed = r.json()["failed_records"]
    assert failed == [
        {"index": 0, "$distinct_id": "c1", "field": "$token", "message": "unknown project"}
    ]
    assert c.app.store.project_by_token(TOKEN) is None
    assert c.app.store.list_projects() == []


async def test_closed_mode_accepts_created_projects(closed_client: AppClient) -> None:
    c = closed_client
    c.app.store.create_project(TOKEN)
    recs = [record("c2"), record("c3") | {"$token": "still-unknown"}]
    r = await c.http.post("/engage?strict=1", json=recs)
    assert r.status_code == 400
    body = r.json()
    assert body["num_records_imported"] == 1
    assert [f["index"] for f in body["failed_records"]] == [1]
    assert user_props(c, "c2") == {"plan": "pro"}
    assert c.app.store.project_by_token("still-unknown") is None


# --- client address and geolocation parameters are accepted ---------------------------------


async def test_ip_parameter_values_accepted(client: AppClient) -> None:
    for ip in ("0", "1"):
        r = await client.http.get("/engage", params={"data": b64(record("ip" + ip)), "ip": ip})
        assert r.text == "1"
        assert user_props(client, "ip" + ip) == {"plan": "pro"}
