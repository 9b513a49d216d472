"""Crash safety: SIGKILL the server while clients write; every acknowledged update survives.

Clients send requests that each carry one record per profile, with one `$time` (distinct for
every request, scrambled so that many arrive late and are re-ordered into place). Record `k`
adds 1 to `n`, adds `k` to `sum` and appends the id `rk` to `ids`, so every update is
identifiable. The test kills the server at a random moment several times in a row and restarts
it on the same file; after each restart:

- every request answered HTTP 200 `1` is present in every profile (durability),
- each profile's `n` and `sum` agree with its `ids` and every profile holds the same ids
  (a record, and a request, is applied whole or not at all),
- `ids` holds each id once, in `$time` order (the ordering survived the crash),
- the server came back by itself and accepts writes again.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.e2e

TOKEN = "crash-token"
PROFILES = ("p0", "p1", "p2")
CLIENTS = 3
KILLS = 3
T0 = float(int(time.time()) - 5000)
SPREAD = 100_003  # a prime: k -> k * 7919 % SPREAD is one-to-one for k < SPREAD


def time_of(k: int) -> float:
    """A distinct, scrambled `$time` for request k (hundredths of a second over ~1000 s)."""
    return T0 + (k * 7919 % SPREAD) / 100


@dataclass
class Ledger:
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: set[int] = field(default_factory=set)
    acked: set[int] = field(default_factory=set)
    numbers: itertools.count = field(default_factory=lambda: itertools.count(1))


def client(url: str, ledger: Ledger, stop: threading.Event) -> None:
    """Send requests until the server goes away (or the test says stop)."""
    with httpx.Client(timeout=10) as http:
        while not stop.is_set():
            with ledger.lock:
                k = next(ledger.numbers)
                ledger.sent.add(k)
            records = [
                {
                    "$token": TOKEN,
                    "$distinct_id": p,
                    "$time": time_of(k),
                    "$add": {"n": 1, "sum": k},
                    "$append": {"ids": f"r{k}"},
                }
                for p in PROFILES
            ]
            try:
                r = http.post(url + "/engage", json=records)
            except httpx.HTTPError:
                return  # killed: this request's fate is unknown
            if r.status_code == 200 and r.text == "1":
                with ledger.lock:
                    ledger.acked.add(k)
            else:
                raise AssertionError(f"unexpected answer {r.status_code} {r.text!r}")


def check(server: ServerProcess, ledger: Ledger, note: str) -> int:
    """The invariants of the module docstring; returns how many requests are stored."""
    body = server.query(TOKEN)
    profiles = {r["$distinct_id"]: r["$properties"] for r in body["results"]}
    assert sorted(profiles) == list(PROFILES), note
    stored: set[int] | None = None
    for p in PROFILES:
        props = profiles[p]
        ids = props["ids"]
        numbers = [int(i[1:]) for i in ids]
        assert len(set(numbers)) == len(numbers), f"{note}: {p} holds an update twice"
        assert props["n"] == len(numbers), f"{note}: {p} counter disagrees with its ids"
        assert props["sum"] == sum(numbers), f"{note}: {p} sum disagrees with its ids"
        assert numbers == sorted(numbers, key=time_of), f"{note}: {p} ids not in $time order"
        missing = ledger.acked - set(numbers)
        assert not missing, f"{note}: acknowledged updates lost from {p}: {sorted(missing)[:10]}"
        assert set(numbers) <= ledger.sent, note
        if stored is None:
            stored = set(numbers)
        assert set(numbers) == stored, f"{note}: a request was applied to only some profiles"
    assert stored is not None
    return len(stored)


@pytest.mark.parametrize(
    "flags",
    [
        ["--writer", "thread"],
        ["--writer", "process"],
        # no row written before a kill: every acknowledged update comes back from the journal
        ["--writer", "process", "--write-behind", "3600"],
    ],
    ids=["thread", "process", "process-journal-only"],
)
def test_sigkill_loses_no_acknowledged_update(tmp_path: Path, flags: list[str]) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    db = tmp_path / "crash.db"
    ledger = Ledger()
    for round_ in range(KILLS):
        note = f"seed {seed}, round {round_}"
        server = ServerProcess(db, "--tokens", "open", *flags).start()  # restarts on the same file
        try:
            if round_:
                check(server, ledger, note + " (after restart)")
            acked_before = len(ledger.acked)
            stop = threading.Event()
            threads = [
                threading.Thread(target=client, args=(server.url, ledger, stop), daemon=True)
                for _ in range(CLIENTS)
            ]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 20
            while len(ledger.acked) < acked_before + 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(ledger.acked) >= acked_before + 5, f"{note}: the server took no writes"
            time.sleep(rng.uniform(0.05, 0.8))
            server.kill()
            stop.set()
            for t in threads:
                t.join(15)
                assert not t.is_alive(), note
        finally:
            server.kill()
    server = ServerProcess(db, "--tokens", "open", *flags).start()
    try:
        stored = check(server, ledger, f"seed {seed}, after the last kill")
        assert stored >= len(ledger.acked) > 0
        # And it takes writes again.
        r = httpx.post(
            server.url + "/engage",
            json={"$token": TOKEN, "$distinct_id": "p0", "$add": {"n": 1}},
            timeout=10,
        )
        assert (r.status_code, r.text) == (200, "1")
    finally:
        assert server.stop() == 0
