"""The server process's garbage-collection schedule (collector.settle_server), and what makes
it safe: a request, whatever its outcome, leaves no reference cycles behind."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from urllib.parse import quote_from_bytes

import orjson
import pytest

from peoplebase.collector import YOUNG_THRESHOLD, settle_server

from .conftest import AppClient


@pytest.fixture
def thawed() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    for thread in threading.enumerate():  # stopped by each test; its last freeze done
        if thread.name == "peoplebase-gc":
            thread.join(10.0)
    gc.unfreeze()  # leave the test process as it was
    gc.set_threshold(*thresholds)


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_settle_server_freezes_what_exists_and_collects_the_young_less_often(
    thawed: None,
) -> None:
    _, middle, old = gc.get_threshold()
    kept = [Node() for _ in range(10)]
    stop = settle_server(full_every=3600.0)
    try:
        assert gc.get_threshold() == (YOUNG_THRESHOLD, middle, old)
        frozen = gc.get_freeze_count()
        assert frozen >= len(kept)
        walked = {id(o) for o in gc.get_objects()}  # the generations a collection walks
        assert not any(id(node) in walked for node in kept)
        gone = weakref.ref(kept[0])
        del kept
        assert gone() is None  # frozen objects are still freed by reference counting
        assert gc.get_freeze_count() < frozen
    finally:
        stop.set()


def test_settle_server_collects_garbage_cycles_before_freezing(thawed: None) -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    del a, b
    stop = settle_server(full_every=3600.0)
    stop.set()
    assert ref() is None  # not frozen along, where only the periodic collection would free it


def test_the_periodic_full_collection_frees_cycles_frozen_along(thawed: None) -> None:
    stop = settle_server(full_every=0.05)
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a
        ref = weakref.ref(a)
        gc.freeze()  # as if it had been frozen while still in use
        del a, b
        gc.collect()
        assert ref() is not None  # a collection does not look at frozen objects
        deadline = time.monotonic() + 10.0
        while ref() is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ref() is None
    finally:
        stop.set()


async def call(
    client: AppClient,
    method: str,
    path: str,
    query: bytes = b"",
    body: bytes = b"",
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> int:
    """One request straight through the ASGI interface (an HTTP client makes cycles of its
    own); returns the status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"peoplebase.test"), *headers],
        "client": ("203.0.113.9", 5555),
        "server": ("peoplebase.test", 80),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, object]:
        return messages.pop() if messages else {"type": "http.disconnect"}

    statuses: list[int] = []

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(int(message["status"]))  # type: ignore[call-overload]

    await client.app(scope, receive, send)
    return statuses[0]


FORM = (b"content-type", b"application/x-www-form-urlencoded")


def _form(records: object) -> bytes:
    return b"data=" + quote_from_bytes(orjson.dumps(records)).encode()


async def test_requests_of_every_outcome_leave_no_reference_cycles(client: AppClient) -> None:
    """With settle_server, cycles would wait for YOUNG_THRESHOLD net allocations: this checks
    that the server's request paths (accepted, rejected, malformed, too large, unknown route,
    wrong method, failed and bad queries, a query answered) make none."""
    ((name, secret),) = client.auth("tok").items()
    auth = ((name.lower().encode(), secret.encode()),)
    good = [{"$token": "tok", "$distinct_id": f"u{i}", "$set": {"plan": i}} for i in range(20)]
    requests: list[Callable[[], Awaitable[int]]] = [
        lambda: call(client, "POST", "/engage", body=_form(good), headers=(FORM,)),
        lambda: call(client, "POST", "/engage", b"verbose=1", _form([{"$token": "tok"}]), (FORM,)),
        lambda: call(client, "POST", "/engage", body=b"data=%7Bnot+json", headers=(FORM,)),
        lambda: call(client, "POST", "/engage", body=b"data=" + b"A" * (11 * 1024 * 1024)),
        lambda: call(client, "GET", "/nothing/here"),
        lambda: call(client, "PUT", "/engage"),
        lambda: call(client, "GET", "/api/query/engage", b"distinct_id=u1"),
        lambda: call(client, "GET", "/api/query/engage", b"where=%28%28", headers=auth),
        lambda: call(client, "GET", "/api/query/engage", b"distinct_id=u1", headers=auth),
    ]
    statuses = set()
    for send in requests:  # once first: imports, caches and the project are made by now
        statuses.add(await send())
    assert statuses == {200, 400, 401, 404, 405, 413}
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            for send in requests:
                await send()
        found = gc.collect()
    finally:
        gc.enable()
    assert found == 0, f"{found} objects in reference cycles after 180 requests"
