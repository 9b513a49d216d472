"""The benchmark workload: deterministic batches of realistic `/engage` update records.

Operation mix (by record): $set 50%, $set_once 15%, $add 15%, $union 10%, $append 5%,
$unset 5%. distinct_ids are drawn with a Zipf-like skew (rank k has weight 1/k**s) from a
fixed population of profiles. Every record carries an explicit `$time` (as the server-side
SDKs send it); times advance by one millisecond per record, and 10% of the records arrive out
of `$time` order (their time lies up to `late_span` seconds in the past).

Like real clients, each profile is updated through one connection only: with `partitions`
= P, body i holds profiles of partition i mod P (those whose number is i mod P), and the load
generator sends body i on connection i mod P. Apart from the deliberate 10%, every profile's
updates therefore arrive in `$time` order, as they would from one device or one pipeline.

The same seed always gives the same records, so the end-to-end run and the storage floor
apply exactly the same updates.
"""

from __future__ import annotations

import bisect
import itertools
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

TOKEN = "bench-token"
OP_MIX: tuple[tuple[str, float], ...] = (
    ("$set", 0.50),
    ("$set_once", 0.15),
    ("$add", 0.15),
    ("$union", 0.10),
    ("$append", 0.05),
    ("$unset", 0.05),
)
PLANS = ("free", "starter", "pro", "enterprise")
CITIES = ("Paris", "Berlin", "Lisbon", "Austin", "Osaka", "Lagos", "Lima", "Perth")
TAGS = ("beta", "mobile", "web", "newsletter", "trial", "vip", "churn-risk", "api")


@dataclass(frozen=True)
class WorkloadSpec:
    profiles: int = 100_000
    batch: int = 50
    zipf: float = 0.8
    late_fraction: float = 0.10
    late_span: float = 3600.0
    partitions: int = 1
    seed: int = 1


class Workload:
    """An endless, deterministic stream of update records for one spec."""

    def __init__(self, spec: WorkloadSpec, start_time: float | None = None) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        # one day in the past, so out-of-order and in-order times stay below "now"
        self.start = (time.time() if start_time is None else start_time) - 86400.0
        self.per_partition = max(1, spec.profiles // spec.partitions)
        weights = [1.0 / (k**spec.zipf) for k in range(1, self.per_partition + 1)]
        self.cumulative = list(itertools.accumulate(weights))
        # ranks are scattered over ids so hot profiles are not adjacent in the key space
        self.ids = list(range(self.per_partition))
        random.Random(spec.seed + 1).shuffle(self.ids)
        self.ops = [op for op, _ in OP_MIX]
        self.op_cumulative = list(itertools.accumulate(w for _, w in OP_MIX))
        self.n = 0

    def distinct_id(self, partition: int = 0) -> str:
        total = self.cumulative[-1]
        rank = bisect.bisect_left(self.cumulative, self.rng.random() * total)
        number = self.ids[min(rank, self.per_partition - 1)] * self.spec.partitions + partition
        return f"user-{number}"

    def record(self, partition: int = 0) -> dict[str, Any]:
        rng = self.rng
        self.n += 1
        t = self.start + self.n * 0.001
        if rng.random() < self.spec.late_fraction:
            t -= rng.random() * self.spec.late_span
        op = self.ops[bisect.bisect_left(self.op_cumulative, rng.random())]
        if op == "$set":
            value: Any = {
                "plan": rng.choice(PLANS),
                "city": rng.choice(CITIES),
                "score": rng.randint(0, 1000),
                "email": f"u{rng.randint(0, 10**6)}@example.com",
            }
        elif op == "$set_once":
            value = {"first_seen_city": rng.choice(CITIES), "signup": int(t)}
        elif op == "$add":
            value = {"logins": 1, "spent": round(rng.random() * 50, 2)}
        elif op == "$union":
            value = {"tags": rng.sample(TAGS, 2)}
        elif op == "$append":
            value = {"pages": f"/p/{rng.randint(0, 50)}"}
        else:
            value = ["email"]
        return {
            "$token": TOKEN,
            "$distinct_id": self.distinct_id(partition),
            "$time": int(t * 1000),
            op: value,
        }

    def batch(self, partition: int = 0) -> list[dict[str, Any]]:
        return [self.record(partition) for _ in range(self.spec.batch)]

    def bodies(self, records: int) -> Iterator[bytes]:
        """JSON request bodies holding `records` records in all, in batches of the spec."""
        for i in range(max(1, records // self.spec.batch)):
            yield orjson.dumps(self.batch(i % self.spec.partitions))


def seed_records(profiles: int, start_time: float | None = None) -> Iterator[dict[str, Any]]:
    """One `$set` per profile, dated before every workload record: the starting population."""
    t0 = (time.time() if start_time is None else start_time) - 2 * 86400.0
    for i in range(profiles):
        yield {
            "$token": TOKEN,
            "$distinct_id": f"user-{i}",
            "$time": int((t0 + i * 0.0001) * 1000),
            "$set": {"plan": PLANS[i % 4], "city": CITIES[i % 8], "logins": 0},
        }
