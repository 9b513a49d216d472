"""The HTTP server, chosen by measurement: the HTTP floor under each candidate server.

    python -m benchmarks.http_servers [--batch 50] [--seconds 5] [--runs 2]

The floor application (`benchmarks.floors.answer_one`: read the body, answer `1`) runs under
uvicorn with uvloop and httptools (what `peoplebase serve` runs) and under granian (ASGI,
HTTP/1.1, uvloop) when it is installed (`.venv/bin/pip install granian`; not a dependency of
Peoplebase), driven by the same load generator and the same bodies as `benchmarks.run`, the
servers alternating within one run. Prints one table.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .run import PY, _root, drive, free_port, stop, wait_ready
from .workload import Workload, WorkloadSpec


def servers(port: int) -> dict[str, list[str]]:
    out = {
        "uvicorn (uvloop, httptools)": [PY, "-m", "benchmarks.floors", "http", "--port", str(port)]
    }
    granian = shutil.which("granian", path=str(Path(PY).parent)) or shutil.which("granian")
    if importlib.util.find_spec("granian") is not None and granian:
        out["granian (asgi, uvloop)"] = [
            granian, "--interface", "asgi", "--http", "1", "--loop", "uvloop", "--no-ws",
            "--port", str(port), "--log-level", "warning", "benchmarks.floors:answer_one",
        ]  # fmt: skip
    return out


def measure(name: str, cmd: list[str], port: int, bodies: Path, seconds: float) -> dict[str, Any]:
    proc = subprocess.Popen(cmd, cwd=_root(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, proc, "/")
        timed = ["--cycle", "--warmup", "1", "--duration", str(seconds)]
        result = drive(None, port, proc.pid, bodies, 16, *timed)  # type: ignore[arg-type]
    finally:
        stop(proc)
    return {"server": name, **result}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="The HTTP floor under each installed server.")
    p.add_argument("--batch", type=int, default=50, help="records per request")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pb-http-") as tmp:
        bodies = Path(tmp) / "bodies.jsonl"
        spec = WorkloadSpec(profiles=100_000, batch=args.batch, zipf=0.8, late_fraction=0.1,
                            partitions=16, seed=1)  # fmt: skip
        with open(bodies, "wb") as f:
            for body in Workload(spec).bodies(max(20_000, args.batch * 64)):
                f.write(body + b"\n")
        rows = []
        for run in range(args.runs):
            for name in servers(0):
                port = free_port()
                cmd = servers(port)[name]
                rows.append({"run": run + 1, **measure(name, cmd, port, bodies, args.seconds)})
    print(
        f"HTTP floor, 16 connections, batches of {args.batch}, {args.seconds:g} s per measurement"
    )
    print("| server | run | records/s | requests/s | p99 ms | CPU us/request |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cpu = r.get("cpu_us_per_record", 0.0) * args.batch
        print(
            f"| {r['server']} | {r['run']} | {r['records_per_s']:,.0f} | "
            f"{r['requests'] / r['window_s']:,.0f} | {r['p99_ms']:.2f} | {cpu:.1f} |"
        )


if __name__ == "__main__":
    main()
