"""Validation alone: parse and validate prepared bodies as the server does, nothing else.

    python -m benchmarks.validation --bodies FILE --limit-bodies 400

Prints records/s and µs per record. For instruction counts (repeatable on a busy machine),
run it under `valgrind --tool=callgrind` twice, with `--limit-bodies 400` and with
`--limit-bodies 1`, and divide the difference by the difference in records: what is left is
the cost of one record, without the interpreter's start. `--now` fixes the clock the records'
`$time` is compared with (the default: the newest `$time` in the bodies), so that both runs
take the same paths.
"""

from __future__ import annotations

import argparse
import sys
import time

import orjson

from benchmarks.floors import validated
from peoplebase.records import Validator


def validate_bodies(bodies: list[bytes], now: float) -> int:
    """Validate every record of every body, as the storage floor does before it starts its
    clock; the number of records (a rejected record raises)."""
    validator = Validator()
    return sum(len(validated(body, validator, now)) for body in bodies)


def newest_time(bodies: list[bytes]) -> float:
    newest = max(raw["$time"] for body in bodies for raw in orjson.loads(body))
    return float(newest) / 1000.0 if newest >= 1e11 else float(newest)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bodies", required=True, help="a bodies file (JSON array per line)")
    p.add_argument("--limit-bodies", type=int, default=0, help="use only the first N bodies")
    p.add_argument("--now", type=float, default=None, help="the clock, seconds since the epoch")
    args = p.parse_args(argv)
    with open(args.bodies, "rb") as f:
        bodies = [line.rstrip(b"\n") for line in f if line.strip()]
    if args.limit_bodies:
        bodies = bodies[: args.limit_bodies]
    now = args.now if args.now is not None else newest_time(bodies)
    started = time.perf_counter()
    records = validate_bodies(bodies, now)
    spent = time.perf_counter() - started
    out = {
        "records": records,
        "seconds": spent,
        "records_per_s": records / spent if spent else 0.0,
        "us_per_record": spent / records * 1e6 if records else 0.0,
    }
    sys.stdout.write(orjson.dumps(out).decode() + "\n")


if __name__ == "__main__":
    main()
