"""The embedded store: one SQLite file in WAL mode, written by one thread.

Writes come only through `write_group`, which the writer thread calls with every request it
took from the queue: they share one `BEGIN IMMEDIATE … COMMIT` (group commit) and, with
`synchronous=FULL`, one fsync. Reads use their own connection per thread and never block the
writer (WAL).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import apsw
import orjson

from ..merge import (
    DEFAULT_MAX_LOG_ENTRIES,
    LOG_ORDER,
    Key,
    LogEntry,
    Merger,
    ProfileRow,
    update_from_body,
)
from ..query import indexes
from ..query.compile import compile_where
from ..query.where import Node
from ..types import Applied, Props, Update
from .base import (
    Project,
    QuerySession,
    QueryTimeout,
    ServiceAccount,
    SessionExpired,
    StoreUnavailable,
    UnknownProject,
    browse_query,
    hash_secret,
    new_secret,
    new_service_account_credentials,
    outcome_counts,
    secret_matches,
)
from .rowcache import DEFAULT_LOG_CACHE, Cached, RowCache

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


PAGE_SIZE = 8192
_LOAD_CHUNK = 500  # distinct_ids per SELECT when loading a group's profiles


def _one(conn: apsw.Connection, sql: str, args: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(sql, args).fetchone()
    assert row is not None
    return row[0]


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


# A profile's newest log entries live in its row; past either limit they move to log_chunks.
TAIL_MAX_ENTRIES = 16
TAIL_MAX_BYTES = 2048


RawEntry = list[Any]  # [time, seq, received, dedup, body] as the log stores it


def raw_entries(entries: Sequence[LogEntry]) -> list[RawEntry]:
    """Log entries in the form the tail and the chunks hold (a JSON array of these)."""
    return [[e.time, e.seq, e.received_at(), e.dedup, e.stored_body()] for e in entries]


def read_log(conn: apsw.Connection, key: Key, tail: bytes | None, chunks: int) -> list[RawEntry]:
    """A profile's stored log (chunks and tail), in ($time, seq) order."""
    loads = orjson.loads
    raw: list[RawEntry] = []
    if chunks:
        for (blob,) in conn.execute(
            "SELECT entries FROM log_chunks WHERE project_id = ? AND distinct_id = ?", key
        ):
            raw.extend(loads(blob))
    if tail is not None:
        raw.extend(loads(tail))
    raw.sort(key=_entry_order)
    return raw


