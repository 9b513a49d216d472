"""Read-side benchmark: query latency, export rate and memory, import rate.

    .venv/bin/python -m benchmarks.query_bench --profiles 1000000 --db /tmp/qb.db

Loads N profiles through the store's write_group (skipped when the file already holds
them), then measures p50/p99 latency of a single-profile lookup, a selective and an
unselective `where` (page 0 of /api/query/engage, through the in-process ASGI app), the NDJSON
export rate with the process's peak RSS, and the import rate of the exported file.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import httpx

from peoplebase.app import PeoplebaseApp
from peoplebase.importer import import_lines
from peoplebase.query.export import export_to
from peoplebase.records import Validator
from peoplebase.settings import Settings

PLANS = ["free", "pro", "team", "enterprise"]


def load(app: PeoplebaseApp, n: int) -> None:
    store = app.store
    project = store.project_by_token("bench")
    if project is not None and store.count_profiles(project.id) >= n:
        return
    v = Validator()
    batch = []
    start = time.perf_counter()
    for i in range(n):
        batch.append(
            v.validate(
                {
                    "$token": "bench",
                    "$distinct_id": f"user-{i:08}",
                    "$time": 1.7e9,
                    "$set": {
                        "plan": PLANS[i % 4],
                        "age": i % 90,
                        "email": f"u{i}@example.com",
                        "cohort": i % 1000,
                    },
                },
                len(batch),
                1.7e9 + 1,
            )
        )
        if len(batch) == 2000:
            store.write_group([batch])  # type: ignore[list-item]
            batch = []
    if batch:
        store.write_group([batch])  # type: ignore[list-item]
    print(f"loaded {n} profiles in {time.perf_counter() - start:.1f}s", file=sys.stderr)


async def latency(
    http: httpx.AsyncClient, auth: dict[str, str], data: dict[str, str], runs: int
) -> tuple[float, float, int]:
    times = []
    total = 0
    for _ in range(runs):
        t = time.perf_counter()
        r = await http.post("/api/query/engage", data=data, headers=auth)
        times.append(time.perf_counter() - t)
        r.raise_for_status()
        total = r.json()["total"]
    times.sort()
    return statistics.median(times) * 1000, times[max(0, int(len(times) * 0.99) - 1)] * 1000, total


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", type=int, default=100_000)
    ap.add_argument("--db", default="/tmp/peoplebase-query-bench.db")
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    settings = Settings(db=args.db, tokens="open", synchronous="normal", query_timeout=600)
    app = PeoplebaseApp(settings)
    app.startup()
    load(app, args.profiles)
    store = app.store
    project = store.project_by_token("bench")
    assert project is not None
    secret = store.rotate_secret("bench")[1]
    auth = {"Authorization": "Basic " + base64.b64encode(f"{secret}:".encode()).decode()}
    transport = httpx.ASGITransport(app=app)
    rows = []
    async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as http:
        cases = [
            (
                "single profile (distinct_id)",
                {"distinct_id": f"user-{args.profiles // 2:08}"},
                args.runs,
            ),
            (
                "selective where (cohort == 7)",
                {"where": 'properties["cohort"] == 7'},
                max(3, args.runs // 10),
            ),
            ("unselective where (age >= 0)", {"where": 'properties["age"] >= 0'}, 3),
        ]
        for name, data, runs in cases:
            p50, p99, total = await latency(http, auth, data, runs)
            rows.append(f"| {name} | {total} | {p50:.1f} | {p99:.1f} | {runs} |")
    out = Path(args.db + ".export.ndjson")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    with open(out, "wb") as f:
        count = export_to(f, store, project.id)
    export_s = time.perf_counter() - t
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store.create_project("bench-import") if store.project_by_token("bench-import") is None else None
    t = time.perf_counter()
    with open(out, "rb") as f:
        summary = import_lines(store, "bench-import", f)
    import_s = time.perf_counter() - t
    app.shutdown()
    os.unlink(out)
    print(f"profiles: {args.profiles}\n")
    print("| query | total | p50 ms | p99 ms | runs |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print(
        f"\nexport: {count} profiles in {export_s:.1f}s = {count / export_s:,.0f} profiles/s; "
        f"peak RSS {rss_before / 1024:.0f} MiB before, {rss_after / 1024:.0f} MiB after"
    )
    print(
        f"import: {summary.accepted} profiles in {import_s:.1f}s = {summary.accepted / import_s:,.0f} profiles/s"
    )


if __name__ == "__main__":
    asyncio.run(main())
