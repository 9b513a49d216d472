"""`peoplebase import`: /engage records and profile-export lines, through the pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from peoplebase.store import open_store

pytestmark = pytest.mark.all_backends  # every test on SQLite and on PostgreSQL


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peoplebase", *args], capture_output=True, text=True
    )


def test_import_export_lines_and_updates_twice(tmp_path: Path, db_url: str) -> None:
    db = db_url
    assert run("projects", "create", "--db", db, "--token", "t").returncode == 0
    lines = [
        {"$distinct_id": "a", "$properties": {"plan": "pro", "$last_seen": "2024-01-02T03:04:05"}},
        {"$distinct_id": "b", "$properties": {"n": 1}},
        {"$distinct_id": "c", "$time": 1_700_000_000, "$add": {"visits": 2}},
        {"$distinct_id": "", "$set": {"x": 1}},
        {"$distinct_id": "d", "$delete": "", "$set": {"x": 1}},
    ]
    source = tmp_path / "in.ndjson"
    source.write_bytes(b"\n".join(orjson.dumps(x) for x in lines) + b"\nnot json\n")
    first = run("import", "--db", db, "--project", "t", "--json", str(source))
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["accepted"] == 3 and summary["rejected"] == 3
    rejected = [json.loads(x) for x in Path(summary["rejected_file"]).read_text().splitlines()]
    assert [r["line"] for r in rejected] == [4, 5, 6]
    assert "$distinct_id" in rejected[0]["error"] and "invalid JSON" in rejected[2]["error"]
    store = open_store(db)
    store.open()
    project = store.project_by_token("t")
    assert project is not None
    before = dict(store.get_profiles(project.id, ["a", "b", "c"]))
    assert before["a"] == {"plan": "pro", "$last_seen": "2024-01-02T03:04:05"}
    assert before["c"]["visits"] == 2
    second = run("import", "--db", db, "--project", "t", "--json", str(source))
    assert json.loads(second.stdout)["accepted"] == 3
    assert dict(store.get_profiles(project.id, ["a", "b", "c"])) == before  # re-running is safe
    # round trip: export, then import into another project, gives the same profiles
    out = tmp_path / "out.ndjson"
    assert run("export", "--db", db, "--project", "t", "-o", str(out)).returncode == 0
    assert run("projects", "create", "--db", db, "--token", "t2").returncode == 0
    assert run("import", "--db", db, "--project", "t2", str(out)).returncode == 0
    p2 = store.project_by_token("t2")
    assert p2 is not None
    assert dict(store.get_profiles(p2.id, ["a", "b", "c"])) == before
    store.close()


def test_import_unknown_project(tmp_path: Path, db_url: str) -> None:
    source = tmp_path / "x.ndjson"
    source.write_text("{}\n")
    r = run("import", "--db", db_url, "--project", "nope", str(source))
    assert r.returncode != 0 and "no project" in r.stderr
