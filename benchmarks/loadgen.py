"""Load generator: a separate process driving HTTP/1.1 keep-alive connections with prepared bodies.

    python -m benchmarks.loadgen --port 8000 --bodies FILE --concurrency 16 --warmup-bodies 400
    python -m benchmarks.loadgen --port 8000 --bodies FILE --cycle --warmup 2 --duration 10

Connection j sends bodies j, j + C, j + 2C, ... (C connections), so that each profile's updates
travel through one connection, as from one client (see workload.py). Each connection sends one
request at a time (closed loop), or paces itself when `--rate`
(records/s for all connections together) is given. A 503/429 is counted, then the same body is
sent again after its Retry-After (capped), as the SDKs do. With `--query-secret`, one more
connection reads single profiles from /api/query/engage at `--query-rate` per second and reports
their latency separately. Prints one JSON object on stdout.

The client is a bare asyncio protocol (uvloop when installed) so that it costs the machine far
less CPU per request than the server under test.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import random
import sys
import time
from typing import Any

import orjson


class _Conn(asyncio.Protocol):
    """One keep-alive connection; `request` sends bytes and returns (status, headers, body)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, bytes]] | None = None
        self.need = -1
        self.head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = bytes(self.buf[:end])
            del self.buf[: end + 4]
            self.need = 0
            for line in self.head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    self.need = int(value)
        if len(self.buf) >= self.need:
            body = bytes(self.buf[: self.need])
            del self.buf[: self.need]
            status = int(self.head[9:12])
            head = self.head
            self.need = -1
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result((status, head, body))

    async def request(self, data: bytes) -> tuple[int, bytes, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


def _post(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _retry_after(head: bytes) -> float:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"retry-after":
            try:
                return float(value)
            except ValueError:
                return 1.0
    return 1.0


class Run:
    """Closed-loop (or paced) load over prepared bodies.

    Two ways to bound a run: by time (`--duration`, with `--cycle` to reuse bodies), or by
    records (every body sent once; the first `--warmup-bodies` are not measured). The second
    lets the storage floor apply exactly the same records as the end-to-end run.
    """

    def __init__(self, args: argparse.Namespace, bodies: list[bytes], batch: int) -> None:
        self.args = args
        self.bodies = bodies
        self.batch = batch
        self.by_count = not args.cycle and args.warmup_bodies >= 0
        self.cursor = list(range(args.concurrency))
        self.wraps = [0] * args.concurrency
        self.measure_from = math.inf
        self.stop_at = math.inf
        self.finished_at = 0.0
        self.measuring = asyncio.Event()
        self.latencies: list[float] = []
        self.query_latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.records_ok = 0
        self.records_sent_ok = 0
        self.errors = 0

    def take(self, worker: int) -> tuple[int, bytes] | None:
        """The next body of this connection: bodies worker, worker + C, worker + 2C, ..."""
        count = len(self.bodies)
        concurrency = self.args.concurrency
        index = self.cursor[worker]
        if index >= count * (self.wraps[worker] + 1):
            if not self.args.cycle:
                return None
            self.wraps[worker] += 1
        self.cursor[worker] = index + concurrency
        if self.by_count and index >= self.args.warmup_bodies:
            self.open_window()
        body = self.bodies[index % count]
        if self.wraps[worker] and self.args.shift:
            # a later pass over the same records: move their $time on, so they are new
            # updates rather than retries of the first pass
            shift = self.wraps[worker] * count * self.batch
            records = orjson.loads(body)
            for record in records:
                record["$time"] += shift
            body = orjson.dumps(records)
        return index, body

    def open_window(self) -> None:
        if not self.measuring.is_set():
            self.measure_from = time.perf_counter()
            self.measuring.set()

    def is_measured(self, index: int, t0: float, t1: float) -> bool:
        if self.by_count:
            return index >= self.args.warmup_bodies
        return t0 >= self.measure_from and t1 <= self.stop_at

    async def worker(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Conn, self.args.host, self.args.port)
        per_conn = self.args.rate / self.args.concurrency if self.args.rate else 0.0
        interval = self.batch / per_conn if per_conn else 0.0
        due = time.perf_counter() + (random.random() * interval if interval else 0.0)
        while True:
            now = time.perf_counter()
            if now >= self.stop_at:
                break
            if interval:
                if due > now:
                    await asyncio.sleep(due - now)
                due += interval
            taken = self.take(index)
            if taken is None:
                break
            number, body = taken
            data = _post(self.args.path, body)
            while True:
                t0 = time.perf_counter()
                try:
                    status, head, _ = await conn.request(data)
                except ConnectionError:
                    self.errors += 1
                    _, conn = await loop.create_connection(_Conn, self.args.host, self.args.port)
                    continue
                t1 = time.perf_counter()
                measured = self.is_measured(number, t0, t1)
                if measured:
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                if status in (429, 503):
                    await asyncio.sleep(min(_retry_after(head), self.args.max_retry_wait))
                    if time.perf_counter() >= self.stop_at:
                        break
                    continue
                if status == 200:
                    self.records_sent_ok += self.batch
                if measured:
                    self.latencies.append(t1 - t0)
                    if status == 200:
                        self.records_ok += self.batch
                break
        self.finished_at = max(self.finished_at, time.perf_counter())
        conn.transport.close()  # type: ignore[union-attr]

    async def querier(self) -> None:
        args = self.args
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Conn, args.host, args.port)
        auth = base64.b64encode(f"{args.query_secret}:".encode()).decode()
        rng = random.Random(7)
        interval = 1.0 / args.query_rate
        while not self.done:
            did = f"user-{rng.randrange(args.query_profiles)}"
            data = (
                f"GET /api/query/engage?distinct_id={did} HTTP/1.1\r\nHost: bench\r\n"
                f"Authorization: Basic {auth}\r\n\r\n"
            ).encode()
            t0 = time.perf_counter()
            status, _, _ = await conn.request(data)
            t1 = time.perf_counter()
            if status != 200:
                self.errors += 1
            elif t0 >= self.measure_from:
                self.query_latencies.append(t1 - t0)
            await asyncio.sleep(max(0.0, interval - (t1 - t0)))
        conn.transport.close()  # type: ignore[union-attr]

    async def marks(self) -> None:
        """Tell the parent process when the measured window opens (for its CPU figures)."""
        await self.measuring.wait()
        sys.stdout.write("MEASURE\n")
        sys.stdout.flush()

    async def main(self) -> dict[str, Any]:
        args = self.args
        self.done = False
        if not self.by_count:
            self.measure_from = time.perf_counter() + args.warmup
            self.stop_at = self.measure_from + args.duration
            asyncio.get_running_loop().call_at(
                asyncio.get_running_loop().time() + args.warmup, self.measuring.set
            )
        marks = asyncio.create_task(self.marks())
        extra = [asyncio.create_task(self.querier())] if args.query_secret else []
        await asyncio.gather(*(self.worker(i) for i in range(args.concurrency)))
        end = min(self.finished_at, self.stop_at)
        sys.stdout.write("STOP\n")
        sys.stdout.flush()
        self.done = True
        await asyncio.gather(*extra)
        marks.cancel()
        window = max(1e-9, end - self.measure_from) if self.measuring.is_set() else 0.0
        return {
            "window_s": round(window, 3),
            "records_ok": self.records_ok,
            "records_sent_ok": self.records_sent_ok,
            "records_per_s": self.records_ok / window if window else 0.0,
            "requests": len(self.latencies),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": self.errors,
            "p50_ms": percentile(self.latencies, 50) * 1000,
            "p99_ms": percentile(self.latencies, 99) * 1000,
            "query_p50_ms": percentile(self.query_latencies, 50) * 1000,
            "query_p99_ms": percentile(self.query_latencies, 99) * 1000,
            "queries": len(self.query_latencies),
        }


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)  # nearest rank
    index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[index]


