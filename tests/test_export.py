"""Export over HTTP (NDJSON, CSV) and from the CLI; a small-scale bounded-memory run."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from peoplebase.query.export import export_to
from peoplebase.store import SqliteStore
from tests.conftest import AppClient

pytestmark = pytest.mark.all_backends  # tests taking `client` run on SQLite and on PostgreSQL


async def seed(client: AppClient, n: int) -> None:
    records = [
        {
            "$token": "t",
            "$distinct_id": f"u{i:04}",
            "$set": {
                "i": i,
                "plan": "pro" if i % 2 else "free",
                "note": "a,b\nc" if i == 3 else "x",
            },
        }
        for i in range(n)
    ]
    for k in range(0, n, 2000):
        r = await client.http.post("/engage", json=records[k : k + 2000])
        assert r.text == "1"


async def test_http_ndjson_and_csv(client: AppClient) -> None:
    await seed(client, 2500)
    auth = client.auth("t")
    r = await client.http.post(
        "/api/query/export", data={"where": 'properties["plan"] == "pro"'}, headers=auth
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    lines = [orjson.loads(x) for x in r.content.splitlines()]
    assert len(lines) == 1250 and all(x["$properties"]["plan"] == "pro" for x in lines)
    assert [x["$distinct_id"] for x in lines] == sorted(x["$distinct_id"] for x in lines)
    r = await client.http.post("/api/query/export", data={"format": "csv"}, headers=auth)
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0][0] == "$distinct_id" and {"i", "plan", "note", "$last_seen"} <= set(rows[0])
    assert len(rows) == 2501
    note = rows[0].index("note")
    assert rows[4][note] == "a,b\nc"
    r = await client.http.post(
        "/api/query/export", data={"format": "csv", "output_properties": '["plan"]'}, headers=auth
    )
    assert r.text.splitlines()[:2] == ["$distinct_id,plan", "u0000,free"]
    r = await client.http.post("/api/query/export", data={"where": "properties["}, headers=auth)
    assert r.status_code == 400
    r = await client.http.post("/api/query/export", data={})
    assert r.status_code == 401


def _cli_export(db: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "peoplebase", "export", "--db", db, "--project", "t", *args]
    return subprocess.run(cmd, capture_output=True, text=True)


async def test_cli_export_and_library(client: AppClient, tmp_path: Path) -> None:
    await seed(client, 30)
    out = tmp_path / "out.ndjson"
    run = _cli_export(client.app.settings.db, "--where", 'properties["i"] < 10', "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert "exported 10 profiles" in run.stderr
    assert len(out.read_bytes().splitlines()) == 10
    bad = _cli_export(client.app.settings.db, "--where", "1 +")
    assert bad.returncode != 0 and "position" in bad.stderr


def test_export_memory_is_bounded(tmp_path: Path) -> None:
    """Small-scale version of benchmarks/query_bench.py: peak Python allocations while
    exporting do not grow with the number of profiles."""
    import tracemalloc

    from peoplebase.records import Validator

    store = SqliteStore(str(tmp_path / "m.db"), synchronous="normal")
    store.open()
    v = Validator()
    peaks = []
    for total in (5_000, 20_000):
        start = len(peaks) and 5_000
        updates = [
            v.validate(
                {"$token": "t", "$distinct_id": f"u{i:06}", "$set": {"i": i, "s": "y" * 100}},
                i,
                1.7e9,
            )
            for i in range(start, total)
        ]
        for k in range(0, len(updates), 2000):
            store.write_group([updates[k : k + 2000]])  # type: ignore[list-item]
        project = store.project_by_token("t")
        assert project is not None
        sink = io.BytesIO()
        tracemalloc.start()
        count = export_to(_Discard(), store, project.id)  # type: ignore[arg-type]
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert count == total and sink.getvalue() == b""
    assert peaks[1] < peaks[0] * 2  # four times the profiles, not four times the memory
    store.close()


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)
