"""`--writer process`: merges and commits in a child process, which comes back if it dies."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.e2e


def children_of(pid: int) -> list[int]:
    """The writer processes of a server (not multiprocessing's resource tracker)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"spawn_main" in f.read():
                        out.append(int(entry))
    return out


def send(server: ServerProcess, did: str, **ops: object) -> httpx.Response:
    return httpx.post(
        server.url + "/engage?verbose=1",
        json=[{"$token": "wp", "$distinct_id": did, **ops}],
        timeout=30,
    )


def test_child_process_commits_and_is_restarted_after_a_crash(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "wp.db", "--tokens", "open", "--writer", "process").start()
    try:
        assert server.proc is not None
        r = send(server, "a", **{"$set": {"x": 1}})
        assert r.json() == {"status": 1, "error": None}
        children = children_of(server.proc.pid)
        assert len(children) == 1, children  # the writer process
        os.kill(children[0], signal.SIGKILL)
        time.sleep(0.3)
        r = send(server, "a", **{"$add": {"n": 2}})  # a new writer process takes this group
        assert r.status_code == 200 and r.json()["status"] == 1
        new_children = children_of(server.proc.pid)
        assert len(new_children) == 1 and new_children != children
        props = server.query("wp", distinct_id="a")["results"][0]["$properties"]
        assert props["x"] == 1 and props["n"] == 2
        assert "the writer process is gone; starting a new one" in server.log_path.read_text()
    finally:
        assert server.stop() == 0


def test_child_ends_with_the_server(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "wp2.db", "--tokens", "open", "--writer", "process").start()
    try:
        assert server.proc is not None
        assert send(server, "b", **{"$set": {"y": 1}}).status_code == 200
        [child] = children_of(server.proc.pid)
    finally:
        server.kill()  # SIGKILL: the child sees its pipe close and exits on its own
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{child}"):
        with open(f"/proc/{child}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break  # exited, waiting to be reaped by init
        time.sleep(0.05)
    state = "gone"
    if os.path.exists(f"/proc/{child}"):
        with open(f"/proc/{child}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    assert state in ("Z", "gone"), state
