"""Hostile and malformed input: each case gets a clear answer, never a 500, never a hang.

Body-size limits and gzip bombs are in test_http_limits.py; this file covers the rest of the
list in docs/security.md: deep nesting, huge numbers and number strings, invalid UTF-8, lone
surrogates, NUL bytes, duplicate keys, 10k-element lists, 2000 records of 1 MB, slow-loris
clients and thousands of idle connections (the last two on a real server).
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from peoplebase.app import PeoplebaseApp
from peoplebase.settings import Settings
from tests.conftest import AppClient, ServerProcess

T = "hostile"


async def post(client: AppClient, body: bytes, query: str = "verbose=1") -> httpx.Response:
    return await client.http.post(
        f"/engage?{query}", content=body, headers={"content-type": "application/json"}
    )


async def profile(client: AppClient, distinct_id: str) -> dict[str, Any] | None:
    r = await client.http.post(
        "/api/query/engage", data={"distinct_id": distinct_id}, headers=client.auth(T)
    )
    assert r.status_code == 200
    results = r.json()["results"]
    return dict(results[0]["$properties"]) if results else None


def record(**ops: Any) -> dict[str, Any]:
    return {"$token": T, "$distinct_id": "u", **ops}


INVALID_JSON = {"status": 0, "error": "data, invalid json"}


async def test_deeply_nested_json_is_invalid_json(client: AppClient) -> None:
    started = time.monotonic()
    r = await post(client, b"[" * 200_000 + b"]" * 200_000)
    assert (r.status_code, r.json()) == (200, INVALID_JSON)
    strict = await post(client, b"{" * 100_000, "strict=1")
    assert strict.status_code == 400 and strict.json()["error"] == "data, invalid json"
    assert time.monotonic() - started < 10


async def test_deep_property_value_is_skipped_and_reported(client: AppClient) -> None:
    deep: Any = 1
    for _ in range(200):
        deep = {"b": deep}
    body = orjson.dumps(record(**{"$set": {"deep": deep, "ok": 1}}))
    r = await post(client, body, "strict=1")
    assert r.status_code == 400
    failed = r.json()["failed_records"]
    assert [f["field"] for f in failed] == ["$set.deep"] and r.json()["num_records_imported"] == 1
    assert await profile(client, "u") == {"ok": 1, **_last_seen(await profile(client, "u"))}


def _last_seen(props: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (props or {}).items() if k == "$last_seen"}


@pytest.mark.parametrize(
    "literal", [b"1e400", b"-1e400", b"9" * 5000, b"NaN", b"Infinity"], ids=lambda b: str(b[:8])
)
async def test_numbers_out_of_json_range_are_invalid_json(
    client: AppClient, literal: bytes
) -> None:
    body = b'{"$token":"hostile","$distinct_id":"u","$add":{"n":' + literal + b"}}"
    r = await post(client, body)
    assert (r.status_code, r.json()) == (200, INVALID_JSON)
    assert await profile(client, "u") is None


async def test_huge_integer_becomes_a_float(client: AppClient) -> None:
    body = b'{"$token":"hostile","$distinct_id":"u","$add":{"n":' + b"9" * 30 + b"}}"
    assert (await post(client, body)).json() == {"status": 1, "error": None}
    props = await profile(client, "u")
    assert props is not None and props["n"] == 1e30 and isinstance(props["n"], float)


@pytest.mark.parametrize("digits", [400, 5000, 100_000])
async def test_huge_number_strings_are_skipped_not_a_500(client: AppClient, digits: int) -> None:
    body = orjson.dumps(record(**{"$add": {"n": "9" * digits, "m": "2"}}))
    r = await post(client, body, "strict=1")
    assert r.status_code == 400, r.text
    (failed,) = r.json()["failed_records"]
    assert failed["field"] == "$add.n" and "number out of range" in failed["message"]
    props = await profile(client, "u")
    assert props is not None and props["m"] == 2 and "n" not in props


async def test_huge_number_string_as_time_is_rejected(client: AppClient) -> None:
    body = orjson.dumps(record(**{"$time": "9" * 5000, "$set": {"a": 1}}))
    r = await post(client, body)
    assert r.json()["status"] == 0 and r.json()["error"].startswith("$time, ")


async def test_invalid_utf8_everywhere_is_a_clear_data_error(client: AppClient) -> None:
    raw = b'{"$token":"hostile","$distinct_id":"u","$set":{"a":"\xff\xfe"}}'
    assert (await post(client, raw)).json() == INVALID_JSON
    form = await client.http.post(
        "/engage?verbose=1",
        content=b"data=" + raw,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert form.json() == {"status": 0, "error": "data, invalid utf-8 in the form body"}
    # An unreadable query string cannot say verbose=1 either: the plain answer `0`.
    query = await client.http.get("/engage?verbose=1&data=%7B%ff%fe")
    assert (query.status_code, query.text) == (200, "0")
    assert await profile(client, "u") is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"$token":"hostile","$distinct_id":"u","$set":{"a":"\\ud800"}}',
        b'{"$token":"hostile","$distinct_id":"u","$set":{"\\udc00":1}}',
        b'{"$token":"hostile","$distinct_id":"\\ud83d","$set":{"a":1}}',
    ],
    ids=["value", "name", "distinct_id"],
)
async def test_lone_surrogates_are_invalid_json(client: AppClient, body: bytes) -> None:
    assert (await post(client, body)).json() == INVALID_JSON
    assert await profile(client, "u") is None


async def test_paired_surrogate_escapes_are_one_character(client: AppClient) -> None:
    body = b'{"$token":"hostile","$distinct_id":"u","$set":{"e":"\\ud83d\\ude00"}}'
    assert (await post(client, body)).json() == {"status": 1, "error": None}
    props = await profile(client, "u")
    assert props is not None and props["e"] == "\N{GRINNING FACE}"


@pytest.mark.all_backends
async def test_nul_bytes_are_refused_with_a_clear_message(client: AppClient, backend: str) -> None:
    """PostgreSQL cannot store NUL: both backends refuse it the same way, never a 500."""
    nul_id = orjson.dumps({"$token": T, "$distinct_id": "u\x00v", "$set": {"a": 1}})
    r = await post(client, nul_id, "strict=1")
    assert r.status_code == 400
    (failed,) = r.json()["failed_records"]
    assert failed["field"] == "$distinct_id" and failed["$distinct_id"] == "uv"
    assert failed["message"] == "NUL characters (\\u0000) are not accepted"
    body = orjson.dumps(
        record(
            **{
                "$set": {"a\x00b": 1, "s": "c\x00d", "o": {"k\x00": 1}, "plain": 1},
                "$union": {"l": ["x\x00"]},
                "$unset": ["z\x00"],
            }
        )
    )
    r = await post(client, body, "strict=1")
    assert r.status_code == 400, r.text
    assert r.json()["num_records_imported"] == 1
    fields = sorted(f["field"] for f in r.json()["failed_records"])
    assert fields == ["$set.ab", "$set.o", "$set.s", "$union.l", "$unset[0]"]
    props = await profile(client, "u")
    assert props is not None and props["plain"] == 1
    assert not {"a\x00b", "s", "o", "l"} & set(props)


async def test_duplicate_keys_last_one_wins(client: AppClient) -> None:
    body = (
        b'{"$token":"other","$token":"hostile","$distinct_id":"x","$distinct_id":"u",'
        b'"$set":{"d":1,"d":2},"$set":{"e":3}}'
    )
    assert (await post(client, body)).json() == {"status": 1, "error": None}
    props = await profile(client, "u")
    assert props is not None and props["e"] == 3 and "d" not in props
    assert await profile(client, "x") is None


async def test_ten_thousand_element_lists(client: AppClient) -> None:
    body = orjson.dumps(record(**{"$union": {"l": list(range(10_000))}}))
    assert (await post(client, body)).json() == {"status": 1, "error": None}
    props = await profile(client, "u")
    assert props is not None and props["l"] == list(range(10_000))
    many = orjson.dumps([record(**{"$add": {"n": 1}})] * 10_000)
    r = await post(client, many)
    assert r.status_code == 400
    assert r.json()["error"] == "request has 10000 records; at most 2000 are accepted per request"
    props = await profile(client, "u")
    assert props is not None and "n" not in props


async def test_two_thousand_records_of_one_megabyte_are_not_read_past_the_limit(
    tmp_path: Path,
) -> None:
    """~2 GB offered as a stream: 413 once the 10 MiB limit is passed; the rest never read."""
    app = PeoplebaseApp(Settings(db=str(tmp_path / "big.db"), tokens="open"))
    app.startup()
    client = AppClient(app)
    produced = 0
    one = orjson.dumps(record(**{"$set": {"big": "x" * 200}, "$append": {"l": "y" * 999_000}}))

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced
        yield b"["
        for i in range(2000):
            chunk = (b"," if i else b"") + one
            produced += len(chunk)
            yield chunk
        yield b"]"

    try:
        r = await client.http.post(
            "/engage", content=body(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413
        assert r.json()["error"] == f"request exceeds max limit of {10 * 1024 * 1024} bytes"
        assert produced <= 10 * 1024 * 1024 + 2 * len(one)  # stopped at the limit
    finally:
        await client.http.aclose()
        app.shutdown()


# --- slow and idle clients, on a real server --------------------------------------------------


@pytest.fixture
def quick_server(tmp_path: Path) -> Any:
    server = ServerProcess(
        tmp_path / "slow.db", "--tokens", "open", "--request-timeout", "1.5"
    ).start()
    try:
        yield server
    finally:
        assert server.stop() == 0


def closed_within(sock: socket.socket, seconds: float, drip: bytes = b"") -> float | None:
    """Seconds until the server closes the connection (dripping `drip` a byte at a time)."""
    started = time.monotonic()
    sock.settimeout(0.1)
    i = 0
    while time.monotonic() - started < seconds:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - started
        if i < len(drip):
            try:
                sock.sendall(drip[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started
            i += 1
    return None


@pytest.mark.e2e
def test_slow_loris_headers_are_cut_off(quick_server: ServerProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", quick_server.port))
    with sock:
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
        took = closed_within(sock, 10, head)
    assert took is not None and took < 6, took
    log = quick_server.log_path.read_text()
    assert "no complete request within 1.5s" in log


@pytest.mark.e2e
def test_slow_body_is_cut_off_and_nothing_applied(quick_server: ServerProcess) -> None:
    data = orjson.dumps({"$token": T, "$distinct_id": "slow", "$set": {"a": 1}})
    body = b"data=" + data  # complete as a form, but shorter than declared
    sock = socket.create_connection(("127.0.0.1", quick_server.port))
    with sock:
        sock.sendall(
            b"POST /engage HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: " + str(len(body) + 50).encode() + b"\r\n\r\n" + body
        )
        took = closed_within(sock, 10)
    assert took is not None and took < 6, took
    # A whole request still works, and the cut one left nothing behind.
    r = httpx.post(
        quick_server.url + "/engage", json={"$token": T, "$distinct_id": "ok", "$set": {"b": 2}}
    )
    assert (r.status_code, r.text) == (200, "1")
    body_json = quick_server.query(T)
    assert [p["$distinct_id"] for p in body_json["results"]] == ["ok"]


@pytest.mark.e2e
def test_thousands_of_idle_connections(quick_server: ServerProcess) -> None:
    idle = []
    try:
        for _ in range(2000):
            idle.append(socket.create_connection(("127.0.0.1", quick_server.port), timeout=10))
        started = time.monotonic()
        r = httpx.post(
            quick_server.url + "/engage",
            json={"$token": T, "$distinct_id": "busy", "$set": {"a": 1}},
            timeout=20,
        )
        assert (r.status_code, r.text) == (200, "1")
        assert time.monotonic() - started < 10
        # The idle ones are closed by the server once the request timeout passes.
        deadline = time.monotonic() + 15
        open_ = list(idle)
        while open_ and time.monotonic() < deadline:
            still = []
            for s in open_:
                s.settimeout(0.001)
                try:
                    if s.recv(1) != b"":
                        still.append(s)
                except TimeoutError:
                    still.append(s)
                except ConnectionResetError:
                    pass
            open_ = still
            time.sleep(0.2)
        assert not open_, f"{len(open_)} idle connections still open"
    finally:
        for s in idle:
            s.close()
