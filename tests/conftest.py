"""Shared fixtures: an in-process ASGI client over a real SQLite file, and a real server process."""

from __future__ import annotations

import base64
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg_pool.base
import pytest

from peoplebase.app import PeoplebaseApp
from peoplebase.settings import Settings

# psycopg_pool adds a random jitter to each new connection's lifetime with the `random`
# module's shared generator, from its worker threads. A PostgreSQL store's read pool that
# connects while hypothesis draws a test case changes that generator under it, which
# hypothesis reports as a strategy using `random` (an error here, warnings being errors),
# and the case as flaky. The pool gets a generator of its own.
psycopg_pool.base.random = random.Random().random  # type: ignore[attr-defined]

ROOT = Path(__file__).resolve().parent.parent
# Real SDK requests (tests/golden/sdk-captures/README.md), kept in the repository so the suite
# needs nothing outside it.
CAPTURES = ROOT / "tests" / "golden" / "sdk-captures"


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


# --- storage backends -----------------------------------------------------------------------
#
# Tests that take `db_url` (directly, or through `settings`/`client`) run on SQLite; a module or
# test marked `all_backends` runs once per backend: SQLite and PostgreSQL. Each PostgreSQL test
# gets a fresh database cloned from a template that has the migrations applied (fast: no DDL
# per test). The server is PEOPLEBASE_TEST_PG (default:
# the machine's PostgreSQL on 127.0.0.1:5432, trust auth). It must be up: these tests never skip.
# Databases are named pbtest_<pid>_<n>.

BACKENDS = ("sqlite", "postgres")
PG_ADMIN_URL = os.environ.get("PEOPLEBASE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def pg_url(dbname: str) -> str:
    import psycopg

    info = psycopg.conninfo.conninfo_to_dict(PG_ADMIN_URL)
    info["dbname"] = dbname
    user = info.get("user", "postgres")
    host = info.get("host", "127.0.0.1")
    port = info.get("port", 5432)
    password = f":{info['password']}" if info.get("password") else ""
    return f"postgresql://{user}{password}@{host}:{port}/{dbname}"


_DROP_DATABASES = """
import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    for prefix in sys.argv[2:]:
        names = [n for (n,) in conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY datname DESC",
            (prefix,))]
        for name in names:
            try:
                conn.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)
            except psycopg.Error:
                pass
"""


class PostgresDatabases:
    """Creates test databases from one migrated template.

    DROP DATABASE costs a checkpoint (seconds on a busy machine), CREATE DATABASE … TEMPLATE
    a few milliseconds: the databases of a run are dropped after it, by a detached process,
    and databases of runs that died are dropped when the next run starts.
    """

    def __init__(self) -> None:
        import psycopg

        self.admin = psycopg.connect(PG_ADMIN_URL, autocommit=True)
        self.prefix = f"pbtest_{os.getpid()}_"
        self.template = self.prefix + "template"
        self.count = 0
        self._forget_dead_runs()
        self.admin.execute(f'CREATE DATABASE "{self.template}"')
        from peoplebase.store.postgres import PostgresStore

        PostgresStore(pg_url(self.template)).migrate()

    def _forget_dead_runs(self) -> None:
        """Drop, in the background, the databases of earlier runs whose process is gone."""
        dead: set[str] = set()
        for (name,) in self.admin.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, 'pbtest_')"
        ).fetchall():
            pid = int(name.split("_")[1])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                dead.add(f"pbtest_{pid}_")
            except PermissionError:
                pass
        if dead:
            self._drop_in_background(sorted(dead))

    @staticmethod
    def _drop_in_background(prefixes: list[str]) -> None:
        subprocess.run(
            ["sh", "-c", 'nohup "$0" -c "$@" >/dev/null 2>&1 &', sys.executable, _DROP_DATABASES, PG_ADMIN_URL, *prefixes],
            check=True,
        )

    def create(self) -> str:
        self.count += 1
        name = f"{self.prefix}{self.count}"
        self.admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        return name

    def close(self) -> None:
        self.admin.close()
        self._drop_in_background([self.prefix])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "all_backends"
    ):
        metafunc.parametrize("backend", BACKENDS)


@pytest.fixture
def backend() -> str:
    """The storage backend of this test: 'sqlite', unless the test is marked all_backends."""
    return "sqlite"


@pytest.fixture(scope="session")
def postgres_databases() -> Iterator[PostgresDatabases]:
    databases = PostgresDatabases()
    try:
        yield databases
    finally:
        databases.close()


@pytest.fixture
def postgres_url(postgres_databases: PostgresDatabases) -> str:
    """A fresh, migrated PostgreSQL database for this test."""
    return pg_url(postgres_databases.create())


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The --db value for this test's backend: a SQLite file, or a fresh PostgreSQL database."""
    if backend == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return str(tmp_path / "test.db")


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(db=db_url, tokens="open")


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

    def __init__(
        self,
        db: Path | str,
        *extra: str,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.db = db
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra = extra
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = log_path or Path(db).with_suffix(".log")  # a PostgreSQL URL needs log_path

    def start(self, timeout: float = 20.0) -> ServerProcess:
        env = {**os.environ, **(self.env or {})}
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "peoplebase",
                    "serve",
                    "--db",
                    str(self.db),
                    "--port",
                    str(self.port),
                    *self.extra,
                ],
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
            [
                sys.executable,
                "-m",
                "peoplebase",
                "projects",
                "rotate-secret",
                "--db",
                str(self.db),
                "--token",
                token,
                "--json",
            ],
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
