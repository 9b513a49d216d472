"""Storage faults: a full disk and an unwritable database file answer 503, never 200.

Both run a real server. The full disk is a 2 MB tmpfs the test mounts (the tests run as root;
if the mount is impossible the test fails). The unwritable file is a read-only database file
(served by a process running as `nobody`: root ignores file permissions) met when the server
reopens its database after a fault, and made writable again while the server runs. In both cases:
every write during the fault gets 503 with Retry-After and the log says why; nothing of a
refused request is stored; the server takes writes again by itself once the fault is gone;
what was committed before is intact and PRAGMA integrity_check passes.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import apsw
import httpx
import pytest

from tests.conftest import ServerProcess, free_port

pytestmark = pytest.mark.e2e

TOKEN = "faults"


def engage(url: str, record: dict[str, object]) -> httpx.Response:
    return httpx.post(url + "/engage", json=record, timeout=30)


def integrity(db: Path) -> str:
    conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def profile(db: Path, distinct_id: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "peoplebase", "profiles", "get", "--db", str(db),
         "--project", TOKEN, distinct_id],
        check=True,
        capture_output=True,
    )  # fmt: skip
    import json

    props = json.loads(out.stdout)["$properties"]
    return {k: v for k, v in props.items() if not k.startswith("$")}  # no $last_seen


def assert_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, (r.status_code, r.text)
    assert r.headers["retry-after"] == "1"
    assert r.json() == {
        "code": 503,
        "error": "storage cannot accept writes right now; retry later",
        "status": "Service Unavailable",
    }


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def big_props(name: str) -> dict[str, str]:
    """~130 kB of properties: cannot fit on a full disk."""
    return {f"{name}{i}": "x" * 250 for i in range(500)}


def fill(disk: Path) -> Path:
    """Write a file until the filesystem is full; returns it."""
    filler = disk / "filler"
    chunk = b"\0" * 4096
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return filler


def test_full_disk_answers_503_and_recovers_when_space_returns(
    small_disk: Path, tmp_path: Path
) -> None:
    db = small_disk / "full.db"
    log = tmp_path / "full.log"
    server = ServerProcess(db, "--tokens", "open", log_path=log).start()
    try:
        for k in range(20):
            r = engage(server.url, {"$token": TOKEN, "$distinct_id": "u", "$append": {"k": k}})
            assert (r.status_code, r.text) == (200, "1")
        filler = fill(small_disk)

        for k in range(5):
            r = engage(
                server.url, {"$token": TOKEN, "$distinct_id": "u", "$set": big_props(f"b{k}_")}
            )
            assert_unavailable(r)
        text = log.read_text()
        assert "storage cannot commit, answering 503: database or disk is full" in text
        filler.unlink()  # space returns: the next write commits, with no restart
        r = engage(server.url, {"$token": TOKEN, "$distinct_id": "u", "$set": big_props("after")})
        assert (r.status_code, r.text) == (200, "1")
    finally:
        assert server.stop() == 0
    props = profile(db, "u")
    assert props["k"] == list(range(20))
    assert {k: v for k, v in props.items() if k.startswith("after")} == big_props("after")
    assert set(props) == {"k"} | set(big_props("after"))  # nothing of the refused requests
    assert integrity(db) == "ok"


@pytest.fixture
def nobody_disk() -> Iterator[Path]:
    """A 2 MB tmpfs owned by `nobody` (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="peoplebase-ro-"))
    path.chmod(0o755)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755,uid=65534,gid=65534", "tmpfs", str(path)],
        check=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        shutil.rmtree(path, ignore_errors=True)


def test_unwritable_database_file_answers_503_and_recovers(
    nobody_disk: Path, tmp_path: Path
) -> None:
    """A storage fault makes the server reopen its database; meanwhile the file became
    read-only. Writes answer 503 until it is writable again, then succeed without a restart."""
    db = nobody_disk / "ro.db"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "ro.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             sys.executable, "-m", "peoplebase", "serve", "--db", str(db),
             "--port", str(port), "--tokens", "open",
             # Here the interpreter is a venv whose base lies in root's home: `nobody` can run
             # it through setpriv but cannot exec it again for the writer process. The child's
             # fault handling is the same store code, covered by the full-disk test.
             "--writer", "thread"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        r = engage(url, {"$token": TOKEN, "$distinct_id": "u", "$set": {"before": 1}})
        assert (r.status_code, r.text) == (200, "1")
        filler = fill(nobody_disk)  # a fault: the server drops its write connection
        assert_unavailable(
            engage(url, {"$token": TOKEN, "$distinct_id": "u", "$set": big_props("full")})
        )
        for path in nobody_disk.iterdir():
            if path != filler:
                path.chmod(0o444)  # the database and its WAL files become read-only
        filler.unlink()  # space is back, but the file cannot be written
        for k in range(3):
            assert_unavailable(
                engage(url, {"$token": TOKEN, "$distinct_id": "u", "$set": {f"ro{k}": k}})
            )
        assert (
            "storage cannot commit, answering 503: attempt to write a readonly database"
            in log.read_text()
        )
        for path in nobody_disk.iterdir():
            path.chmod(0o644)  # fixed: the server reopens the file by itself, no restart
        r = engage(url, {"$token": TOKEN, "$distinct_id": "u", "$set": {"after": 1}})
        assert (r.status_code, r.text) == (200, "1")
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    props = profile(db, "u")
    assert props == {"before": 1, "after": 1}  # and nothing of the refused requests
    assert integrity(db) == "ok"
