"""The two floors every end-to-end figure is compared with.

python -m benchmarks.floors http --port P
    The HTTP floor: the same server stack as `peoplebase serve` (same server, event loop
    and HTTP parser, same configuration) with an application that reads the body and
    answers `1`, parsing and storing nothing.

python -m benchmarks.floors storage --db FILE --bodies FILE --group N --warmup-bodies W
    The storage floor: the same update batches as the end-to-end run, validated
    beforehand (untimed), applied straight to the store in groups of N records (what group
    commit hands the store when every connection has a request waiting), with durable
    commits, as the writer process drives the store (each group sent while the previous one
    commits); the first W bodies are applied but not timed. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from typing import Any

import orjson

from peoplebase.collector import Collector
from peoplebase.journal import encode_group
from peoplebase.records import Validator
from peoplebase.settings import Settings
from peoplebase.store.sqlite import SqliteStore
from peoplebase.store.writeback import DEFAULT_LOG_CACHE, DEFAULT_MAX_PROFILES
from peoplebase.types import Rejection, Update
from peoplebase.writer import prefer_quick_handoffs

NOSNIFF = (b"x-content-type-options", b"nosniff")


async def answer_one(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI app of the HTTP floor: drain the body, answer `1` with the product's headers."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False) and message["type"] == "http.request"
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"1"), NOSNIFF]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"1"})


def serve_http_floor(port: int, host: str = "127.0.0.1") -> None:
    import uvicorn

    from peoplebase.cli import server_config

    settings = Settings(host=host, port=port, log_level="warning")
    uvicorn.Server(server_config(answer_one, settings)).run()


def validated(body: bytes, validator: Validator, now: float) -> list[Update]:
    out = []
    for index, raw in enumerate(orjson.loads(body)):
        result = validator.validate(raw, index, now)
        if isinstance(result, Rejection):
            raise ValueError(f"workload record rejected: {result.error}")
        out.append(result)
    return out


def storage_floor(
    db: str,
    bodies: list[bytes],
    group: int,
    warmup_bodies: int = 0,
    synchronous: str = "full",
    log_cache: int = DEFAULT_LOG_CACHE,
    write_behind: float = Settings.write_behind,
    held_profiles: int = DEFAULT_MAX_PROFILES,
) -> dict[str, Any]:
    """Apply every body, in groups of about `group` records; the first bodies are not timed.

    The store is driven as the writer process drives it: each group is sent while the one
    before commits, with the next group's requests known ahead (and, as the writer process
    receives them, encoded as the journal keeps them), and the process runs the writer's
    garbage collection policy (collector.Collector) after each group. With write-behind, the
    rows still unwritten after the last group are written too, and timed
    (`drained_records_per_s`): the floor never counts work it leaves for later.
    """
    store = SqliteStore(
        db,
        synchronous=synchronous,
        log_cache=log_cache,
        write_behind=write_behind,
        held_profiles=held_profiles,
    )
    store.open()
    store.overlay.enabled = False  # as in the writer process: the server's readers keep it
    store.sync_property_indexes()  # as `peoplebase serve` does at start: the same indexes
    prefer_quick_handoffs()
    collector = Collector()
    validator = Validator()
    now = time.time()
    # requests, their journal encoding, records, measured
    groups: list[tuple[list[list[Update]], bytes, int, bool]] = []
    position = 0
    while position < len(bodies):
        requests: list[list[Update]] = []
        size = 0
        measured = position >= warmup_bodies
        limit = len(bodies) if measured else warmup_bodies
        while position < limit and (not requests or size < group):
            updates = validated(bodies[position], validator, now)
            position += 1
            requests.append(updates)
            size += len(updates)
        groups.append((requests, encode_group(requests), size, measured))
    records = commits = 0
    started: float | None = None
    cpu0 = thread0 = 0.0
    try:
        in_flight: Any = None
        for i, (requests, body, size, measured) in enumerate(groups):
            if measured and started is None:
                if in_flight is not None:  # the warm-up is over before the clock starts
                    store.await_group(in_flight)
                    in_flight = None
                started, cpu0 = time.perf_counter(), time.process_time()
                thread0 = time.thread_time()
            following = groups[i + 1][0] if i + 1 < len(groups) else None
            sent = store.send_group(requests, None, lambda f=following: f, body=body)
            if in_flight is not None:
                store.await_group(in_flight)
            in_flight = sent
            collector.after_group()
            if measured:
                records += size
                commits += 1
        if in_flight is not None:
            store.await_group(in_flight)
        spent = time.perf_counter() - started if started is not None else 0.0
        cpu = time.process_time() - cpu0
        thread_cpu = time.thread_time() - thread0
        store.sync(full=True)  # what is left to write behind
        drained = time.perf_counter() - started if started is not None else 0.0
        pipeline = dict(vars(store.pipeline))
    finally:
        store.close()
    return {
        "records": records,
        "commits": commits,
        "window_s": spent,
        "records_per_s": records / spent if spent else 0.0,
        "drained_records_per_s": records / drained if drained else 0.0,
        "cpu_us_per_record": cpu / records * 1e6 if records else 0.0,
        # the merging thread's own CPU: the writer process's limit (the COMMIT runs beside it)
        "merge_cpu_us_per_record": thread_cpu / records * 1e6 if records else 0.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pipeline": pipeline,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Benchmark floors (HTTP and storage).")
    sub = p.add_subparsers(dest="floor", required=True)
    h = sub.add_parser("http")
    h.add_argument("--host", default="127.0.0.1")
    h.add_argument("--port", type=int, required=True)
    s = sub.add_parser("storage")
    s.add_argument("--db", required=True)
    s.add_argument("--bodies", required=True)
    s.add_argument("--group", type=int, default=800)
    s.add_argument("--warmup-bodies", type=int, default=0)
    s.add_argument("--limit-bodies", type=int, default=0, help="use only the first N bodies")
    s.add_argument("--synchronous", default="full", choices=("full", "normal"))
    s.add_argument(
        "--log-cache",
        type=int,
        default=DEFAULT_LOG_CACHE,
        help="decoded log entries the writer keeps",
    )
    s.add_argument("--write-behind", type=float, default=Settings.write_behind)
    s.add_argument("--held-profiles", type=int, default=DEFAULT_MAX_PROFILES)
    args = p.parse_args(argv)
    if args.floor == "http":
        serve_http_floor(args.port, args.host)
        return
    with open(args.bodies, "rb") as f:
        bodies = [line.rstrip(b"\n") for line in f if line.strip()]
    if args.limit_bodies:
        bodies = bodies[: args.limit_bodies]
    result = storage_floor(
        args.db,
        bodies,
        args.group,
        args.warmup_bodies,
        args.synchronous,
        args.log_cache,
        args.write_behind,
        args.held_profiles,
    )
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
