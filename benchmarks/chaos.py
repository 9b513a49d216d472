"""Crash-safety chaos run: SIGKILL the server again and again while client processes write.

    python -m benchmarks.chaos --kills 20                     # SQLite file in a temporary dir
    python -m benchmarks.chaos --kills 200 --clients 6        # the longer run of docs/reliability.md
    python -m benchmarks.chaos --db postgresql://postgres@127.0.0.1:5432/chaos --kills 20

Several client processes send `/engage` requests without pause. Request `rid` carries one
record for each of two or three profiles (chosen from `rid`), all with the same scrambled,
distinct `$time`, and the operations

    $set {"last": rid}  $set_once {"first": rid}  $add {"n": 1, "sum": rid}
    $append {"ids": rid}  $union {"tags": [rid % 7]}

Each client keeps a ledger file: `S rid` before sending, `A rid` once the answer was HTTP 200
`1`. Any other answer (or no answer: the server was killed) leaves the request's fate unknown:
it may or may not be applied, but it must be applied whole or not at all.

The harness kills the server with SIGKILL at a random moment, restarts it on the same
database with the same command (no repair step), and checks, after every restart:

- every acknowledged request is in every profile it touched (`ids`): losses must be 0;
- nothing is stored that was never sent, and nothing twice;
- each request is in all of its profiles or in none (no half-applied request);
- each profile equals the reference fold, in `$time` order, of exactly the requests it holds
  (so `n`, `sum`, `last`, `first`, `ids` order and `tags` all agree).

The clients keep writing through every kill and restart. The run ends with a report (also
printed as JSON with --json): kills, requests sent and acknowledged, losses, half-applied
requests, requests of unknown fate that were kept.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

TOKEN = "chaos"
PROFILES = 12
PRIME = 1_000_003  # > every rid: rid -> rid * 7919 % PRIME is one-to-one
CLIENT_SPAN = 100_000  # rid = client * CLIENT_SPAN + k
T0 = float(int(time.time()) - 30_000)  # the harness passes its own to every client process


def time_of(rid: int) -> float:
    """A distinct, scrambled `$time` (hundredths of a second) so many requests arrive late."""
    return T0 + (rid * 7919 % PRIME) / 100


def profiles_of(rid: int) -> list[str]:
    """The profiles one request touches: two or three, distinct, spread over the pool."""
    rng = random.Random(rid)
    return [f"p{i}" for i in sorted(rng.sample(range(PROFILES), 2 + rid % 2))]


def records_of(rid: int) -> list[dict[str, Any]]:
    return [
        {
            "$token": TOKEN,
            "$distinct_id": p,
            "$time": time_of(rid),
            "$set": {"last": rid},
            "$set_once": {"first": rid},
            "$add": {"n": 1, "sum": rid},
            "$append": {"ids": rid},
            "$union": {"tags": [rid % 7]},
        }
        for p in profiles_of(rid)
    ]


# --- clients ----------------------------------------------------------------------------------


def client_main(url: str, number: int, ledger_path: str, stop_path: str, t0: float) -> None:
    """One client process: send requests until `stop_path` exists; keep the ledger."""
    global T0
    T0 = t0  # a spawned process imported this module anew: use the harness' epoch
    k = 0
    with open(ledger_path, "a", buffering=1) as ledger, httpx.Client(timeout=10) as http:
        while not os.path.exists(stop_path):
            k += 1
            rid = number * CLIENT_SPAN + k
            ledger.write(f"S {rid}\n")
            try:
                r = http.post(url + "/engage", json=records_of(rid))
            except httpx.ConnectError:
                ledger.write(f"N {rid}\n")  # never reached a server: not sent
                time.sleep(0.02)
                continue
            except httpx.HTTPError:
                time.sleep(0.02)  # the server is down or restarting: fate unknown
                continue
            if r.status_code == 200 and r.text == "1":
                ledger.write(f"A {rid}\n")
            elif r.status_code not in (503,):
                ledger.write(f"X {rid} {r.status_code} {r.text[:200]!r}\n")


def read_ledgers(paths: list[Path]) -> tuple[set[int], set[int], list[str]]:
    sent: set[int] = set()
    acked: set[int] = set()
    odd: list[str] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "S":
                sent.add(int(rest))
            elif kind == "N":
                sent.discard(int(rest))
            elif kind == "A":
                acked.add(int(rest))
            elif kind == "X":
                odd.append(rest)
    return sent, acked, odd


# --- the reference fold -----------------------------------------------------------------------


def fold(rids: list[int]) -> dict[str, Any]:
    """The profile that applying these requests' records in `$time` order must give."""
    props: dict[str, Any] = {}
    for rid in sorted(rids, key=time_of):
        props["last"] = rid
        props.setdefault("first", rid)
        props["n"] = props.get("n", 0) + 1
        props["sum"] = props.get("sum", 0) + rid
        props.setdefault("ids", []).append(rid)
        tags = props.setdefault("tags", [])
        if rid % 7 not in tags:
            tags.append(rid % 7)
    return props


