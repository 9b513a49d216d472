"""Ingestion on PostgreSQL with 1 and 3 nodes, beside SQLite, on the same workload.

    python -m benchmarks.postgres_bench [--records 60000] [--pg postgresql://postgres@127.0.0.1/postgres]

Each case starts from an empty database (a fresh SQLite file, or a fresh PostgreSQL database
with the migrations applied), starts `peoplebase serve` processes, and drives each with its own
`benchmarks.loadgen` process; the connections are split between the nodes so that each
profile's updates travel through one connection, as in `make bench`. records/s is the sum over
nodes; p99 is the worst node's request latency. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from peoplebase.store.postgres import PostgresStore

from .run import free_port, stop, wait_ready
from .workload import Workload, WorkloadSpec

PY = sys.executable


def pg_database(admin: str, name: str) -> str:
    with psycopg.connect(admin, autocommit=True) as conn:
        # sql: reviewed: DDL takes no parameters; the name is the benchmark's own
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')  # sql: reviewed: as above
    info = psycopg.conninfo.conninfo_to_dict(admin)
    user = info.get("user", "postgres")
    password = f":{info['password']}" if info.get("password") else ""
    host = info.get("host", "127.0.0.1")
    port = info.get("port", 5432)
    url = f"postgresql://{user}{password}@{host}:{port}/{name}"  # --db picks PostgreSQL by scheme
    PostgresStore(url).migrate()
    return url


def run_case(db: str, nodes: int, bodies: list[bytes], connections: int, work: Path) -> dict:
    procs, ports = [], []
    for n in range(nodes):
        port = free_port()
        log = open(work / f"node{n}.log", "ab")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                [
                    PY,
                    "-m",
                    "peoplebase",
                    "serve",
                    "--db",
                    db,
                    "--port",
                    str(port),
                    "--tokens",
                    "open",
                    "--log-level",
                    "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        ports.append(port)
    try:
        for proc, port in zip(procs, ports, strict=True):
            wait_ready(port, proc, "/healthz")
        loads = []
        for n, port in enumerate(ports):
            mine = [b for i, b in enumerate(bodies) if (i % connections) % nodes == n]
            path = work / f"bodies{n}.jsonl"
            path.write_bytes(b"\n".join(mine) + b"\n")
            loads.append(
                subprocess.Popen(
                    [
                        PY,
                        "-m",
                        "benchmarks.loadgen",
                        "--port",
                        str(port),
                        "--bodies",
                        str(path),
                        "--concurrency",
                        str(connections // nodes),
                        "--warmup-bodies",
                        str(len(mine) // 10),
                    ],
                    stdout=subprocess.PIPE,
                )
            )
        results = [json.loads(p.communicate()[0].splitlines()[-1]) for p in loads]
    finally:
        for proc in procs:
            stop(proc)
    return {
        "records_per_s": sum(r["records_per_s"] for r in results),
        "p99_ms": max(r["p99_ms"] for r in results),
        "p50_ms": max(r["p50_ms"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "statuses": [r["statuses"] for r in results],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=60_000)
    p.add_argument("--profiles", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--connections", type=int, default=12)
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = p.parse_args(argv)
    spec = WorkloadSpec(
        profiles=args.profiles, batch=args.batch, late_fraction=0.10, partitions=args.connections
    )
    bodies = list(Workload(spec).bodies(args.records))
    rows = []
    with tempfile.TemporaryDirectory(prefix="pb-pgbench-") as tmp:
        work = Path(tmp)
        cases = [
            ("SQLite", 1, lambda: str(work / "bench.db")),
            ("PostgreSQL", 1, lambda: pg_database(args.pg, "pb_bench")),
            ("PostgreSQL", 3, lambda: pg_database(args.pg, "pb_bench")),
        ]
        for label, nodes, make_db in cases:
            for old in work.glob("bench.db*"):
                old.unlink()
            started = time.time()
            db = make_db()
            result = run_case(db, nodes, bodies, args.connections, work)
            if label == "PostgreSQL":  # the updates really landed in PostgreSQL
                with psycopg.connect(db) as conn:
                    row = conn.execute("SELECT count(*) FROM updates").fetchone()
                    assert row is not None and row[0] > 0, f"no update reached {db}"
            rows.append((label, nodes, result, time.time() - started))
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute('DROP DATABASE IF EXISTS "pb_bench" WITH (FORCE)')
    print(
        f"{args.records} records, batches of {args.batch}, {args.profiles} profiles, "
        f"10% late, {args.connections} connections in all, synchronous=full"
    )
    print("| backend | nodes | records/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|")
    for label, nodes, r, _ in rows:
        print(
            f"| {label} | {nodes} | {r['records_per_s']:,.0f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['errors']} |"
        )


if __name__ == "__main__":
    main()
