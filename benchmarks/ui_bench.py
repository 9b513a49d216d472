"""Web page latency on a large project (default 1M profiles).

    .venv/bin/python -m benchmarks.ui_bench [--profiles 1000000] [--db /tmp/ui-bench.db]

Builds a SQLite database of N profiles in one project (rows written directly, no update log),
starts `peoplebase serve` on it with `$email,$name,plan` indexed, signs in, and prints the
median and worst of 7 loads of each page as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time

import httpx
import orjson

from peoplebase.store.sqlite import SqliteStore
from tests.conftest import free_port

PAGES = {
    "overview (counts every profile)": "/ui/",
    "profiles, first page": "/ui/profiles",
    "profiles, a page in the middle": "/ui/profiles?after=user-0500000",
    "search by $email": "/ui/profiles?q=u777777%40example.com",
    "search by distinct_id prefix": "/ui/profiles?q=user-07777",
    'where properties["plan"] == "team" (indexed)': "/ui/profiles?where=properties%5B%22plan%22%5D%20%3D%3D%20%22team%22",
    'where properties["n"] > N-10 (not indexed: a scan)': "/ui/profiles?where=properties%5B%22n%22%5D%20%3E%20{last}",
    "one profile": "/ui/profiles/user-0123456",
}


def build(db: str, profiles: int) -> str:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    store = SqliteStore(db)
    store.open()
    project, secret = store.create_project("big")
    rng = random.Random(1)
    conn = store._writer()
    with conn:
        conn.executemany(
            "INSERT INTO profiles (project_id, distinct_id, props, last_time) VALUES (?, ?, ?, ?)",
            (
                (
                    project.id,
                    f"user-{i:07d}",
                    orjson.dumps(
                        {
                            "$email": f"u{i}@example.com",
                            "$name": f"User {i}",
                            "plan": rng.choice(["free", "pro", "team"]),
                            "n": i,
                        }
                    ).decode(),
                    1.7e9,
                )
                for i in range(profiles)
            ),
        )
    store.close()
    return secret


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profiles", type=int, default=1_000_000)
    p.add_argument("--db", default="/tmp/ui-bench.db")
    args = p.parse_args()
    secret = build(args.db, args.profiles)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "peoplebase",
            "serve",
            "--db",
            args.db,
            "--port",
            str(port),
            "--indexed-properties",
            "$email,$name,plan",
            "--log-level",
            "warning",
        ]
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        client = httpx.Client(base_url=base, timeout=120)
        page = client.get("/ui/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf
        assert (
            client.post("/ui/login", data={"csrf": csrf.group(1), "secret": secret}).status_code
            == 303
        )
        print(f"| page ({args.profiles:,} profiles) | median ms | worst ms |")
        print("|---|---|---|")
        for name, path in PAGES.items():
            path = path.format(last=args.profiles - 10)
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                r = client.get(path)
                times.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, (path, r.status_code)
            print(f"| {name} | {statistics.median(times):.1f} | {max(times):.1f} |")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


if __name__ == "__main__":
    main()
