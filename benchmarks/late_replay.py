"""What one late update costs on a busy profile, by the length of its log, with and without
the `max_log_entries` limit.

    .venv/bin/python -m benchmarks.late_replay
    .venv/bin/python -m benchmarks.late_replay --lengths 1000,10000,40000 --late 9

One profile receives N updates in `$time` order (ten per second of `$time`, the workload's op
mix), written through `SqliteStore.write_group` in groups of 500 (durable commits). Then late
updates arrive one per group, 10 seconds late and 1 hour late, and the time of each group is
measured: a late update is put in its place by replaying the profile's log from its base
snapshot, so without a limit its cost grows with the log (up to a whole reorder window of
updates); with the limit the log is cut to at most `max_log_entries` entries, and an update
older than the cut is applied on top (counted beyond the window).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from peoplebase.records import Validator
from peoplebase.store.sqlite import SqliteStore
from peoplebase.store.writeback import DEFAULT_LOG_CACHE
from peoplebase.types import Rejection, Update

from .workload import Workload, WorkloadSpec

T0 = 1_700_000_000.0
RATE = 10.0  # updates per second of $time on the busy profile
GROUP = 500


def updates(raws: list[dict[str, Any]], now: float) -> list[Update]:
    v = Validator()
    out = []
    for i, raw in enumerate(raws):
        u = v.validate(raw, i, now)
        assert not isinstance(u, Rejection), u
        out.append(u)
    return out


def one_length(
    n: int, limit: int, late: int, workdir: Path, log_cache: int = DEFAULT_LOG_CACHE
) -> dict[str, Any]:
    db = workdir / f"late-{n}-{limit}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    store = SqliteStore(str(db), max_log_entries=limit, log_cache=log_cache)
    store.open()
    work = Workload(WorkloadSpec(profiles=1, late_fraction=0.0, seed=7), start_time=T0)
    now = T0 + n / RATE + 86400
    try:
        raws = []
        for i in range(n):
            raw = work.record()
            raw["$distinct_id"] = "busy"
            raw["$time"] = int((T0 + i / RATE) * 1000)
            raws.append(raw)
        for start in range(0, n, GROUP):
            store.write_group([updates(raws[start : start + GROUP], now)])
        newest = T0 + (n - 1) / RATE
        out: dict[str, Any] = {"entries": n, "max_log_entries": limit}
        for name, lateness in (("late_10s", 10.0), ("late_1h", 3600.0)):
            spent = []
            beyond = 0
            for k in range(late):
                raw = work.record()
                raw["$distinct_id"] = "busy"
                raw["$time"] = int((newest - lateness + k * 0.001) * 1000)
                t = time.perf_counter()
                (applied,) = store.write_group([updates([raw], now)])
                spent.append(time.perf_counter() - t)
                beyond += applied.beyond_window
            out[name + "_ms"] = statistics.median(spent) * 1000
            out[name + "_beyond"] = beyond
        row = store._reader().execute("SELECT log_n FROM profiles WHERE distinct_id = 'busy'")
        out["log_after"] = row.fetchone()[0]
        return out
    finally:
        store.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="1000,5000,10000,20000,40000", help="log lengths N")
    p.add_argument("--limit", type=int, default=10_000, help="max_log_entries to compare with 0")
    p.add_argument("--late", type=int, default=9, help="late updates measured per case")
    p.add_argument("--workdir", default="", help="keep the databases here")
    p.add_argument(
        "--log-cache",
        type=int,
        default=DEFAULT_LOG_CACHE,
        help="decoded log entries the writer keeps",
    )
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        print(
            "| log entries | max_log_entries | 10 s late: ms per update | 1 h late: ms per update "
            "| 1 h late: applied on top | log after |"
        )
        print("|---|---|---|---|---|---|")
        for n in lengths:
            for limit in (args.limit, 0):
                r = one_length(n, limit, args.late, workdir, args.log_cache)
                print(
                    f"| {n:,} | {limit or 'off'} | {r['late_10s_ms']:.1f} | "
                    f"{r['late_1h_ms']:.1f} | {r['late_1h_beyond']}/{args.late} | "
                    f"{r['log_after']:,} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
