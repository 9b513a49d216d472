"""Property-based fuzzing of the whole path: bytes on the wire → records → operations → store.

Hypothesis builds requests from plausible and hostile parts (records with any mix of
operations and JSON values, non-objects in the list, odd strings, every request form and
encoding) and sends them to the real app (real SQLite file, real writer). For every request:

- never a 5xx;
- strict=1: each record has exactly one outcome: imported, or rejected with a failed_records
  entry (skips are extra notes on imported records), so imported + rejected == records;
- the app's own counters agree: valid + rejected grew by the number of records;
- verbose=1: status 1 exactly when some record was imported.

PEOPLEBASE_FUZZ_EXAMPLES sets the number of requests (docs/reliability.md gives a long run).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peoplebase.app import PeoplebaseApp
from peoplebase.settings import Settings
from tests.conftest import AppClient

EXAMPLES = int(os.environ.get("PEOPLEBASE_FUZZ_EXAMPLES", "300"))

OPS = ("$set", "$set_once", "$add", "$union", "$append", "$remove", "$unset", "$delete")

weird_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", " ", "\x00", "a\x00b", "$token", "$distinct_id", "\u202e", "🙂" * 80]),
    st.text(alphabet="0123456789.-e+", min_size=1, max_size=400),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    weird_text,
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(weird_text, inner, max_size=5)
    ),
    max_leaves=15,
)
op_values = st.one_of(st.dictionaries(weird_text, values, max_size=4), values)


@st.composite
def records(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(values)  # not an object at all
    rec: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        rec["$token"] = draw(st.sampled_from(["fuzz", "fuzz2"]) | weird_text)
    if draw(st.integers(0, 9)):
        rec["$distinct_id"] = draw(st.sampled_from(["a", "b", "c"]) | scalars)
    if draw(st.booleans()):
        rec["$time"] = draw(
            st.one_of(
                st.floats(min_value=0, max_value=4e12),
                st.integers(min_value=-10, max_value=2**63),
                weird_text,
            )
        )
    for op in draw(st.lists(st.sampled_from(OPS), max_size=3, unique=True)):
        rec[op] = draw(op_values)
    if draw(st.integers(0, 4)) == 0:
        rec[draw(weird_text)] = draw(values)
    return rec


def _records_in(payload: bytes) -> int | None:
    """How many records a body holds if it is still JSON after damage, else None."""
    try:
        parsed = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if isinstance(parsed, list):
        return len(parsed)
    return 1 if isinstance(parsed, dict) else None


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes, int | None]:
    """(method, path with query, headers, body, number of records or None if not a list)."""
    batch = draw(st.lists(records(), min_size=1, max_size=12))
    single = len(batch) == 1 and isinstance(batch[0], dict) and draw(st.booleans())
    payload = orjson.dumps(batch[0] if single else batch)
    count = len(batch)
    if draw(st.integers(0, 19)) == 0:  # a cut or damaged body
        cut = draw(st.integers(0, len(payload)))
        payload = payload[:cut] + draw(st.binary(max_size=8))
        count = _records_in(payload)  # the damage may leave it readable (e.g. nothing cut)
    form = draw(st.sampled_from(["json", "form-json", "form-b64", "get-b64", "get-json"]))
    query = "strict=1" if draw(st.booleans()) else "verbose=1"
    headers: dict[str, str] = {}
    if form == "json":
        body = payload
        headers["content-type"] = "application/json"
    elif form == "form-json":
        body = b"data=" + quote(payload).encode()
        headers["content-type"] = "application/x-www-form-urlencoded"
    elif form == "form-b64":
        body = b"data=" + quote(base64.b64encode(payload)).encode()
        headers["content-type"] = draw(st.sampled_from(["application/x-www-form-urlencoded", ""]))
    else:
        encoded = base64.b64encode(payload) if form == "get-b64" else payload
        return "GET", f"/engage?{query}&data={quote(encoded)}", headers, b"", count
    if draw(st.booleans()):
        body = gzip.compress(body)
        headers["content-encoding"] = "gzip"
    return "POST", f"/engage?{query}", headers, body, count


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AppClient, Any]]:
    db = Path(tmp_path_factory.mktemp("fuzz")) / "fuzz.db"
    app = PeoplebaseApp(Settings(db=str(db), tokens="open", max_properties=50))
    app.startup()
    loop = asyncio.new_event_loop()
    client = AppClient(app)
    try:
        yield client, loop
    finally:
        loop.run_until_complete(client.http.aclose())
        loop.close()
        app.shutdown()


@given(request=requests())
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
def test_every_record_has_exactly_one_outcome(
    fuzz_app: tuple[AppClient, Any], request: tuple[str, str, dict[str, str], bytes, int | None]
) -> None:
    client, loop = fuzz_app
    method, url, headers, body, count = request
    counters = dict(client.app.counters)  # the app's own per-record outcome counters
    r = loop.run_until_complete(client.http.request(method, url, headers=headers, content=body))
    assert r.status_code < 500, r.text
    assert r.headers["x-content-type-options"] == "nosniff"
    valid = client.app.counters["records_valid"] - counters["records_valid"]
    rejected = client.app.counters["records_rejected"] - counters["records_rejected"]
    if r.headers["content-type"].startswith("text/plain"):  # the query string was unreadable
        assert (r.status_code, r.text, valid, rejected) == (200, "0", 0, 0)
        return
    answer = r.json()
    if "strict=1" in url:
        if r.status_code == 200:
            assert answer["num_records_imported"] == valid
            assert rejected == 0
        else:
            assert r.status_code == 400
            if "failed_records" in answer:
                indices = {
                    f["index"]
                    for f in answer["failed_records"]
                    if not f["message"].startswith("skipped: ")
                }
                assert len(indices) == rejected
                assert answer["num_records_imported"] == valid
            else:  # nothing could be read: no record has an outcome
                assert answer["error"].startswith(("data, ", "request has "))
                assert valid == rejected == 0
    else:
        assert r.status_code in (200, 400), r.text
        if r.status_code == 200:
            assert answer["status"] == (1 if valid else 0)
    if valid or rejected:
        assert count is not None and valid + rejected == count
