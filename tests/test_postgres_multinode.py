"""Three `peoplebase serve` processes on one PostgreSQL database (SPEC §4 across nodes).

Clients send overlapping profiles' updates, with shuffled `$time`s, through different nodes at
the same time, and resend some accepted requests to another node. The final profiles must equal
the fold of each profile's updates in `$time` order, computed here by hand: nothing lost,
nothing reordered, nothing applied twice.
"""

from __future__ import annotations

import json
import random
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from .conftest import ServerProcess

pytestmark = pytest.mark.e2e

TOKEN = "multinode"
PROFILES = [f"user-{i}" for i in range(8)]
UPDATES_PER_PROFILE = 60
CLIENTS = 6
BATCH = 12


def _reference(records: list[dict]) -> dict[str, dict]:
    """The sorted fold of $set, $set_once, $add and $append, written out directly."""
    out: dict[str, dict] = {}
    for rec in sorted(records, key=lambda r: r["$time"]):
        p = out.setdefault(rec["$distinct_id"], {})
        p["last"] = rec["$set"]["last"]
        p.setdefault("first", rec["$set_once"]["first"])
        p["n"] = p.get("n", 0) + rec["$add"]["n"]
        p.setdefault("order", []).append(rec["$append"]["order"])
        p["$last_seen"] = datetime.fromtimestamp(rec["$time"] / 1000, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S"
        )
    return out


def test_three_nodes_keep_time_order(postgres_url: str, tmp_path: Path) -> None:
    nodes = [
        ServerProcess(postgres_url, "--tokens", "open", log_path=tmp_path / f"node{i}.log")
        for i in range(3)
    ]
    for node in nodes:
        node.start()
    try:
        rng = random.Random(7)
        base_ms = int((time.time() - 3600) * 1000)
        records = []
        for p, did in enumerate(PROFILES):
            for k in range(UPDATES_PER_PROFILE):
                t = base_ms + k * 1000 + p  # distinct times within a profile: no ties
                records.append(
                    {
                        "$token": TOKEN,
                        "$distinct_id": did,
                        "$time": t,
                        "$set": {"last": k},
                        "$set_once": {"first": k},
                        "$add": {"n": 1},
                        "$append": {"order": k},
                    }
                )
        rng.shuffle(records)
        batches = [records[i : i + BATCH] for i in range(0, len(records), BATCH)]
        errors: list[str] = []

        def client(c: int) -> None:
            with httpx.Client(timeout=30) as http:
                for b, batch in enumerate(batches[c::CLIENTS]):
                    node = nodes[(c + b) % len(nodes)]
                    body = json.dumps(batch)
                    r = http.post(node.url + "/engage?verbose=1", content=body)
                    if r.status_code != 200 or r.json() != {"status": 1, "error": None}:
                        errors.append(f"{node.url}: {r.status_code} {r.text}")
                    if b % 3 == 0:  # a retry of an accepted request, through another node
                        again = nodes[(c + b + 1) % len(nodes)]
                        r = http.post(again.url + "/engage?verbose=1", content=body)
                        if r.status_code != 200:
                            errors.append(f"retry {again.url}: {r.status_code} {r.text}")

        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert errors == []

        want = _reference(records)
        got = nodes[1].query(TOKEN, distinct_ids=json.dumps(PROFILES))
        assert got["total"] == len(PROFILES)
        profiles = {r["$distinct_id"]: r["$properties"] for r in got["results"]}
        for did in PROFILES:
            assert profiles[did]["order"] == list(range(UPDATES_PER_PROFILE)), did
            assert profiles[did] == want[did], did
        # every node reads the same state
        assert (
            nodes[2].query(TOKEN, distinct_id=PROFILES[0])["results"][0]["$properties"]
            == want[PROFILES[0]]
        )
    finally:
        for node in nodes:
            node.stop()