class ChaosFailure(AssertionError):
    pass


def _first_difference(got: Any, expected: Any) -> str:
    if isinstance(got, list) and isinstance(expected, list):
        i = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
        if i is None:
            return f"lengths {len(got)} and {len(expected)}"
        return f"at {i}: stored {got[max(i - 2, 0) : i + 3]}, expected {expected[max(i - 2, 0) : i + 3]}"
    return f"stored {got!r}, expected {expected!r}"


def check(profiles: dict[str, dict[str, Any]], sent: set[int], acked: set[int], note: str) -> int:
    """The invariants of the module docstring; returns how many requests are stored."""
    holders: dict[int, set[str]] = {}
    for did, props in profiles.items():
        ids = props.get("ids", [])
        if len(set(ids)) != len(ids):
            raise ChaosFailure(f"{note}: {did} holds a request twice")
        for rid in ids:
            holders.setdefault(rid, set()).add(did)
        expected = fold(ids)
        got = {k: props.get(k) for k in expected}
        if got != expected:
            diff = {
                k: _first_difference(got[k], expected[k]) for k in expected if got[k] != expected[k]
            }
            raise ChaosFailure(f"{note}: {did} differs from the reference fold: {diff}")
    stored = set(holders)
    never_sent = stored - sent
    if never_sent:
        raise ChaosFailure(f"{note}: stored requests never sent: {sorted(never_sent)[:10]}")
    half = [rid for rid, dids in holders.items() if dids != set(profiles_of(rid))]
    if half:
        raise ChaosFailure(f"{note}: half-applied requests: {sorted(half)[:10]}")
    lost = acked - stored
    if lost:
        raise ChaosFailure(f"{note}: {len(lost)} acknowledged requests lost: {sorted(lost)[:10]}")
    return len(stored)