class _Backend:
    """MergeBackend over an open write connection (inside a transaction).

    The update log is kept in the profile row (`tail`) and in `log_chunks`: appending to it
    rewrites only the row the merge rewrites anyway; the stored log is read and rewritten
    whole only for late records, deletes and compaction. Busy profiles' rows and decoded logs
    come from the store's cache when it has them, and go back to it in `remember`.
    """

    def __init__(self, store: SqliteStore, conn: apsw.Connection) -> None:
        self.store = store
        self.conn = conn
        self._tails: dict[Key, tuple[bytes | None, int, int]] = {}  # tail, tail_n, chunks
        # stored logs read (or taken from the cache) in this group, in no particular order
        self._logs: dict[Key, list[LogEntry]] = {}
        self._keys: dict[Key, set[int]] = {}  # the retry keys of some of them
        self._rewrite: set[Key] = set()  # stored logs to write back whole
        self._new: dict[Key, list[LogEntry]] = {}
        self._cache = store.row_cache
        self._loaded: dict[Key, ProfileRow] = {}
        self._saved: dict[Key, tuple[ProfileRow, list[LogEntry] | None]] = {}

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
        tails = self._tails
        cur = self.conn.cursor()
        loads = orjson.loads
        by_project: dict[int, list[str]] = {}
        take = self._cache.take
        for key in keys:
            cached = take(key)
            if cached is None:
                by_project.setdefault(key[0], []).append(key[1])
                continue
            out[key] = cached.row
            tails[key] = (cached.tail, cached.tail_n, cached.chunks)
            self._logs[key] = cached.log
            if cached.keys is not None:
                self._keys[key] = cached.keys
        for pid, dids in by_project.items():
            # one statement per chunk of ids rather than one per profile
            for start in range(0, len(dids), _LOAD_CHUNK):
                chunk = dids[start : start + _LOAD_CHUNK]
                sql = (
                    "SELECT distinct_id, props, last_time, base, tomb, log_min, log_n, log_floor, "  # noqa: S608
                    "tail, tail_n, chunks FROM profiles WHERE project_id = ? AND distinct_id IN "
                    f"({','.join('?' * len(chunk))})"
                )
                for (
                    did,
                    props,
                    last_time,
                    base,
                    tomb,
                    log_min,
                    log_n,
                    log_floor,
                    tail,
                    n,
                    chunks,
                ) in cur.execute(sql, (pid, *chunk)):
                    key = (pid, did)
                    out[key] = ProfileRow(
                        loads(props) if props is not None else None,
                        last_time,
                        loads(base) if base is not None else None,
                        tomb,
                        log_min,
                        log_n,
                        log_floor,
                    )
                    tails[key] = (tail, n, chunks)
        self._loaded = out
        return out

    def load_log(self, key: Key) -> list[LogEntry]:
        log = self._logs.get(key)
        if log is None:
            tail, _, chunks = self._tails.get(key, (None, 0, 0))
            did = key[1]
            log = self._logs[key] = [
                LogEntry(t, s, None, d, body=body, distinct_id=did, received=received)
                for t, s, received, d, body in read_log(self.conn, key, tail, chunks)
            ]
        return log

    def has_retry_key(self, key: Key, dedup: int) -> bool:
        keys = self._keys.get(key)
        if keys is None:
            keys = self._keys[key] = {e.dedup for e in self.load_log(key) if e.dedup is not None}
        return dedup in keys

    def delete_log(self, key: Key, before: float) -> None:
        self._logs[key] = [e for e in self.load_log(key) if e.time >= before]
        self._keys.pop(key, None)
        self._rewrite.add(key)

    def insert_log(self, key: Key, entries: Sequence[LogEntry]) -> None:
        """Buffered: written with the profile row in save_profiles."""
        self._new.setdefault(key, []).extend(entries)

    def save_profiles(self, rows: Sequence[tuple[Key, ProfileRow]]) -> None:
        # The merger calls this once per group, after every delete_log and insert_log.
        spilled: list[tuple[int, str, int, bytes]] = []
        cleared: list[Key] = []
        loaded = self._tails
        inserts: list[tuple[Any, ...]] = []
        updates: list[tuple[Any, ...]] = []
        for key, row in rows:
            tail, n, chunks = loaded.get(key, (None, 0, 0))
            new = self._new.pop(key, None)
            added = raw_entries(new) if new else None
            if key in self._rewrite:
                if chunks:
                    cleared.append(key)
                    chunks = 0
                entries = sorted(self._logs[key], key=LOG_ORDER)
                tail = orjson.dumps(raw_entries(entries)) if entries else None
                n = len(entries)
                if added:
                    tail = _append(tail, orjson.dumps(added))
                    n += len(added)
            elif added:
                tail = _append(tail, orjson.dumps(added))
                n += len(added)
            changed = new or key in self._rewrite
            if (
                changed
                and tail is not None
                and (n > TAIL_MAX_ENTRIES or len(tail) > TAIL_MAX_BYTES)
            ):
                # seqs only grow: the newest entry's seq names the chunk uniquely
                newest = new[-1].seq if new else max(e.seq for e in self._logs[key])
                spilled.append((key[0], key[1], newest, tail))
                tail, n, chunks = None, 0, chunks + 1
            if key in self._logs:  # what remember() needs of the profiles it may keep
                self._saved[key] = (row, new)
                loaded[key] = (tail, n, chunks)
            (updates if key in self._loaded else inserts).append(
                (
                    _dumps(row.props) if row.props is not None else None,
                    row.last_time,
                    _dumps(row.base) if row.base is not None else None,
                    row.tomb,
                    row.log_min,
                    row.log_n,
                    row.log_floor,
                    tail,
                    n,
                    chunks,
                    key[0],
                    key[1],
                )
            )
        if self._new:
            raise AssertionError(f"log entries of unsaved profiles: {list(self._new)[:3]}")
        if cleared:
            self.conn.executemany(
                "DELETE FROM log_chunks WHERE project_id = ? AND distinct_id = ?", cleared
            )
        if spilled:
            self.conn.executemany(
                "INSERT INTO log_chunks (project_id, distinct_id, last_seq, entries) "
                "VALUES (?, ?, ?, ?)",
                spilled,
            )
        if inserts:
            self.conn.executemany(
                "INSERT INTO profiles (props, last_time, base, tomb, log_min, log_n, log_floor, "
                "tail, tail_n, chunks, project_id, distinct_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                inserts,
            )
        if updates:
            # the rows were read in this transaction: a plain UPDATE finds each with one seek
            self.conn.executemany(
                "UPDATE profiles SET props = ?, last_time = ?, base = ?, tomb = ?, log_min = ?, "
                "log_n = ?, log_floor = ?, tail = ?, tail_n = ?, chunks = ? "
                "WHERE project_id = ? AND distinct_id = ?",
                updates,
            )

    def remember(self) -> None:
        """After COMMIT: keep the committed state of this group's busy profiles for the next."""
        cache = self._cache
        if not cache.budget:
            return
        tails = self._tails
        for key, log in self._logs.items():
            keys = self._keys.get(key)
            saved = self._saved.get(key)
            if saved is None:
                found = self._loaded.get(key)
                if found is None or key in self._rewrite:  # (a purged log is always saved)
                    continue
                row = found
            else:
                row, new = saved
                row.dirty = False
                if new:
                    for entry in new:  # from now on, entries of an earlier group
                        entry.request = -1
                        entry.distinct_id = key[1]
                        if keys is not None and entry.dedup is not None:
                            keys.add(entry.dedup)
                    log.extend(new)  # in no particular order: every reader sorts
            tail, n, chunks = tails[key]
            cache.put(key, Cached(row, tail, n, chunks, log, keys))


