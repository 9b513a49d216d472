"""`make bench` works: the harness runs end to end on a tiny configuration and prints its table.

Speed is not asserted here (that is what the benchmarks are for); only that every measurement
is taken and reported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from benchmarks.loadgen import percentile
from benchmarks.workload import TOKEN, Workload, WorkloadSpec
from peoplebase.records import Validator
from peoplebase.types import Rejection

ROOT = Path(__file__).resolve().parent.parent


def test_workload_is_deterministic_valid_and_partitioned() -> None:
    spec = WorkloadSpec(profiles=1000, batch=50, partitions=4, seed=3)
    first = list(Workload(spec, start_time=1.8e9).bodies(1000))
    again = list(Workload(spec, start_time=1.8e9).bodies(1000))
    assert first == again
    assert len(first) == 20
    validator = Validator()
    ops: dict[str, int] = {}
    late = 0
    for i, body in enumerate(first):
        records = orjson.loads(body)
        assert len(records) == 50
        previous = 0
        for index, raw in enumerate(records):
            assert raw["$token"] == TOKEN
            # body i only holds profiles of partition i mod 4 (one connection per profile)
            assert int(raw["$distinct_id"].split("-")[1]) % 4 == i % 4
            assert not isinstance(validator.validate(raw, index, 1.8e9), Rejection)
            op = next(
                k for k in raw if k.startswith("$") and k not in ("$token", "$distinct_id", "$time")
            )
            ops[op] = ops.get(op, 0) + 1
            late += raw["$time"] < previous
            previous = max(previous, raw["$time"])
    assert set(ops) == {"$set", "$set_once", "$add", "$union", "$append", "$unset"}
    assert ops["$set"] > ops["$set_once"] > ops["$append"]
    assert 40 <= late <= 160  # about 10% of 1000 records arrive out of $time order


def test_percentile() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0


@pytest.mark.e2e
def test_make_bench_quick_prints_the_table_with_both_floors(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--quiet", "--json", str(out_json)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| case"))
    for column in ("e2e rec/s", "storage floor", "e2e/storage", "HTTP floor", "e2e/HTTP"):
        assert column in header
    for column in ("p50 ms", "p99 ms", "CPU us/rec", "RSS MB", "query p99 ms"):
        assert column in header
    rows = [line for line in lines if line.startswith("| 1k b50 c4")]
    assert len(rows) == 1
    result = json.loads(out_json.read_text())
    (row,) = result["rows"]
    e2e, storage, http = row["e2e"], row["storage"], row["http"]
    # every measured record was answered 200 and counted, and the floors measured the same run
    assert e2e["statuses"] == {"200": e2e["requests"]}
    assert e2e["records_ok"] == row["records"] == storage["records"]
    assert e2e["records_per_s"] > 0 and storage["records_per_s"] > 0 and http["records_per_s"] > 0
    assert e2e["p99_ms"] >= e2e["p50_ms"] > 0
    assert e2e["cpu_us_per_record"] > 0 and e2e["peak_rss_mb"] > 0
    assert row["query"]["queries"] > 0 and row["query"]["query_p99_ms"] > 0


def test_http_server_comparison_runs_and_prints_its_table() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.http_servers", "--runs", "1", "--seconds", "0.5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| uvicorn")]
    assert len(rows) == 1
    records_per_s = float(rows[0].split("|")[3].replace(",", ""))
    assert records_per_s > 0


def test_late_replay_benchmark_runs_and_the_limit_cuts_the_log(tmp_path: Path) -> None:
    from benchmarks.late_replay import one_length

    capped = one_length(600, 300, 2, tmp_path)
    free = one_length(600, 0, 2, tmp_path)
    assert capped["log_after"] <= 300 < free["log_after"] == 600 + 4
    # 1 hour late lies before the cut (60 s of $time are kept): applied on top, only when capped
    assert capped["late_1h_beyond"] == 2 and free["late_1h_beyond"] == 0
    assert capped["late_10s_beyond"] == free["late_10s_beyond"] == 0
    assert all(r[k] > 0 for r in (capped, free) for k in ("late_10s_ms", "late_1h_ms"))


def test_validation_benchmark_validates_every_record(tmp_path: Path) -> None:
    spec = WorkloadSpec(profiles=1000, batch=50, partitions=4, seed=3)
    bodies = tmp_path / "bodies.jsonl"
    bodies.write_bytes(b"".join(b + b"\n" for b in Workload(spec, start_time=1.8e9).bodies(1000)))
    cmd = [sys.executable, "-m", "benchmarks.validation", "--bodies", str(bodies)]
    out = subprocess.run([*cmd, "--limit-bodies", "8"], capture_output=True, cwd=ROOT, check=True)
    result = json.loads(out.stdout)
    assert result["records"] == 8 * 50 and result["us_per_record"] > 0
    # a record the validator refuses is reported, not counted
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'[{"$token": "t", "$distinct_id": "u", "$time": 1}]\n')
    failed = subprocess.run([*cmd[:-1], str(bad)], capture_output=True, cwd=ROOT)
    assert failed.returncode != 0 and b"workload record rejected: record" in failed.stderr