# --- the server -------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(
        self, db: str, port: int, log_path: Path, serve_args: tuple[str, ...] = ()
    ) -> None:
        self.serve_args = serve_args
        self.db = db
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "peoplebase", "serve", "--db", self.db,
                 "--port", str(self.port), "--tokens", "open", *self.serve_args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ChaosFailure(f"the server did not come back: {self.tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        raise ChaosFailure(f"the server did not become ready: {self.tail()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def tail(self) -> str:
        try:
            return self.log_path.read_text()[-3000:]
        except OSError:
            return ""

    def profiles(self, secret: str) -> dict[str, dict[str, Any]]:
        r = httpx.post(self.url + "/api/query/engage", auth=(secret, ""), timeout=30)
        r.raise_for_status()
        return {row["$distinct_id"]: row["$properties"] for row in r.json()["results"]}


def create_project(db: str) -> str:
    """Migrate the database (PostgreSQL needs it before serving) and create the project."""
    subprocess.run(
        [sys.executable, "-m", "peoplebase", "migrate", "--db", db], check=True, capture_output=True
    )
    out = subprocess.run(
        [sys.executable, "-m", "peoplebase", "projects", "create", "--db", db,
         "--token", TOKEN, "--json"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return str(json.loads(out.stdout)["secret"])


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Report:
    db: str
    seed: int
    kills: int = 0
    clients: int = 0
    sent: int = 0
    acknowledged: int = 0
    stored: int = 0
    unknown_kept: int = 0  # sent, not acknowledged, yet applied (whole)
    lost: int = 0
    half_applied: int = 0
    checks: int = 0
    unexpected_answers: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        rows = [
            ("database", self.db),
            ("seed", str(self.seed)),
            ("client processes", str(self.clients)),
            ("SIGKILLs survived", str(self.kills)),
            ("checks after restart", str(self.checks)),
            ("requests sent", str(self.sent)),
            ("requests acknowledged (200)", str(self.acknowledged)),
            ("records acknowledged", str(self.records_acknowledged)),
            ("requests stored", str(self.stored)),
            ("unacknowledged but stored (whole)", str(self.unknown_kept)),
            ("acknowledged requests lost", str(self.lost)),
            ("half-applied requests", str(self.half_applied)),
            ("seconds", f"{self.seconds:.1f}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    records_acknowledged: int = 0


def run(
    db: str | None = None,
    kills: int = 20,
    clients: int = 4,
    seed: int | None = None,
    workdir: Path | None = None,
    min_up: float = 0.05,
    max_up: float = 1.0,
    log: Any = None,
    serve_args: tuple[str, ...] = (),
) -> Report:
    """Run the chaos loop; raises ChaosFailure on the first broken invariant."""
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    owned_dir = None
    if workdir is None:
        owned_dir = tempfile.TemporaryDirectory(prefix="peoplebase-chaos-")
        workdir = Path(owned_dir.name)
    db = db or str(workdir / "chaos.db")
    report = Report(db=db, seed=seed, clients=clients)
    started = time.monotonic()
    secret = create_project(db)
    server = Server(db, free_port(), workdir / "chaos-server.log", serve_args)
    ledgers = [workdir / f"ledger-{i}.txt" for i in range(clients)]
    stop_path = workdir / "stop"
    ctx = multiprocessing.get_context("spawn")
    procs = []
    try:
        server.start()
        procs = [
            ctx.Process(
                target=client_main,
                args=(server.url, i + 1, str(ledgers[i]), str(stop_path), T0),
            )
            for i in range(clients)
        ]
        for p in procs:
            p.start()
        for round_ in range(kills + 1):
            note = f"seed {seed}, after kill {round_}" if round_ else f"seed {seed}, first start"
            _, acked, _ = read_ledgers(ledgers)  # what was acknowledged before the query...
            stored = check(server.profiles(secret), read_ledgers(ledgers)[0], acked, note)
            report.checks += 1
            if round_ == kills:
                break
            # Let the clients get some writes through this incarnation, then kill at random.
            deadline = time.monotonic() + 30
            while len(read_ledgers(ledgers)[1]) <= len(acked) and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(min_up, max_up))
            server.kill()
            report.kills += 1
            if log:
                print(f"kill {report.kills}: {stored} requests stored at the last check", file=log)
            time.sleep(rng.uniform(0, 0.2))  # clients hit a dead port for a moment
            server.start()
        stop_path.touch()
        for p in procs:
            p.join(30)
        # Final check, with every client stopped: the ledgers are complete.
        sent, acked, odd = read_ledgers(ledgers)
        profiles = server.profiles(secret)
        stored = check(profiles, sent, acked, f"seed {seed}, final")
        report.checks += 1
        report.sent, report.acknowledged, report.stored = len(sent), len(acked), stored
        report.records_acknowledged = sum(len(profiles_of(r)) for r in acked)
        report.unknown_kept = stored - len(acked)  # check() proved acked ⊆ stored
        report.unexpected_answers = odd[:20]
        if odd:
            raise ChaosFailure(f"seed {seed}: unexpected answers: {odd[:5]}")
        code = server.stop()
        if code != 0:
            raise ChaosFailure(f"seed {seed}: SIGTERM exit status {code}: {server.tail()}")
    finally:
        stop_path.touch()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        server.kill()
        report.seconds = time.monotonic() - started
        if owned_dir is not None:
            owned_dir.cleanup()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", help="SQLite path or postgresql:// URL (default: a temp file)")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-up", type=float, default=1.0, help="most seconds between kills")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--serve-args", default="", help="more `peoplebase serve` flags, e.g. '--writer process'"
    )
    args = parser.parse_args(argv)
    try:
        report = run(
            args.db,
            args.kills,
            args.clients,
            args.seed,
            max_up=args.max_up,
            log=sys.stderr,
            serve_args=tuple(shlex.split(args.serve_args)),
        )
    except ChaosFailure as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(report), indent=2) if args.json else report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