def _entry_order(entry: RawEntry) -> tuple[float, int]:
    return (entry[0], entry[1])


def _append(tail: bytes | None, new: bytes) -> bytes:
    """Join two JSON arrays without parsing them."""
    if tail is None or tail == b"[]":
        return new
    return tail[:-1] + b"," + new[1:]


class SqliteStore:
    # Reads are local and short (a file in the page cache): the query API may run a
    # single-profile lookup on the event loop instead of in a thread.
    local_reads = True

    def __init__(
        self,
        path: str,
        synchronous: str = "full",
        reorder_window: float = 7 * 86400.0,
        max_properties: int = 2000,
        open_tokens: bool = True,
        max_log_entries: int = DEFAULT_MAX_LOG_ENTRIES,
        indexed_properties: tuple[str, ...] = ("$email", "$name"),
        log_cache: int = DEFAULT_LOG_CACHE,
    ) -> None:
        self.path = path
        self.synchronous = synchronous.upper()
        self.indexed_properties = tuple(indexes.check_name(n) for n in indexed_properties)
        self.merger = Merger(reorder_window, max_properties, open_tokens, max_log_entries)
        self._local = threading.local()
        self._write_conn: apsw.Connection | None = None
        self._token_ids: dict[str, int] = {}
        self._pending_ids: dict[str, int] = {}
        self._write_lock = threading.Lock()
        self._next_optimize = 0.0
        # busy profiles' committed rows and decoded logs, kept between groups (rowcache.py)
        self.row_cache = RowCache(log_cache)
        # Set by the server with `--writer process`: query-session writes go to the process
        # that holds the write connection instead of competing with it for the file's lock.
        self.session_writer: Callable[[str, Sequence[tuple[Any, ...]]], None] | None = None

    # --- connections ----------------------------------------------------------------------

    def _connect(self) -> apsw.Connection:
        conn = apsw.Connection(self.path)
        conn.setbusytimeout(10_000)
        # New files only (an existing file keeps its page size): with 8 KB pages a commit
        # writes fewer WAL frames for the same rows (about 5% less CPU per record measured).
        conn.execute(f"PRAGMA page_size = {int(PAGE_SIZE)}")  # sql: reviewed: an int constant
        conn.execute("PRAGMA journal_mode = WAL")
        # sql: reviewed: PRAGMA takes no parameters; synchronous is one of the setting's choices
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

    def sync_property_indexes(self, names: tuple[str, ...] | None = None) -> None:
        """Create an index per indexed property; drop those no longer configured."""
        if names is not None:
            self.indexed_properties = tuple(indexes.check_name(n) for n in names)
        conn = self._writer()
        wanted = {indexes.sqlite_index_name(n): n for n in self.indexed_properties}
        with self._write_lock, conn:
            existing = {
                str(name)
                for (name,) in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'profiles_prop_%'"
                )
            }
            for index in existing - set(wanted):
                # sql: reviewed: a name of ours read back from sqlite_master (profiles_prop_<hex>)
                conn.execute(f'DROP INDEX "{index}"')
            for index, name in wanted.items():
                if index not in existing:
                    log.info("indexing property %r (%s)", name, index)
                    # Partial: profiles without the property (most, for most properties)
                    # cost the index nothing when written; `expr = ?` implies NOT NULL, so
                    # equality lookups still use it.
                    expression = indexes.sqlite_expression(name)
                    conn.execute(  # sql: reviewed: DDL; index name and expression are checked
                        f'CREATE INDEX "{index}" ON profiles (project_id, {expression}) '
                        f"WHERE {expression} IS NOT NULL"
                    )
        self.analyze()

    def migrate(self) -> int:
        conn = self._writer()
        with self._write_lock:
            self.row_cache.clear()
            current = _one(conn, "PRAGMA user_version")
            applied = current
            for version, sql in migrations():
                if version <= current:
                    continue
                with conn:
                    conn.execute(sql)
                    conn.execute(f"PRAGMA user_version = {int(version)}")  # sql: reviewed: int
                applied = version
                log.info("applied migration %04d to %s", version, self.path)
            return applied

    def _drop_writer(self) -> None:
        self.row_cache.clear()
        conn, self._write_conn = self._write_conn, None
        if conn is not None:
            try:
                conn.close()
            except apsw.Error as exc:
                log.warning("closing the write connection after a storage fault: %s", exc)

    def close(self) -> None:
        if self._write_conn is not None:
            self._write_conn.close()
            self._write_conn = None
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- writes ---------------------------------------------------------------------------

    def write_group(
        self, requests: Sequence[Sequence[Update]], counts: dict[tuple[str, str], int] | None = None
    ) -> list[Applied]:
        """Merge the requests in one transaction; raises StoreUnavailable on storage faults.

        `counts` (outcome counts by project token) are stored in the same transaction, with
        the counts of this group's own outcomes added.
        """
        conn = self._writer()
        with self._write_lock:
            self._pending_ids = {}
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    if self.row_cache.budget:
                        # another connection committed since the last group: cached rows are old
                        self.row_cache.check(_one(conn, "PRAGMA data_version"))
                    backend = _Backend(self, conn)
                    results = self.merger.apply(backend, requests)
                    self.add_stats(conn, outcome_counts(requests, results, counts), time.time())
                    conn.execute("COMMIT")
                except BaseException:
                    # the merge changed rows taken from the cache that are now rolled back
                    self.row_cache.clear()
                    if not conn.getautocommit():
                        conn.execute("ROLLBACK")
                    raise
                backend.remember()
            except _UNAVAILABLE as exc:
                # Reopen on the next commit: a connection that fell back to read-only, or
                # whose file went bad, would otherwise keep failing after the fault is fixed.
                self._drop_writer()
                raise StoreUnavailable(str(exc)) from exc
            self._token_ids.update(self._pending_ids)
            if time.monotonic() >= self._next_optimize:
                self._optimize(conn)
            return results

    OPTIMIZE_EVERY = 600.0

    def _optimize(self, conn: apsw.Connection) -> None:
        """Keep the planner's statistics fresh (cheap: sampled, and only where stale)."""
        self._next_optimize = time.monotonic() + self.OPTIMIZE_EVERY
        try:
            conn.execute("PRAGMA analysis_limit = 400")
            conn.execute("PRAGMA optimize")
        except _UNAVAILABLE as exc:
            log.warning("PRAGMA optimize failed: %s", exc)

    def analyze(self) -> None:
        """Gather the planner's statistics now (done at start and every 10 minutes of writes)."""
        conn = self._writer()
        with self._write_lock:
            conn.execute("PRAGMA analysis_limit = 400")
            conn.execute("ANALYZE")
            self._next_optimize = time.monotonic() + self.OPTIMIZE_EVERY

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
        conn = self._reader()
        key = (project_id, distinct_id)
        with conn:
            row = conn.execute(
                "SELECT tail, chunks FROM profiles WHERE project_id = ? AND distinct_id = ?", key
            ).fetchone()
            raw = read_log(conn, key, row[0], row[1]) if row is not None else []
        return [{"time": t, "seq": s, "received": r, **body} for t, s, r, _, body in raw]

    # --- web page -------------------------------------------------------------------------

    def count_profiles(self, project_id: int) -> int:
        return int(
            _one(
                self._reader(),
                "SELECT count(*) FROM profiles WHERE project_id = ? AND props IS NOT NULL",
                (project_id,),
            )
        )

    def browse_profiles(
        self,
        project_id: int,
        search: str | None = None,
        where: str | None = None,
        after: str | None = None,
        limit: int = 50,
    ) -> list[tuple[str, Props]]:
        """Profiles in distinct_id order after `after` (keyset paging: no count, no offset).

        `search` matches a distinct_id prefix, or `$email` / `$name` exactly. `where` is a
        query-language expression; a syntax error raises ValueError with its position.
        """
        where_sql = self.compile_where(where) if where else None
        sql, args = browse_query(
            "?",
            "props",
            "((distinct_id >= ? AND distinct_id < ?) OR json_extract(props, '$.\"$email\"') = ? "
            "OR json_extract(props, '$.\"$name\"') = ?)",
            project_id,
            search,
            where_sql,
            after,
            limit,
        )
        rows = self._reader().execute(sql, args).fetchall()
        return [(str(did), orjson.loads(props)) for did, props in rows]  # type: ignore[arg-type]

    def compile_where(self, expression: str) -> tuple[str, list[Any]]:
        """A where expression → (SQL condition over `props`, parameters)."""
        from ..query import where as where_lang

        cond, params = self._where_sql(where_lang.parse(expression))
        return cond, list(params)

    def property_names(self, project_id: int, sample: int = 500) -> list[str]:
        """Property names seen in a sample of the project's profiles (for column pickers)."""
        names: set[str] = set()
        rows = self._reader().execute(
            "SELECT props FROM profiles WHERE project_id = ? AND props IS NOT NULL LIMIT ?",
            (project_id, sample),
        )
        for (props,) in rows:
            names.update(orjson.loads(props))
        return sorted(names)

    def profile_detail(self, project_id: int, distinct_id: str) -> dict[str, Any] | None:
        """The materialized profile, its base snapshot, tombstone and update log, read at once."""
        conn = self._reader()
        with conn:
            row = conn.execute(
                "SELECT props, base, tomb, last_time, tail, chunks FROM profiles "
                "WHERE project_id = ? AND distinct_id = ?",
                (project_id, distinct_id),
            ).fetchone()
            if row is None:
                return None
            entries = [
                LogEntry(t, s, update_from_body(body, t, distinct_id, received), dedup)
                for t, s, received, dedup, body in read_log(
                    conn, (project_id, distinct_id), row[4], row[5]
                )
            ]
        props, base, tomb, last_time = row[:4]  # type: ignore[index]
        return {
            "props": orjson.loads(props) if props is not None else None,
            "base": orjson.loads(base) if base is not None else None,
            "tomb": tomb,
            "last_time": last_time,
            "log": entries,
        }

    def stats(self, project_id: int, since: float, bucket: int) -> list[tuple[float, str, int]]:
        """Outcome counts since `since`, summed into buckets of `bucket` seconds."""
        rows = self._reader().execute(
            "SELECT (minute * 60 / ?) * ?, name, sum(count) FROM stats WHERE project_id = ? AND minute >= ? "
            "GROUP BY 1, 2 ORDER BY 1",
            (bucket, bucket, project_id, int(since // 60)),
        )
        return [(float(b), str(n), int(c)) for b, n, c in rows]

    def add_stats(
        self, conn: apsw.Connection, counts: dict[tuple[str, str], int], now: float
    ) -> None:
        """Add outcome counts (keyed by project token and outcome name) in the open transaction."""
        if not counts:
            return
        minute = int(now // 60)
        ids = _Backend(self, conn).project_ids({token for token, _ in counts}, create=False)
        conn.executemany(
            "INSERT INTO stats (project_id, minute, name, count) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (project_id, minute, name) DO UPDATE SET count = count + excluded.count",
            [(ids[token], minute, name, n) for (token, name), n in counts.items() if token in ids],
        )

    # --- the Engage query API, export, service accounts ---------------------------------

    _SESSION_CHUNK = 20_000

    def _where_sql(self, where: Node | None) -> tuple[str, tuple[Any, ...]]:
        """The compiled condition, plus literal-path equalities that indexed properties answer."""
        if where is None:
            return "1", ()
        cond, params = compile_where(where, "sqlite")
        hints, hint_params = indexes.sqlite_hints(where, self.indexed_properties)
        return f"({cond}){hints}", (*params, *hint_params)

    def start_query_session(
        self, project_id: int, where: Node | None, ttl: float, timeout: float
    ) -> QuerySession:
        now = time.time()
        self._expire_sessions(now)
        session_id = secrets.token_urlsafe(18)
        cond, params = self._where_sql(where)
        sql = (
            "SELECT distinct_id FROM profiles WHERE project_id = ? AND props IS NOT NULL "  # noqa: S608
            f"AND ({cond}) ORDER BY distinct_id"  # cond is compiled SQL; values are bound
        )
        reader = self._reader()
        total = 0
        chunk: list[tuple[str, int, str]] = []
        try:
            with _deadline(reader, timeout), reader:  # one read snapshot
                for (did,) in reader.execute(sql, (project_id, *params)):
                    chunk.append((session_id, total, did))
                    total += 1
                    if len(chunk) >= self._SESSION_CHUNK:
                        self._session_write(
                            "INSERT INTO query_session_ids (session_id, pos, distinct_id) "
                            "VALUES (?, ?, ?)",
                            chunk,
                        )
                        chunk = []
            if chunk:
                self._session_write(
                    "INSERT INTO query_session_ids (session_id, pos, distinct_id) VALUES (?, ?, ?)",
                    chunk,
                )
            self._session_write(
                "INSERT INTO query_sessions (id, project_id, total, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(session_id, project_id, total, now, now + ttl)],
            )
        except BaseException:
            if total:
                self._session_write(
                    "DELETE FROM query_session_ids WHERE session_id = ?", [(session_id,)]
                )
            raise
        return QuerySession(session_id, project_id, total, now + ttl)

    def _session_write(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        if self.session_writer is not None:  # `--writer process`: the child writes them
            self.session_writer(sql, rows)
            return
        conn = self._writer()
        try:
            with self._write_lock, conn:
                conn.executemany(sql, rows)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(str(exc)) from exc

    def _expire_sessions(self, now: float) -> None:
        expired = (
            self._reader()
            .execute("SELECT id FROM query_sessions WHERE expires_at < ?", (now,))
            .fetchall()
        )
        for (session_id,) in expired:
            self._session_write(
                "DELETE FROM query_session_ids WHERE session_id = ?", [(session_id,)]
            )
            self._session_write("DELETE FROM query_sessions WHERE id = ?", [(session_id,)])

    def session_page(
        self, session_id: str, project_id: int, offset: int, limit: int
    ) -> tuple[QuerySession, list[tuple[str, Props | None]]]:
        conn = self._reader()
        with conn:  # one read snapshot for the page
            row = conn.execute(
                "SELECT id, project_id, total, expires_at FROM query_sessions WHERE id = ?",
                (session_id,),
            ).fetchone()
            if row is None or row[1] != project_id or row[3] < time.time():
                raise SessionExpired(session_id)
            session = QuerySession(str(row[0]), int(row[1]), int(row[2]), float(row[3]))
            ids = [
                str(r[0])
                for r in conn.execute(
                    "SELECT distinct_id FROM query_session_ids WHERE session_id = ? "
                    "AND pos >= ? AND pos < ? ORDER BY pos",
                    (session_id, offset, offset + limit),
                )
            ]
            out: list[tuple[str, Props | None]] = []
            for did in ids:
                found = conn.execute(
                    "SELECT props FROM profiles WHERE project_id = ? AND distinct_id = ?",
                    (project_id, did),
                ).fetchone()
                props = found[0] if found is not None else None
                out.append((did, orjson.loads(props) if props is not None else None))
        return session, out

    def iter_profiles(
        self, project_id: int, where: Node | None, batch: int = 1000, timeout: float = 0.0
    ) -> Iterator[list[tuple[str, Props]]]:
        cond, params = self._where_sql(where)
        sql = (
            "SELECT distinct_id, props FROM profiles WHERE project_id = ? AND props IS NOT NULL "  # noqa: S608
            f"AND distinct_id > ? AND ({cond}) ORDER BY distinct_id LIMIT ?"
        )
        last = ""
        while True:
            conn = self._reader()
            with _deadline(conn, timeout):
                rows = conn.execute(sql, (project_id, last, *params, batch)).fetchall()
            if not rows:
                return
            yield [(str(did), orjson.loads(props)) for did, props in rows]  # type: ignore[arg-type]
            last = str(rows[-1][0])

    def create_service_account(
        self, name: str, project_ids: Sequence[int]
    ) -> tuple[ServiceAccount, str]:
        for pid in project_ids:
            if self.project_by_id(pid) is None:
                raise UnknownProject(f"no project with id {pid}")
        username, secret = new_service_account_credentials(name)
        now = time.time()
        conn = self._writer()
        with self._write_lock, conn:
            conn.execute(
                "INSERT INTO service_accounts (username, name, secret_hash, created_at) "
                "VALUES (?, ?, ?, ?)",
                (username, name, hash_secret(secret), now),
            )
            account_id = conn.last_insert_rowid()
            conn.executemany(
                "INSERT OR IGNORE INTO service_account_projects (account_id, project_id) "
                "VALUES (?, ?)",
                [(account_id, pid) for pid in project_ids],
            )
        account = ServiceAccount(account_id, username, name, tuple(sorted(set(project_ids))), now)
        return account, secret

    def _account(self, row: Sequence[Any]) -> ServiceAccount:
        pids = tuple(
            int(r[0])
            for r in self._reader().execute(
                "SELECT project_id FROM service_account_projects WHERE account_id = ? "
                "ORDER BY project_id",
                (row[0],),
            )
        )
        return ServiceAccount(int(row[0]), str(row[1]), str(row[2]), pids, float(row[3]))

    def list_service_accounts(self) -> list[ServiceAccount]:
        rows = (
            self._reader()
            .execute("SELECT id, username, name, created_at FROM service_accounts ORDER BY id")
            .fetchall()
        )
        return [self._account(r) for r in rows]

    def service_account(self, username: str, secret: str) -> ServiceAccount | None:
        row = (
            self._reader()
            .execute(
                "SELECT id, username, name, created_at, secret_hash FROM service_accounts "
                "WHERE username = ?",
                (username,),
            )
            .fetchone()
        )
        stored = str(row[4]) if row is not None else hash_secret(secrets.token_hex(16))
        if not secret_matches(secret, stored) or row is None:
            return None
        return self._account(row)


@contextmanager
def _deadline(conn: apsw.Connection, timeout: float) -> Iterator[None]:
    """Interrupt the connection's statements once `timeout` seconds have passed (0: never)."""
    if timeout <= 0:
        yield
        return
    end = time.monotonic() + timeout
    conn.setprogresshandler(lambda: time.monotonic() > end, 20_000)
    try:
        yield
    except apsw.InterruptError as exc:
        raise QueryTimeout(f"the query ran longer than {timeout:g} seconds") from exc
    finally:
        conn.setprogresshandler(None)
