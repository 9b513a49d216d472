"""The official Node SDK (npm `mixpanel` 0.24.0) against a real `peoplebase serve` process.

`tests/js/node_sdk_driver.js` makes every `people.*` call, one after another, with the
modifiers the SDK supports (`$ip`, `$ignore_time`, `$time` as a Date and as a number), under
each combination of `verbose` and `geolocate`. No callback may receive an error, and every
profile read back over `/api/query/engage` must be exactly what Mixpanel's semantics give.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, ServerProcess

pytestmark = pytest.mark.e2e

DRIVER = ROOT / "tests" / "js" / "node_sdk_driver.js"
GEO = ("$city", "$region", "$country_code", "$timezone")


def last_seen(t: float) -> str:
    """Mixpanel's `$last_seen` format: YYYY-MM-DDTHH:MM:SS in UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(t)))


def js_iso(ms: int) -> str:
    """What JavaScript's Date.prototype.toISOString gives for a time in milliseconds."""
    moment = datetime.fromtimestamp(ms // 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def date(ms: int) -> dict[str, int]:
    """A step argument that the driver turns into a JavaScript Date."""
    return {"$date": ms}


def run_node(plan: dict[str, Any]) -> list[dict[str, Any]]:
    node = shutil.which("node")
    assert node is not None, "node is not installed: run `make node` (the Makefile installs it)"
    assert (ROOT / "node_modules" / "mixpanel").is_dir(), "run `make node` first (npm ci)"
    proc = subprocess.run(
        [node, str(DRIVER)],
        input=json.dumps(plan).encode(),
        capture_output=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return [json.loads(line) for line in proc.stdout.decode().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def node_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    db = tmp_path_factory.mktemp("node-sdk") / "server.db"
    server = ServerProcess(db, "--tokens", "open").start()
    try:
        yield server
    finally:
        server.stop()


def profiles(server: ServerProcess, token: str) -> dict[str, dict[str, Any]]:
    body = server.query(token)
    assert body["total"] == len(body["results"])
    return {r["$distinct_id"]: r["$properties"] for r in body["results"]}


def steps_and_expectations(t0: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every people call, and the profiles Mixpanel's semantics give for them.

    `t0` is a whole second an hour in the past; explicit `$time` values are placed after it.
    Expected profiles hold "RECENT" for a `$last_seen` set by an update without `$time`
    (the server's receipt time).
    """
    charge_ms = (t0 + 100) * 1000 + 250
    signup_ms = 1704164645000  # 2024-01-02T03:04:05Z
    steps: list[tuple[str, list[Any]]] = [
        # ada: every operation in arrival order, no $time
        (
            "set",
            [
                "ada",
                {"name": "Ada", "plan": "free", "ip": "203.0.113.7", "signup": date(signup_ms)},
            ],
        ),
        ("set", ["ada", "plan", "pro", {"$ignore_time": True}]),
        ("set_once", ["ada", {"plan": "enterprise", "first_source": "node"}]),
        ("set_once", ["ada", "first_source", "other"]),
        ("increment", ["ada", "logins"]),
        ("increment", ["ada", "logins", 2, {"$ip": "198.51.100.4"}]),
        ("increment", ["ada", {"credits": 10, "balance": -2.5}]),
        ("append", ["ada", "events", "signup"]),
        ("append", ["ada", {"events": "login", "pages": "home"}]),
        ("append", ["ada", "events", {"kind": "click"}, {"$ignore_time": True}]),
        ("union", ["ada", {"tags": ["a", "b"]}]),
        ("union", ["ada", {"tags": ["b", "c"], "langs": "en"}, {"$ip": "203.0.113.8"}]),
        ("remove", ["ada", {"events": "signup"}]),
        ("unset", ["ada", "first_source"]),
        ("unset", ["ada", ["balance", "never_set"], {"$ignore_time": True}]),
        ("track_charge", ["ada", 9.99, {"sku": "A"}]),
        ("track_charge", ["ada", 20, {"sku": "B", "$time": date(charge_ms)}]),
        # bob: charges, then cleared (sent as $set {"$transactions": []})
        ("track_charge", ["bob", 5]),
        ("track_charge", ["bob", 7, {"$ignore_time": True, "$ip": "203.0.113.9"}]),
        ("clear_charges", ["bob"]),
        ("clear_charges", ["bob", {"$ignore_time": True}]),
        # cat: deleted; dan: deleted, then created again by a later update
        ("set", ["cat", {"name": "Cat"}]),
        ("delete_user", ["cat"]),
        ("set", ["dan", {"a": 1}]),
        ("delete_user", ["dan", {"$ignore_time": True}]),
        ("set", ["dan", {"b": 2}]),
        # eve: explicit $time (Date = ms, number = seconds or ms) decides the order
        ("set", ["eve", {"step": "second"}, {"$time": date((t0 + 20) * 1000)}]),
        ("set", ["eve", {"step": "first", "early": True}, {"$time": t0 + 10}]),
        ("unset", ["eve", "early", {"$time": t0 + 15}]),
        ("increment", ["eve", "n", 5, {"$time": (t0 + 30) * 1000}]),
        ("set_once", ["eve", {"origin": "late"}, {"$time": t0 + 40}]),
        ("set_once", ["eve", {"origin": "early"}, {"$time": t0 + 5}]),
        ("append", ["eve", "hist", "a", {"$time": t0 + 1}]),
        ("append", ["eve", "hist", "b", {"$time": t0 + 55.5}]),
        ("remove", ["eve", {"hist": "a"}, {"$time": date((t0 + 60) * 1000)}]),
        (
            "union",
            ["eve", {"tags": ["x"]}, {"$time": date((t0 + 70) * 1000), "$ignore_time": True}],
        ),
        # fay: a timed delete is final for everything before it
        ("set", ["fay", {"x": 1}, {"$time": t0 + 10}]),
        ("delete_user", ["fay", {"$time": t0 + 20}]),
        ("set", ["fay", {"y": 2}, {"$time": t0 + 15}]),
        ("set", ["fay", {"z": 3}, {"$time": t0 + 25}]),
        # gus: the same timed record twice is a retry; untimed records always apply
        ("increment", ["gus", "n", 1, {"$time": t0 + 10}]),
        ("increment", ["gus", "n", 1, {"$time": t0 + 10}]),
        ("increment", ["gus", "m"]),
        ("increment", ["gus", "m"]),
    ]
    expected: dict[str, Any] = {
        "ada": {
            "name": "Ada",
            "plan": "pro",
            "signup": "2024-01-02T03:04:05.000Z",
            "logins": 3,
            "credits": 10,
            "events": ["login", {"kind": "click"}],
            "pages": ["home"],
            "tags": ["a", "b", "c"],
            "langs": ["en"],
            "$transactions": [
                {"sku": "A", "$amount": 9.99},
                {"sku": "B", "$time": js_iso(charge_ms), "$amount": 20},
            ],
            "$last_seen": "RECENT",
        },
        "bob": {"$transactions": [], "$last_seen": "RECENT"},
        "cat": None,
        "dan": {"b": 2, "$last_seen": "RECENT"},
        "eve": {
            "step": "second",
            "n": 5,
            "origin": "early",
            "hist": ["b"],
            "tags": ["x"],
            "$last_seen": last_seen(t0 + 60),
        },
        "fay": {"z": 3, "$last_seen": last_seen(t0 + 25)},
        "gus": {"n": 1, "m": 2, "$last_seen": "RECENT"},
    }
    return [{"call": c, "args": a} for c, a in steps], expected


@pytest.mark.parametrize("verbose", [False, True], ids=["verbose-off", "verbose-on"])
@pytest.mark.parametrize("geolocate", [False, True], ids=["geolocate-off", "geolocate-on"])
def test_every_people_call(node_server: ServerProcess, verbose: bool, geolocate: bool) -> None:
    token = f"node-{int(verbose)}{int(geolocate)}"
    t0 = int(time.time()) - 3600
    steps, expected = steps_and_expectations(t0)
    config = {
        "host": "127.0.0.1",
        "port": node_server.port,
        "protocol": "http",
        "verbose": verbose,
        "geolocate": geolocate,
    }
    started = time.time()
    lines = run_node({"token": token, "config": config, "steps": steps})
    finished = time.time()

    results = [line for line in lines if "step" in line]
    assert [r["call"] for r in results] == [s["call"] for s in steps]
    errors = [(r["step"], r["call"], r["error"]) for r in results if r["error"] is not None]
    assert errors == []
    assert [line["log"] for line in lines if "log" in line and line["log"][0] == "error"] == []

    stored = profiles(node_server, token)
    assert set(stored) == {did for did, p in expected.items() if p is not None}
    for did, want in expected.items():
        if want is None:
            continue
        got = dict(stored[did])
        for name in GEO + ("$ip", "ip"):
            assert name not in got, f"{did}: {name} must not be stored (no geo database here)"
        if want["$last_seen"] == "RECENT":
            seen = got.pop("$last_seen")
            assert last_seen(started - 1) <= seen <= last_seen(finished + 1), (did, seen)
            want = {k: v for k, v in want.items() if k != "$last_seen"}
        assert got == want, did


def test_deleted_profile_reads_back_as_absent(node_server: ServerProcess) -> None:
    token = "node-delete"
    steps = [
        {"call": "set", "args": ["zed", {"name": "Zed"}]},
        {"call": "delete_user", "args": ["zed"]},
    ]
    lines = run_node(
        {
            "token": token,
            "config": {"host": "127.0.0.1", "port": node_server.port, "protocol": "http"},
            "steps": steps,
        }
    )
    assert [line["error"] for line in lines if "step" in line] == [None, None]
    body = node_server.query(token, distinct_id="zed")
    assert body["total"] == 0
    assert body["results"] == []


def test_driver_reports_server_errors(tmp_path: Path) -> None:
    """The driver is not blind: a record the server rejects reaches the callback as an error."""
    server = ServerProcess(tmp_path / "closed.db", "--tokens", "closed").start()
    try:
        for verbose in (False, True):
            lines = run_node(
                {
                    "token": "no-such-project",
                    "config": {
                        "host": "127.0.0.1",
                        "port": server.port,
                        "protocol": "http",
                        "verbose": verbose,
                    },
                    "steps": [{"call": "set", "args": ["u", {"a": 1}]}],
                }
            )
            errors = [line["error"] for line in lines if "step" in line]
            assert len(errors) == 1
            assert errors[0] is not None and errors[0].startswith("Mixpanel Server Error")
    finally:
        server.stop()
