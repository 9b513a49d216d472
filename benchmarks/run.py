"""`make bench`: end-to-end ingestion throughput against its two floors, printed as one table.

    python -m benchmarks.run                 default matrix (a few minutes)
    python -m benchmarks.run --full          + batches of 1, 1M profiles, 64 connections,
                                             synchronous=normal, overload, 10-minute soak
    python -m benchmarks.run --quick         a tiny configuration (seconds), for CI

For every case (profiles, batch, connections, synchronous) the same run measures:

- end to end: `peoplebase serve` as a real process, driven by `benchmarks.loadgen` (another
  process) over keep-alive HTTP/1.1 with prepared request bodies;
- the HTTP floor: the same server stack answering `1` without parsing or storing;
- the storage floor: the same update batches applied straight to the store (no HTTP).

Each database starts as a copy of one seeded database (every profile already exists). The
machine is shared: compare ratios within one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from peoplebase.records import Validator
from peoplebase.store.sqlite import SqliteStore

from .floors import validated
from .workload import TOKEN, Workload, WorkloadSpec, seed_records

PY = sys.executable


@dataclass
class Case:
    profiles: int
    batch: int
    concurrency: int
    synchronous: str = "full"
    late: float = 0.10  # share of records arriving out of $time order
    query_at_half_rate: bool = False
    extra: list[str] = field(default_factory=list)  # more `peoplebase serve` flags
    records: int = 0  # records sent (0: the run's --records)
    label: str = ""

    @property
    def name(self) -> str:
        base = f"{_count(self.profiles)} b{self.batch} c{self.concurrency} {self.synchronous}"
        base += f" late{self.late:.0%}"
        return f"{base} {self.label}".strip()


@dataclass
class Options:
    workdir: Path
    records_per_case: int
    warmup_fraction: float
    http_warmup: float
    http_seconds: float
    seed: int
    zipf: float
    quiet: bool = False


def _count(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log(opts: Options, message: str) -> None:
    if not opts.quiet:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- preparation ------------------------------------------------------------------------------


def seeded_db(opts: Options, profiles: int) -> tuple[Path, str]:
    """A database where every profile exists (one $set each), and the project's read secret."""
    path = opts.workdir / f"seed-{profiles}.db"
    secret_file = path.with_suffix(".secret")
    if path.exists() and secret_file.exists():
        return path, secret_file.read_text()
    log(opts, f"seeding {profiles} profiles")
    for leftover in opts.workdir.glob(f"seed-{profiles}.db*"):
        leftover.unlink()
    store = SqliteStore(str(path), synchronous="normal")
    store.open()
    validator = Validator()
    now = time.time()
    group: list[Any] = []
    for index, raw in enumerate(seed_records(profiles)):
        group.append(validator.validate(raw, index, now))
        if len(group) == 20_000:
            store.write_group([group])
            group = []
    if group:
        store.write_group([group])
    _, secret = store.rotate_secret(TOKEN)
    store.close()
    secret_file.write_text(secret)
    return path, secret


def bodies_file(opts: Options, case: Case) -> Path:
    records = case.records or opts.records_per_case
    spec = WorkloadSpec(
        profiles=case.profiles,
        batch=case.batch,
        zipf=opts.zipf,
        late_fraction=case.late,
        partitions=case.concurrency,
        seed=opts.seed,
    )
    path = opts.workdir / (
        f"bodies-{case.profiles}-{case.batch}-{case.concurrency}-{opts.zipf}-{case.late}-"
        f"{opts.seed}-{records}.jsonl"
    )
    if not path.exists():
        log(opts, f"generating {records} records in batches of {case.batch}")
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for body in Workload(spec).bodies(records):
                f.write(body + b"\n")
        tmp.rename(path)
        _check_bodies(path)
    return path


def _check_bodies(path: Path) -> None:
    """Every workload record must be valid: the figures count records, not rejections."""
    with open(path, "rb") as f:
        validated(f.readline(), Validator(), time.time())


