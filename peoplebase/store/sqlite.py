"""The embedded store: one SQLite file in WAL mode, written by one thread.

Writes come only through `write_group`, which the writer thread calls with every request it
took from the queue: they share one `BEGIN IMMEDIATE … COMMIT` (group commit) and, with
`synchronous=FULL`, one fsync. Reads use their own connection per thread and never block the
writer (WAL).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import apsw
import orjson

from ..merge import Key, LogEntry, Merger, ProfileRow, decode_update, encode_update
from ..types import Applied, Props, Update
from .base import (
    Project,
    StoreUnavailable,
    UnknownProject,
    hash_secret,
    new_secret,
)

log = logging.getLogger(__name__)

_UNAVAILABLE = (
    apsw.FullError,
    apsw.IOError,
    apsw.ReadOnlyError,
    apsw.CantOpenError,
    apsw.BusyError,
    apsw.LockedError,
    apsw.CorruptError,
)


def migrations() -> list[tuple[int, str]]:
    folder = resources.files("peoplebase.store").joinpath("sql/sqlite")
    out = []
    for item in folder.iterdir():
        name = item.name
        if name.endswith(".sql"):
            out.append((int(name.split("_", 1)[0]), item.read_text()))
    return sorted(out)


def _one(conn: apsw.Connection, sql: str, args: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(sql, args).fetchone()
    assert row is not None
    return row[0]


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


class _Backend:
    """MergeBackend over an open write connection (inside a transaction)."""

    def __init__(self, store: SqliteStore, conn: apsw.Connection) -> None:
        self.store = store
        self.conn = conn

    def project_ids(self, tokens: Iterable[str], create: bool) -> dict[str, int]:
        out: dict[str, int] = {}
        cache = self.store._token_ids
        for token in tokens:
            pid = cache.get(token)
            if pid is None:
                row = self.conn.execute(
                    "SELECT id FROM projects WHERE token = ?", (token,)
                ).fetchone()
                if row is None and create:
                    self.conn.execute(
                        "INSERT INTO projects (token, name, secret_hash, created_at) VALUES (?, ?, ?, ?)",
                        (token, "", hash_secret(new_secret()), time.time()),
                    )
                    row = (self.conn.last_insert_rowid(),)
                    log.info("project created for new token %r (id %s)", token, row[0])
                if row is None:
                    continue
                pid = int(row[0])
                self.store._pending_ids[token] = pid
            out[token] = pid
        return out

    def next_seq(self, count: int) -> int:
        value = _one(
            self.conn,
            "UPDATE counters SET value = value + ? WHERE name = 'seq' RETURNING value",
            (count,),
        )
        return int(value) - count + 1

    def load_profiles(self, keys: Sequence[Key]) -> dict[Key, ProfileRow]:
        out: dict[Key, ProfileRow] = {}
        cur = self.conn.cursor()
        sql = (
            "SELECT props, last_time, base, tomb, log_min FROM profiles "
            "WHERE project_id = ? AND distinct_id = ?"
        )
        loads = orjson.loads
        for key in keys:
            for props, last_time, base, tomb, log_min in cur.execute(sql, key):
                out[key] = ProfileRow(
                    loads(props) if props is not None else None,
                    last_time,
                    loads(base) if base is not None else None,
                    tomb,
                    log_min,
                )
        return out

    def load_log(self, key: Key) -> list[LogEntry]:
        rows = self.conn.execute(
            "SELECT time, seq, dedup, body FROM updates WHERE project_id = ? AND distinct_id = ? "
            "ORDER BY time, seq",
            key,
        )
        return [LogEntry(t, s, decode_update(body, t, key[1]), d) for t, s, d, body in rows]

    def delete_log(self, key: Key, before: float, inclusive: bool) -> None:
        op = "<=" if inclusive else "<"
        self.conn.execute(
            f"DELETE FROM updates WHERE project_id = ? AND distinct_id = ? AND time {op} ?",  # noqa: S608
            (key[0], key[1], before),
        )

    def insert_log(self, key: Key, entries: Sequence[LogEntry]) -> None:
        pid, did = key
        self.conn.executemany(
            "INSERT INTO updates (project_id, distinct_id, time, seq, received, dedup, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    pid,
                    did,
                    e.time,
                    e.seq,
                    e.update.received,
                    e.dedup,
                    encode_update(e.update).decode(),
                )
                for e in entries
            ],
        )

    def save_profiles(self, rows: Sequence[tuple[Key, ProfileRow]]) -> None:
        self.conn.executemany(
            "INSERT INTO profiles (project_id, distinct_id, props, last_time, base, tomb, log_min) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (project_id, distinct_id) DO UPDATE SET "
            "props = excluded.props, last_time = excluded.last_time, base = excluded.base, "
            "tomb = excluded.tomb, log_min = excluded.log_min",
            [
                (
                    key[0],
                    key[1],
                    _dumps(row.props) if row.props is not None else None,
                    row.last_time,
                    _dumps(row.base) if row.base is not None else None,
                    row.tomb,
                    row.log_min,
                )
                for key, row in rows
            ],
        )


class SqliteStore:
    def __init__(
        self,
        path: str,
        synchronous: str = "full",
        reorder_window: float = 7 * 86400.0,
        max_properties: int = 2000,
        open_tokens: bool = True,
    ) -> None:
        self.path = path
        self.synchronous = synchronous.upper()
        self.merger = Merger(reorder_window, max_properties, open_tokens)
        self._local = threading.local()
        self._write_conn: apsw.Connection | None = None
        self._token_ids: dict[str, int] = {}
        self._pending_ids: dict[str, int] = {}
        self._write_lock = threading.Lock()

    # --- connections ----------------------------------------------------------------------

    def _connect(self) -> apsw.Connection:
        conn = apsw.Connection(self.path)
        conn.setbusytimeout(10_000)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("PRAGMA wal_autocheckpoint = 10000")
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("PRAGMA cache_size = -65536")
        return conn

    def _reader(self) -> apsw.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only = 1")
            self._local.conn = conn
        return conn

    def _writer(self) -> apsw.Connection:
        if self._write_conn is None:
            self._write_conn = self._connect()
        return self._write_conn

    def open(self) -> None:
        parent = Path(self.path).expanduser().resolve().parent
        if not parent.exists():
            raise StoreUnavailable(f"directory {parent} does not exist")
        try:
            self.migrate()
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc

    def migrate(self) -> int:
        conn = self._writer()
        with self._write_lock:
            current = _one(conn, "PRAGMA user_version")
            applied = current
            for version, sql in migrations():
                if version <= current:
                    continue
                with conn:
                    conn.execute(sql)
                    conn.execute(f"PRAGMA user_version = {int(version)}")
                applied = version
                log.info("applied migration %04d to %s", version, self.path)
            return applied

    def close(self) -> None:
        if self._write_conn is not None:
            self._write_conn.close()
            self._write_conn = None
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- writes ---------------------------------------------------------------------------

    def write_group(self, requests: Sequence[Sequence[Update]]) -> list[Applied]:
        """Merge the requests in one transaction; raises StoreUnavailable on storage faults."""
        conn = self._writer()
        with self._write_lock:
            self._pending_ids = {}
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    results = self.merger.apply(_Backend(self, conn), requests)
                    conn.execute("COMMIT")
                except BaseException:
                    if not conn.getautocommit():
                        conn.execute("ROLLBACK")
                    raise
            except _UNAVAILABLE as exc:
                raise StoreUnavailable(str(exc)) from exc
            self._token_ids.update(self._pending_ids)
            return results

    # --- projects -------------------------------------------------------------------------

    @staticmethod
    def _project(row: Sequence[Any]) -> Project:
        return Project(int(row[0]), row[1], row[2], row[3])

    def create_project(self, token: str, name: str = "") -> tuple[Project, str]:
        secret = new_secret()
        conn = self._writer()
        with self._write_lock, conn:
            try:
                conn.execute(
                    "INSERT INTO projects (token, name, secret_hash, created_at) VALUES (?, ?, ?, ?)",
                    (token, name, hash_secret(secret), time.time()),
                )
            except apsw.ConstraintError as exc:
                raise ValueError(f"a project with token {token!r} already exists") from exc
        project = self.project_by_token(token)
        assert project is not None
        return project, secret

    def rotate_secret(self, token: str) -> tuple[Project, str]:
        secret = new_secret()
        conn = self._writer()
        with self._write_lock, conn:
            conn.execute(
                "UPDATE projects SET secret_hash = ? WHERE token = ?", (hash_secret(secret), token)
            )
            if conn.changes() == 0:
                raise UnknownProject(f"no project with token {token!r}")
        project = self.project_by_token(token)
        assert project is not None
        return project, secret

    def list_projects(self) -> list[Project]:
        rows = self._reader().execute(
            "SELECT id, token, name, created_at FROM projects ORDER BY id"
        )
        return [self._project(r) for r in rows]

    def project_by_token(self, token: str) -> Project | None:
        row = (
            self._reader()
            .execute("SELECT id, token, name, created_at FROM projects WHERE token = ?", (token,))
            .fetchone()
        )
        return self._project(row) if row else None

    def project_by_id(self, project_id: int) -> Project | None:
        row = (
            self._reader()
            .execute("SELECT id, token, name, created_at FROM projects WHERE id = ?", (project_id,))
            .fetchone()
        )
        return self._project(row) if row else None

    def project_by_secret(self, secret: str) -> Project | None:
        row = (
            self._reader()
            .execute(
                "SELECT id, token, name, created_at FROM projects WHERE secret_hash = ?",
                (hash_secret(secret),),
            )
            .fetchone()
        )
        return self._project(row) if row else None

    # --- profiles -------------------------------------------------------------------------

    def get_profiles(self, project_id: int, distinct_ids: Sequence[str]) -> list[tuple[str, Props]]:
        conn = self._reader()
        out = []
        with conn:  # one read snapshot for the whole answer
            for did in dict.fromkeys(distinct_ids):
                row = conn.execute(
                    "SELECT props FROM profiles WHERE project_id = ? AND distinct_id = ? "
                    "AND props IS NOT NULL",
                    (project_id, did),
                ).fetchone()
                if row is not None:
                    out.append((did, orjson.loads(row[0])))
        return out

    def list_profiles(
        self, project_id: int, limit: int, offset: int
    ) -> tuple[int, list[tuple[str, Props]]]:
        conn = self._reader()
        with conn:
            total = _one(
                conn,
                "SELECT count(*) FROM profiles WHERE project_id = ? AND props IS NOT NULL",
                (project_id,),
            )
            rows = conn.execute(
                "SELECT distinct_id, props FROM profiles WHERE project_id = ? AND props IS NOT NULL "
                "ORDER BY distinct_id LIMIT ? OFFSET ?",
                (project_id, limit, offset),
            ).fetchall()
        return int(total), [(str(did), orjson.loads(p)) for did, p in rows]  # type: ignore[arg-type]

    def profile_history(self, project_id: int, distinct_id: str) -> list[dict[str, Any]]:
        rows = self._reader().execute(
            "SELECT time, seq, received, body FROM updates WHERE project_id = ? AND distinct_id = ? "
            "ORDER BY time, seq",
            (project_id, distinct_id),
        )
        return [
            {"time": t, "seq": s, "received": r, **orjson.loads(body)} for t, s, r, body in rows
        ]
