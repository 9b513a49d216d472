"""Shared fixtures: an in-process ASGI client over a real SQLite file, and a real server process."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from peoplebase.app import PeoplebaseApp
from peoplebase.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CAPTURES = SHARED / "reference" / "sdk-captures"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AppClient:
    """An httpx client wired straight into a running PeoplebaseApp (real SQLite, real writer)."""

    def __init__(self, app: PeoplebaseApp) -> None:
        self.app = app
        transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 5555))
        self.http = httpx.AsyncClient(transport=transport, base_url="http://peoplebase.test")

    def secret_for(self, token: str) -> str:
        """Rotate and return the secret of a project (created if needed)."""
        store = self.app.store
        if store.project_by_token(token) is None:
            store.create_project(token)
        return store.rotate_secret(token)[1]

    def auth(self, token: str) -> dict[str, str]:
        secret = self.secret_for(token)
        return {"Authorization": "Basic " + base64.b64encode(f"{secret}:".encode()).decode()}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(db=str(tmp_path / "test.db"), tokens="open")


@pytest.fixture
async def client(settings: Settings) -> Iterator[AppClient]:
    app = PeoplebaseApp(settings)
    app.startup()
    c = AppClient(app)
    try:
        yield c  # type: ignore[misc]
    finally:
        await c.http.aclose()
        app.shutdown()


class ServerProcess:
    """`peoplebase serve` as a real process on a free port."""

    def __init__(self, db: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.db = db
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra = extra
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = db.with_suffix(".log")

    def start(self, timeout: float = 20.0) -> ServerProcess:
        env = {**os.environ, **(self.env or {})}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "peoplebase", "serve", "--db", str(self.db), "--port", str(self.port), *self.extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not become ready: {self.log_path.read_text()}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode if self.proc else None

    def secret(self, token: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "peoplebase", "projects", "rotate-secret", "--db", str(self.db), "--token", token, "--json"],
            check=True,
            capture_output=True,
        )
        import json

        return str(json.loads(out.stdout)["secret"])

    def query(self, token: str, **params: str) -> dict:
        secret = self.secret(token)
        r = httpx.post(self.url + "/api/query/engage", data=params, auth=(secret, ""), timeout=30)
        r.raise_for_status()
        return dict(r.json())


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(tmp_path / "server.db", "--tokens", "open").start()
    try:
        yield s
    finally:
        s.stop()