def read_bodies(path: str) -> tuple[list[bytes], int]:
    with open(path, "rb") as f:
        bodies = [line.rstrip(b"\n") for line in f if line.strip()]
    batch = len(orjson.loads(bodies[0])) if bodies else 0
    return bodies, batch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/engage")
    p.add_argument("--bodies", required=True, help="file with one JSON request body per line")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds (with --cycle)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds (with --cycle)")
    p.add_argument(
        "--warmup-bodies", type=int, default=0, help="without --cycle: bodies not measured"
    )
    p.add_argument("--rate", type=float, default=0.0, help="records/s in all (0: closed loop)")
    p.add_argument("--cycle", action="store_true", help="reuse bodies when all were sent")
    p.add_argument("--shift", action="store_true", help="with --cycle: later passes move $time on")
    p.add_argument("--limit-bodies", type=int, default=0, help="use only the first N bodies")
    p.add_argument("--max-retry-wait", type=float, default=1.0)
    p.add_argument("--query-secret", default="")
    p.add_argument("--query-rate", type=float, default=50.0)
    p.add_argument("--query-profiles", type=int, default=100_000)
    args = p.parse_args(argv)
    bodies, batch = read_bodies(args.bodies)
    if args.limit_bodies:
        bodies = bodies[: args.limit_bodies]
    try:
        import uvloop

        result = uvloop.run(Run(args, bodies, batch).main())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        result = asyncio.run(Run(args, bodies, batch).main())
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
