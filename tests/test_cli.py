"""The `peoplebase` command line: projects, profiles, migrate, settings from flags and
`PEOPLEBASE_*` variables, token modes, and graceful shutdown on SIGTERM.

Commands that need no server run in-process with click's CliRunner; everything about serving
starts a real process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from peoplebase.cli import main, serve
from peoplebase.settings import SETTINGS
from tests.conftest import ROOT, ServerProcess, free_port

HEX = set("0123456789abcdef")


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def create(db: Path, token: str, name: str = "") -> dict[str, Any]:
    r = run("projects", "create", "--token", token, "--name", name, "--json", "--db", str(db))
    assert r.exit_code == 0, r.output
    return dict(json.loads(r.stdout))


def engage(url: str, record: dict[str, Any], **params: str) -> httpx.Response:
    return httpx.post(url + "/engage", json=record, params=params, timeout=10)


# --- projects -------------------------------------------------------------------------------


def test_projects_create_json(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    made = create(db, "tok-1", "Shop")
    assert made["token"] == "tok-1"
    assert made["name"] == "Shop"
    assert isinstance(made["id"], int) and made["id"] > 0
    assert len(made["secret"]) >= 32 and set(made["secret"]) <= HEX
    second = create(db, "tok-2")
    assert second["id"] != made["id"]
    assert second["secret"] != made["secret"]


def test_projects_create_text(tmp_path: Path) -> None:
    r = run(
        "projects", "create", "--token", "tok-t", "--name", "Text", "--db", str(tmp_path / "t.db")
    )
    assert r.exit_code == 0
    assert "tok-t" in r.stdout and "Text" in r.stdout and "secret:" in r.stdout


def test_projects_create_duplicate_token_fails(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    create(db, "dup")
    r = run("projects", "create", "--token", "dup", "--json", "--db", str(db))
    assert r.exit_code != 0
    assert "already exists" in r.stderr and "'dup'" in r.stderr
    assert r.stdout == ""


def test_projects_create_requires_token(tmp_path: Path) -> None:
    r = run("projects", "create", "--db", str(tmp_path / "p.db"))
    assert r.exit_code != 0
    assert "--token" in r.stderr


def test_projects_list(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    r = run("projects", "list", "--db", str(db))
    assert r.exit_code == 0 and r.stdout.strip() == "no projects"
    assert json.loads(run("projects", "list", "--json", "--db", str(db)).stdout) == []
    a = create(db, "alpha", "First")
    b = create(db, "beta", "Second")
    listed = json.loads(run("projects", "list", "--json", "--db", str(db)).stdout)
    assert [(p["id"], p["token"], p["name"]) for p in listed] == [
        (a["id"], "alpha", "First"),
        (b["id"], "beta", "Second"),
    ]
    assert all("secret" not in p and "secret_hash" not in p for p in listed)
    text = run("projects", "list", "--db", str(db)).stdout.splitlines()
    assert len(text) == 3  # header + two projects
    assert "alpha" in text[1] and "First" in text[1]
    assert "beta" in text[2] and "Second" in text[2]


def test_projects_rotate_secret(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    made = create(db, "rot")
    r = run("projects", "rotate-secret", "--token", "rot", "--json", "--db", str(db))
    assert r.exit_code == 0
    rotated = json.loads(r.stdout)
    assert rotated["token"] == "rot" and rotated["id"] == made["id"]
    assert rotated["secret"] != made["secret"] and set(rotated["secret"]) <= HEX
    text = run("projects", "rotate-secret", "--token", "rot", "--db", str(db))
    assert text.exit_code == 0 and "new secret for rot" in text.stdout
    unknown = run("projects", "rotate-secret", "--token", "nope", "--db", str(db))
    assert unknown.exit_code != 0
    assert "no project with token 'nope'" in unknown.stderr


def test_secrets_authenticate_and_rotation_revokes(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    old = create(db, "sec")["secret"]
    server = ServerProcess(db).start()
    try:
        assert (
            engage(server.url, {"$token": "sec", "$distinct_id": "u", "$set": {"a": 1}}).text == "1"
        )
        q = httpx.post(server.url + "/api/query/engage", auth=(old, ""), timeout=10)
        assert q.status_code == 200 and q.json()["total"] == 1
        new = json.loads(
            run("projects", "rotate-secret", "--token", "sec", "--json", "--db", str(db)).stdout
        )["secret"]
        assert (
            httpx.post(server.url + "/api/query/engage", auth=(old, ""), timeout=10).status_code
            == 401
        )
        assert (
            httpx.post(server.url + "/api/query/engage", auth=(new, ""), timeout=10).status_code
            == 200
        )
    finally:
        assert server.stop() == 0


# --- profiles get ---------------------------------------------------------------------------


def test_profiles_get(server: ServerProcess) -> None:
    t = int(time.time()) - 60
    r = engage(
        server.url,
        {
            "$token": "shop",
            "$distinct_id": "u-1",
            "$time": t,
            "$set": {"plan": "pro"},
            "$add": {"n": 2},
        },
    )
    assert r.text == "1"
    got = run("profiles", "get", "--project", "shop", "u-1", "--db", str(server.db))
    assert got.exit_code == 0
    expected_seen = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
    assert json.loads(got.stdout) == {
        "$distinct_id": "u-1",
        "$properties": {"plan": "pro", "n": 2, "$last_seen": expected_seen},
    }
    missing = run("profiles", "get", "--project", "shop", "u-2", "--db", str(server.db))
    assert missing.exit_code != 0
    assert "no profile 'u-2' in project 'shop'" in missing.stderr
    no_project = run("profiles", "get", "--project", "nope", "u-1", "--db", str(server.db))
    assert no_project.exit_code != 0
    assert "no project with token 'nope'" in no_project.stderr


# --- migrate --------------------------------------------------------------------------------


def test_migrate(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    newest = max(
        int(p.name.split("_")[0]) for p in (ROOT / "peoplebase/store/sql/sqlite").glob("*.sql")
    )
    first = run("migrate", "--db", str(db))
    assert first.exit_code == 0
    assert first.stdout.strip() == f"{db}: schema version {newest}"
    assert db.exists()
    again = run("migrate", "--db", str(db))  # nothing left to do, same answer
    assert again.exit_code == 0 and again.stdout == first.stdout
    via_env = run("migrate", env={"PEOPLEBASE_DB": str(tmp_path / "env.db")})
    assert via_env.exit_code == 0 and (tmp_path / "env.db").exists()


def test_migrate_into_missing_directory_fails(tmp_path: Path) -> None:
    r = run("migrate", "--db", str(tmp_path / "no" / "such" / "dir.db"))
    assert r.exit_code != 0
    assert "cannot migrate" in r.stderr


# --- help and settings ----------------------------------------------------------------------

COMMANDS = [
    [],
    ["serve"],
    ["migrate"],
    ["projects"],
    ["projects", "create"],
    ["projects", "list"],
    ["projects", "rotate-secret"],
    ["profiles"],
    ["profiles", "get"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "peoplebase")
def test_help(command: list[str]) -> None:
    for flag in ("--help", "-h"):
        r = run(*command, flag)
        assert r.exit_code == 0
        assert r.stdout.startswith("Usage: ")
        assert " ".join(["main", *command]) in r.stdout.splitlines()[0]


def test_help_and_version_as_a_process() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "peoplebase", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0
    for command in ("serve", "projects", "profiles", "migrate"):
        assert command in r.stdout
    v = subprocess.run(
        [sys.executable, "-m", "peoplebase", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert v.returncode == 0 and v.stdout.startswith("peoplebase, version ")


def _other_value(default: Any, choices: tuple[str, ...] | None) -> Any:
    if choices:
        return next(c for c in choices if c != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 7
    if isinstance(default, float):
        return default + 0.5
    return f"{default}-changed"


def test_every_setting_is_a_flag_and_an_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {s.name: _other_value(s.default, s.choices) for s in SETTINGS}
    # By flag: --reorder-window for reorder_window.
    argv: list[str] = []
    for name, value in values.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    assert serve.make_context("serve", argv).params == values
    # By environment: PEOPLEBASE_REORDER_WINDOW for reorder_window.
    for name, value in values.items():
        monkeypatch.setenv("PEOPLEBASE_" + name.upper(), str(value))
    assert serve.make_context("serve", []).params == values
    # A flag wins over the environment.
    assert serve.make_context("serve", ["--port", "1234"]).params["port"] == 1234
    # Defaults, with nothing set.
    for name in values:
        monkeypatch.delenv("PEOPLEBASE_" + name.upper())
    assert serve.make_context("serve", []).params == {s.name: s.default for s in SETTINGS}


def test_bad_setting_value_is_refused() -> None:
    r = CliRunner().invoke(main, ["serve", "--tokens", "sometimes"])
    assert r.exit_code == 2
    assert "sometimes" in r.stderr and "open" in r.stderr
    r = CliRunner().invoke(main, ["serve", "--port", "eighty"], env={})
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["serve"], env={"PEOPLEBASE_MAX_RECORDS": "many"})
    assert r.exit_code == 2 and "'many'" in r.stderr
    r = CliRunner().invoke(main, ["serve", "--max-log-entries", "-1"], env={})
    assert r.exit_code == 2 and "--max-log-entries" in r.stderr and "0 (no limit)" in r.stderr
    r = CliRunner().invoke(main, ["serve", "--log-cache", "-5"], env={})
    assert r.exit_code == 2 and "--log-cache" in r.stderr and "0 (off)" in r.stderr


# --- serving: bare `peoplebase`, env vars, token modes --------------------------------------


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "server exited"
        try:
            r = httpx.get(url + "/healthz", timeout=1)
            if r.status_code == 200:
                return dict(r.json())
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("server did not become ready")


def test_bare_peoplebase_serves_with_env_settings(tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "from-env.db"
    env = {
        **os.environ,
        "PEOPLEBASE_PORT": str(port),
        "PEOPLEBASE_DB": str(db),
        "PEOPLEBASE_MAX_RECORDS": "2",
    }
    log = tmp_path / "bare.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "peoplebase"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        assert _wait_healthy(url, proc)["status"] == "ok"
        record = {"$token": "env", "$distinct_id": "u", "$set": {"a": 1}}
        assert engage(url, record).text == "1"
        too_many = httpx.post(url + "/engage", json=[record] * 3, timeout=10)
        assert too_many.status_code == 400  # PEOPLEBASE_MAX_RECORDS=2 is in force
        assert too_many.json()["code"] == 400
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert db.exists() and not (tmp_path / "peoplebase.db").exists()
    assert f"starting on {db}, serving http://127.0.0.1:{port}" in log.read_text()
    got = run("profiles", "get", "--project", "env", "u", "--db", str(db))
    assert json.loads(got.stdout)["$properties"]["a"] == 1


def test_tokens_closed_rejects_unknown_tokens(tmp_path: Path) -> None:
    db = tmp_path / "closed.db"
    server = ServerProcess(db, "--tokens", "closed").start()
    try:
        record = {"$token": "stranger", "$distinct_id": "u", "$set": {"a": 1}}
        r = engage(server.url, record, verbose="1")
        assert r.status_code == 200
        assert r.json() == {"status": 0, "error": "$token, unknown project"}
        assert engage(server.url, record).text == "0"
        strict = engage(server.url, record, strict="1")
        assert strict.status_code == 400
        assert strict.json()["failed_records"][0]["field"] == "$token"
        assert json.loads(run("projects", "list", "--json", "--db", str(db)).stdout) == []
        create(db, "stranger")  # once the project exists, its updates are taken
        assert engage(server.url, record, verbose="1").json() == {"status": 1, "error": None}
    finally:
        assert server.stop() == 0
    assert "tokens closed" in server.log_path.read_text()


def test_tokens_open_creates_projects(server: ServerProcess) -> None:
    record = {"$token": "newcomer", "$distinct_id": "u", "$set": {"a": 1}}
    assert engage(server.url, record, verbose="1").json() == {"status": 1, "error": None}
    listed = json.loads(run("projects", "list", "--json", "--db", str(server.db)).stdout)
    assert [p["token"] for p in listed] == ["newcomer"]


def test_non_loopback_address_defaults_to_closed(tmp_path: Path) -> None:
    db = tmp_path / "public.db"
    create(db, "known")
    server = ServerProcess(db, "--host", "0.0.0.0").start()
    try:
        unknown = {"$token": "stranger", "$distinct_id": "u", "$set": {"a": 1}}
        assert engage(server.url, unknown, verbose="1").json() == {
            "status": 0,
            "error": "$token, unknown project",
        }
        known = {"$token": "known", "$distinct_id": "u", "$set": {"a": 1}}
        assert engage(server.url, known, verbose="1").json() == {"status": 1, "error": None}
    finally:
        assert server.stop() == 0
    assert "tokens closed" in server.log_path.read_text()
    tokens = [
        p["token"] for p in json.loads(run("projects", "list", "--json", "--db", str(db)).stdout)
    ]
    assert tokens == ["known"]


def test_loopback_address_defaults_to_open(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "local.db").start()  # --host defaults to 127.0.0.1
    try:
        record = {"$token": "anyone", "$distinct_id": "u", "$set": {"a": 1}}
        assert engage(server.url, record, verbose="1").json() == {"status": 1, "error": None}
    finally:
        assert server.stop() == 0
    assert "tokens open" in server.log_path.read_text()


# --- graceful shutdown ----------------------------------------------------------------------


def test_sigterm_answers_in_flight_requests_and_exits_zero(tmp_path: Path) -> None:
    db = tmp_path / "term.db"
    server = ServerProcess(db, "--tokens", "open").start()
    assert server.proc is not None
    acked: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def burst() -> None:
        with httpx.Client(timeout=10) as http:
            k = 0
            while not stop.is_set():
                k += 1
                record = {"$token": "term", "$distinct_id": "burst", "$append": {"ids": k}}
                try:
                    r = http.post(server.url + "/engage", json=record)
                except httpx.HTTPError:
                    return  # the server stopped taking connections
                if (r.status_code, r.text) != (200, "1"):
                    errors.append(f"{r.status_code} {r.text}")
                    return
                acked.append(k)

    # A request whose body is only half sent when SIGTERM arrives.
    body = json.dumps(
        {"$token": "term", "$distinct_id": "slow", "$set": {"arrived": "after SIGTERM"}}
    ).encode()
    half = len(body) // 2
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    head = (
        f"POST /engage HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[:half])
    writer = threading.Thread(target=burst)
    writer.start()
    try:
        deadline = time.time() + 20
        while len(acked) < 20 and time.time() < deadline:
            time.sleep(0.01)
        assert len(acked) >= 20
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the server is now shutting down, waiting for the open request
        sock.sendall(body[half:])
        response = b""
        while b"\r\n\r\n" not in response or not response.endswith(b"1"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            response += chunk
        assert response.startswith(b"HTTP/1.1 200"), response
        assert response.endswith(b"\r\n\r\n1"), response
        assert server.proc.wait(30) == 0
        assert time.monotonic() - started < 30  # bounded by the graceful-shutdown timeout
    finally:
        stop.set()
        writer.join(15)
        sock.close()
        server.kill()
    assert errors == []
    # Everything answered `1` was committed.
    slow = json.loads(run("profiles", "get", "--project", "term", "slow", "--db", str(db)).stdout)
    assert slow["$properties"]["arrived"] == "after SIGTERM"
    stored = json.loads(
        run("profiles", "get", "--project", "term", "burst", "--db", str(db)).stdout
    )
    assert set(acked) <= set(stored["$properties"]["ids"])
    log = server.log_path.read_text()
    assert "Traceback" not in log and "ERROR" not in log