def fresh_db(opts: Options, seed: Path, name: str) -> Path:
    target = opts.workdir / f"{name}.db"
    for old in opts.workdir.glob(f"{name}.db*"):
        old.unlink()
    shutil.copyfile(seed, target)
    return target


# --- processes --------------------------------------------------------------------------------


def wait_ready(port: int, proc: subprocess.Popen[bytes], path: str, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not become ready")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def family(pid: int) -> list[int]:
    """The process and its descendants (`--writer process` runs the merge in a child)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(parents.get(current, []))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the process and its descendants."""
    total = 0
    for member in family(pid):
        try:
            with open(f"/proc/{member}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, key: str) -> int:
    """A /proc status figure (VmHWM, VmRSS) summed over the process and its descendants."""
    total = 0
    for member in family(pid):
        try:
            with open(f"/proc/{member}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def drive(
    opts: Options,
    port: int,
    server_pid: int,
    bodies: Path,
    concurrency: int,
    *more: str,
) -> dict[str, Any]:
    """Run the load generator; measure the server's CPU over the loadgen's measured window."""
    cmd = [
        PY, "-m", "benchmarks.loadgen", "--port", str(port), "--bodies", str(bodies),
        "--concurrency", str(concurrency), *more,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=_root())
    assert proc.stdout is not None
    cpu0 = cpu1 = None
    result: dict[str, Any] = {}
    for line in proc.stdout:
        text = line.decode().strip()
        if text == "MEASURE":
            cpu0 = cpu_seconds(server_pid)
        elif text == "STOP":
            cpu1 = cpu_seconds(server_pid)
        elif text.startswith("{"):
            result = orjson.loads(text)
    if proc.wait() != 0 or not result:
        raise RuntimeError("load generator failed")
    if cpu0 is not None and cpu1 is not None and result["records_ok"]:
        result["cpu_us_per_record"] = (cpu1 - cpu0) / result["records_ok"] * 1e6
        result["cpu_cores"] = (cpu1 - cpu0) / max(1e-9, result["window_s"])
    result["peak_rss_mb"] = status_kb(server_pid, "VmHWM") / 1024
    return result


def _root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def store_flags(serve_args: list[str]) -> list[str]:
    """The flags of `peoplebase serve` that shape the SQLite store, for the storage floor."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag in ("--log-cache", "--write-behind", "--held-profiles"):
        parser.add_argument(flag)
    known, _ = parser.parse_known_args(serve_args)
    out = []
    for name, value in vars(known).items():
        if value is not None:
            out += ["--" + name.replace("_", "-"), value]
    return out


def serve_product(opts: Options, db: Path, case: Case) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [
        PY, "-m", "peoplebase", "serve", "--db", str(db), "--port", str(port),
        "--tokens", "open", "--log-level", "warning", "--synchronous", case.synchronous,
        *case.extra,
    ]  # fmt: skip
    log_file = open(opts.workdir / "server.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=_root())
    wait_ready(port, proc, "/healthz")
    return proc, port


def serve_http_floor(opts: Options) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [PY, "-m", "benchmarks.floors", "http", "--port", str(port)]
    log_file = open(opts.workdir / "floor.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=_root())
    wait_ready(port, proc, "/")
    return proc, port


# --- one case ---------------------------------------------------------------------------------


def run_case(opts: Options, case: Case) -> dict[str, Any]:
    """The three measurements of one case; end to end and storage apply the same records."""
    seed, secret = seeded_db(opts, case.profiles)
    bodies = bodies_file(opts, case)
    total_bodies = max(1, (case.records or opts.records_per_case) // case.batch)
    warm = max(1, round(total_bodies * opts.warmup_fraction))
    row: dict[str, Any] = {"case": case.name, "profiles": case.profiles, "batch": case.batch}
    row.update(concurrency=case.concurrency, synchronous=case.synchronous)
    row["records"] = (total_bodies - warm) * case.batch

    log(opts, f"{case.name}: end to end")
    db = fresh_db(opts, seed, "e2e")
    proc, port = serve_product(opts, db, case)
    try:
        row["e2e"] = drive(
            opts, port, proc.pid, bodies, case.concurrency, "--warmup-bodies", str(warm)
        )
    finally:
        stop(proc)

    log(opts, f"{case.name}: storage floor")
    group = max(case.batch, min(case.concurrency * case.batch, 20_000))
    db = fresh_db(opts, seed, "floor")
    out = subprocess.run(
        [
            PY,
            "-m",
            "benchmarks.floors",
            "storage",
            "--db",
            str(db),
            "--bodies",
            str(bodies),
            "--group",
            str(group),
            "--warmup-bodies",
            str(warm),
            "--synchronous",
            case.synchronous,
            *store_flags(case.extra),
        ],  # fmt: skip
        check=True,
        capture_output=True,
        cwd=_root(),
    )
    row["storage"] = orjson.loads(out.stdout)

    log(opts, f"{case.name}: HTTP floor")
    proc, port = serve_http_floor(opts)
    try:
        timed = ["--cycle", "--warmup", str(opts.http_warmup), "--duration", str(opts.http_seconds)]
        row["http"] = drive(opts, port, proc.pid, bodies, case.concurrency, *timed)
    finally:
        stop(proc)

    if case.query_at_half_rate:
        rate = row["e2e"]["records_per_s"] / 2
        log(opts, f"{case.name}: /api/query/engage while ingesting {rate:.0f} records/s")
        db = fresh_db(opts, seed, "e2e")
        proc, port = serve_product(opts, db, case)
        try:
            more = ["--rate", str(rate), "--query-secret", secret, "--warmup-bodies", str(warm)]
            more += ["--query-profiles", str(case.profiles)]
            more += ["--limit-bodies", str(max(warm + 1, total_bodies // 2))]
            row["query"] = drive(opts, port, proc.pid, bodies, case.concurrency, *more)
        finally:
            stop(proc)
    return row


def soak(opts: Options, minutes: float, extra: list[str] | None = None) -> dict[str, Any]:
    """Closed-loop ingestion for `minutes`, sampling the server's RSS every 30 s."""
    case = Case(100_000, 50, 16)
    case.extra = [*case.extra, *(extra or [])]
    seed, _ = seeded_db(opts, case.profiles)
    bodies = bodies_file(opts, case)
    db = fresh_db(opts, seed, "soak")
    proc, port = serve_product(opts, db, case)
    samples: list[tuple[float, float]] = []
    import threading

    done = threading.Event()

    def sample() -> None:
        t0 = time.time()
        while not done.wait(30.0 if minutes >= 2 else 1.0):
            samples.append((time.time() - t0, status_kb(proc.pid, "VmRSS") / 1024))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        log(opts, f"soak: {minutes} minutes")
        timed = ["--cycle", "--shift", "--warmup", "0", "--duration", str(minutes * 60)]
        result = drive(opts, port, proc.pid, bodies, 16, *timed)
    finally:
        done.set()
        stop(proc)
    result["rss_mb_over_time"] = [(round(t), round(mb, 1)) for t, mb in samples]
    return result


# --- the table --------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:  # nan travels through JSON as null
        return "-"
    return f"{value:,.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "case",
        "e2e rec/s",
        "storage floor",
        "e2e/storage",
        "HTTP floor",
        "e2e/HTTP",
        "p50 ms",
        "p99 ms",
        "CPU us/rec",
        "RSS MB",
        "503s",
        "query p99 ms",
    )
    lines = []
    for r in rows:
        e2e, storage, http = r["e2e"], r["storage"], r["http"]
        query = r.get("query")
        lines.append(
            (
                r["case"],
                _fmt(e2e["records_per_s"]),
                _fmt(storage["records_per_s"]),
                _fmt(e2e["records_per_s"] / storage["records_per_s"], 2),
                _fmt(http["records_per_s"]),
                _fmt(e2e["records_per_s"] / http["records_per_s"], 2),
                _fmt(e2e["p50_ms"], 1),
                _fmt(e2e["p99_ms"], 1),
                _fmt(e2e.get("cpu_us_per_record", float("nan")), 1),
                _fmt(e2e["peak_rss_mb"]),
                str(e2e["statuses"].get("503", 0)),
                _fmt(query["query_p99_ms"], 1) if query else "-",
            )
        )
    widths = [max([len(h), *(len(line[i]) for line in lines)]) for i, h in enumerate(head)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def cases(args: argparse.Namespace) -> list[Case]:
    if args.quick:
        return [Case(1_000, 50, 4, query_at_half_rate=True)]
    chosen = [
        Case(100_000, 50, 16, query_at_half_rate=True),
        Case(100_000, 2000, 16),
        Case(100_000, 50, 16, late=0.0),
        Case(100_000, 2000, 16, late=0.0),
    ]
    if args.full:
        chosen += [
            Case(100_000, 1, 16),
            Case(100_000, 50, 64),
            Case(100_000, 50, 16, "normal"),
            Case(100_000, 2000, 16, "normal"),
            Case(1_000_000, 50, 16),
            Case(1_000_000, 2000, 16),
            # overload: far more records in flight than the queue takes; p99 must stay bounded
            Case(
                100_000,
                2000,
                64,
                extra=["--queue-records", "40000"],
                label="overload",
                records=600_000,
            ),
        ]
    return chosen


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Peoplebase ingestion benchmarks (one table).")
    p.add_argument("--full", action="store_true", help="the long matrix and the 10-minute soak")
    p.add_argument("--quick", action="store_true", help="a tiny configuration, for CI")
    p.add_argument("--records", type=int, default=None, help="records sent per case")
    p.add_argument("--warmup", type=float, default=0.1, help="share of records not measured")
    p.add_argument("--http-seconds", type=float, default=None, help="HTTP floor duration")
    p.add_argument("--soak-minutes", type=float, default=10.0)
    p.add_argument("--only", action="append", help="run only cases whose name contains this")
    p.add_argument("--no-soak", action="store_true", help="with --full: skip the soak")
    p.add_argument("--zipf", type=float, default=0.8, help="distinct_id skew exponent")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", default=None, help="keep databases and bodies here")
    p.add_argument("--json", default=None, help="also write every measurement to this file")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--serve-args",
        default="",
        help="more `peoplebase serve` flags for every case, e.g. '--writer process'",
    )
    args = p.parse_args(argv)
    records = args.records or (5_000 if args.quick else 100_000)
    http_seconds = args.http_seconds or (1.0 if args.quick else 5.0)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pb-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    opts = Options(
        workdir, records, args.warmup, min(1.0, http_seconds / 5), http_seconds,
        args.seed, args.zipf, args.quiet,
    )  # fmt: skip
    started = time.time()
    chosen = [c for c in cases(args) if not args.only or any(o in c.name for o in args.only)]
    if args.serve_args:
        for case in chosen:
            case.extra = [*case.extra, *shlex.split(args.serve_args)]
            case.label = f"{case.label} {args.serve_args}".strip()
    rows = [run_case(opts, case) for case in chosen]
    result: dict[str, Any] = {"rows": rows}
    if args.full and not args.no_soak:
        result["soak"] = soak(opts, args.soak_minutes, shlex.split(args.serve_args or ""))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(
        f"Peoplebase ingestion, {os.cpu_count()} CPUs, {records:,} records per case "
        f"({args.warmup:.0%} warm-up), zipf {args.zipf}, records/s of durable 200s"
    )
    print(table(rows))
    if "soak" in result:
        s = result["soak"]
        rss = ", ".join(f"{t}s:{mb}" for t, mb in s["rss_mb_over_time"])
        print(
            f"soak {args.soak_minutes:g} min: {_fmt(s['records_per_s'])} rec/s, "
            f"p99 {_fmt(s['p99_ms'], 1)} ms, RSS MB over time: {rss}"
        )
    print(f"({time.time() - started:.0f} s in all; work files in {workdir})")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
