"""The PostgreSQL store: the same contract as the SQLite store, for several nodes on one database.

Writes come only through `write_group`, which the writer thread calls with every request it
took from the queue; they share one transaction (group commit) on the writer's own connection.
Reads use a `psycopg_pool.ConnectionPool`.

Any number of Peoplebase processes may write to one database. Ordering across them rests on
row locks: before the merger reads a profile, `write_group` locks its row (creating an empty
placeholder when it is missing), one profile after the other in key order so that two nodes
never wait on each other in a cycle. While a node holds the lock, no other node can read,
merge or write that profile, so the read-modify-write and the log stay consistent. Arrival
numbers (`seq`, the tie-break for equal `$time`) come from the locked row itself (`seq_hi`),
so every later update of a profile, on any node, gets a larger number. Deadlocks and
serialization failures (from causes outside Peoplebase) are retried.

Every statement of the write path names one profile by its full key (project_id, distinct_id),
so on Citus, with the profile tables distributed by distinct_id, each one is routed to a single
shard (see docs/deploying.md and sql/postgres/citus.sql).
"""

from __future__ import annotations

import logging
import random
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any

import orjson
import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool, PoolTimeout

from ..merge import (
    DEFAULT_MAX_LOG_ENTRIES,
    Key,
    LogEntry,
    Merger,
    ProfileRow,
    decode_update,
    encode_update,
)
from ..query import indexes
from ..query.compile import compile_where
from ..query.where import Node
from ..query.where import parse as parse_where
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

log = logging.getLogger(__name__)

NEVER = float("-inf")
MIGRATION_LOCK = 0x7065_6F70_6C65  # pg_advisory_lock key held while migrating
WRITE_ATTEMPTS = 8
POOL_SIZE = 10

# --- the write path: each statement names exactly one profile by (project_id, distinct_id) ---

LOCK_PROFILE = (
    "INSERT INTO profiles (project_id, distinct_id, last_time) VALUES (%s, %s, '-Infinity') "
    "ON CONFLICT (project_id, distinct_id) DO UPDATE SET seq_hi = profiles.seq_hi "
    "RETURNING props::text, last_time, base::text, tomb, log_min, log_n, log_floor, seq_hi"
)
LOAD_LOG = (
    "SELECT time, seq, dedup, body FROM updates WHERE project_id = %s AND distinct_id = %s "
    "ORDER BY time, seq"
)
FIND_RETRY_KEY = (
    "SELECT 1 FROM updates WHERE project_id = %s AND distinct_id = %s AND dedup = %s LIMIT 1"
)
DELETE_LOG_BEFORE = "DELETE FROM updates WHERE project_id = %s AND distinct_id = %s AND time < %s"
INSERT_LOG = (
    "INSERT INTO updates (project_id, distinct_id, time, seq, received, dedup, body) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s)"
)
SAVE_PROFILE = (
    "UPDATE profiles SET props = %s::jsonb, last_time = %s, base = %s::jsonb, tomb = %s, "
    "log_min = %s, log_n = %s, log_floor = %s, seq_hi = %s "
    "WHERE project_id = %s AND distinct_id = %s"
)
ADD_STATS = (
    "INSERT INTO stats (project_id, minute, name, node, count) VALUES (%s, %s, %s, %s, %s) "
    "ON CONFLICT (project_id, minute, name, node) DO UPDATE SET count = stats.count + excluded.count"
)
DROP_PLACEHOLDER = (
    "DELETE FROM profiles WHERE project_id = %s AND distinct_id = %s AND last_time = '-Infinity'"
)
WRITE_PATH_SQL = (
    LOCK_PROFILE,
    LOAD_LOG,
    FIND_RETRY_KEY,
    DELETE_LOG_BEFORE,
    INSERT_LOG,
    SAVE_PROFILE,
    DROP_PLACEHOLDER,
)

# Projects live in a small table (a reference table on Citus), read and created outside the
# profile transaction: creating a project is idempotent and race-safe across nodes.
FIND_PROJECTS = "SELECT token, id FROM projects WHERE token = ANY(%s)"
CREATE_PROJECT_IF_MISSING = (
    "INSERT INTO projects (token, name, secret_hash, created_at) VALUES (%s, '', %s, %s) "
    "ON CONFLICT (token) DO NOTHING RETURNING id"
)
PROJECT_COLUMNS = "SELECT id, token, name, created_at FROM projects"

_RETRY = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)


def migrations() -> list[tuple[int, str]]:
    folder = resources.files("peoplebase.store").joinpath("sql/postgres")
    out = []
    for item in folder.iterdir():
        name = item.name
        if name.endswith(".sql") and name[:1].isdigit():
            out.append((int(name.split("_", 1)[0]), item.read_text()))
    return sorted(out)


def citus_sql() -> str:
    """How the tables are laid out on Citus (run by `migrate` when the extension is present)."""
    return resources.files("peoplebase.store").joinpath("sql/postgres/citus.sql").read_text()


# orjson writes a float of 1e16 or more (always integral) with an exponent: "1e+16". JSONB
# keeps numbers as `numeric` and gives that back as 10000000000000000, which reads as an int:
# a profile's 1e16 would come back an int, and a later `$add` would not round as on SQLite.
# Written out with a decimal point ("10000000000000000.0"), the number keeps its scale in JSONB
# and reads back as the same float. (The first alternative skips strings.)
_MAYBE_EXPONENT = re.compile(r"\de\+")
_STRING_OR_EXPONENT = re.compile(r'"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?e\+\d+')


def _plain_float(match: re.Match[str]) -> str:
    token = match.group(0)
    return token if token[0] == '"' else f"{float(token):.1f}"


def _dumps(value: Any) -> str | None:
    """JSON for a JSONB column: floats come back floats (see _STRING_OR_EXPONENT)."""
    if value is None:
        return None
    text = orjson.dumps(value).decode()
    if _MAYBE_EXPONENT.search(text):
        text = _STRING_OR_EXPONENT.sub(_plain_float, text)
    return text


def _loads(text: str | None) -> Any:
    return orjson.loads(text) if text is not None else None


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "the PostgreSQL database"
    host = info.get("host", "localhost")
    return f"postgresql://{info.get('user', '')}@{host}:{info.get('port', 5432)}/{info.get('dbname', '')}"


class _Backend:
    """MergeBackend over the writer connection, inside the group's transaction.

    Profiles are locked and loaded by `lock` before the merger runs; log deletions and inserts
    and profile saves are buffered and sent in one pipeline by `save_profiles`.
    """

    def __init__(self, conn: psycopg.Connection[Any], pids: dict[str, int]) -> None:
        self.conn = conn
        self.pids = pids
        self.rows: dict[Key, ProfileRow] = {}
        self.seq_hi: dict[Key, int] = {}
        self.seq_end = 0
        self.pending: list[tuple[str, tuple[Any, ...]]] = []
        self.saved: set[Key] = set()

    def lock(self, keys: Sequence[Key]) -> None:
        """Lock (creating placeholders for) the profile rows, in key order."""
        if not keys:
            return
        cur = self.conn.cursor()
        cur.executemany(LOCK_PROFILE, keys, returning=True)
        for key in keys:
            row = cur.fetchone()
            props, last_time, base, tomb, log_min, log_n, log_floor, seq_hi = row  # type: ignore[misc]
            self.seq_hi[key] = int(seq_hi)
            if last_time != NEVER:
                self.rows[key] = ProfileRow(
                    _loads(props), last_time, _loads(base), tomb, log_min, log_n, log_floor
                )
            cur.nextset()

    # --- MergeBackend ---------------------------------------------------------------------

    def project_ids(self, tokens: Iterable[str], create: bool) -> dict[str, int]:
        return {t: self.pids[t] for t in tokens if t in self.pids}

    def next_seq(self, count: int) -> int:
        start = max(self.seq_hi.values(), default=0) + 1
        self.seq_end = start + count - 1
        return start

    def load_profiles(self, keys: Sequence[Key]) -> dict[Key, ProfileRow]:
        return {key: self.rows[key] for key in keys if key in self.rows}

    def load_log(self, key: Key) -> list[LogEntry]:
        rows = self.conn.execute(LOAD_LOG, key).fetchall()
        return [LogEntry(t, s, decode_update(body, t, key[1]), d) for t, s, d, body in rows]

    def has_retry_key(self, key: Key, dedup: int) -> bool:
        return self.conn.execute(FIND_RETRY_KEY, (*key, dedup)).fetchone() is not None

    def delete_log(self, key: Key, before: float) -> None:
        self.pending.append((DELETE_LOG_BEFORE, (*key, before)))

    def insert_log(self, key: Key, entries: Sequence[LogEntry]) -> None:
        for e in entries:
            self.pending.append(
                (
                    INSERT_LOG,
                    (
                        key[0],
                        key[1],
                        e.time,
                        e.seq,
                        e.update.received,
                        e.dedup,
                        encode_update(e.update).decode(),
                    ),
                )
            )

    def save_profiles(self, rows: Sequence[tuple[Key, ProfileRow]]) -> None:
        for key, row in rows:
            self.saved.add(key)
            self.pending.append(
                (
                    SAVE_PROFILE,
                    (
                        _dumps(row.props),
                        row.last_time,
                        _dumps(row.base),
                        row.tomb,
                        row.log_min,
                        row.log_n,
                        row.log_floor,
                        self.seq_end,
                        key[0],
                        key[1],
                    ),
                )
            )

    # --- end of the group -----------------------------------------------------------------

    def flush(self, keys: Sequence[Key]) -> None:
        """Send the buffered writes; drop the placeholders that nothing was saved into."""
        for key in keys:
            if key not in self.saved and key not in self.rows:
                self.pending.append((DROP_PLACEHOLDER, key))
        if not self.pending:
            return
        cur = self.conn.cursor()
        with self.conn.pipeline():
            for sql, args in self.pending:
                cur.execute(sql, args)
        self.pending = []


class PostgresStore:
    """A ProfileStore on PostgreSQL (or Citus). `url` is a libpq URL: postgresql://…"""

    def __init__(
        self,
        url: str,
        synchronous: str = "full",
        reorder_window: float = 7 * 86400.0,
        max_properties: int = 2000,
        open_tokens: bool = True,
        pool_size: int = POOL_SIZE,
        max_log_entries: int = DEFAULT_MAX_LOG_ENTRIES,
    ) -> None:
        self.url = url
        self.name = _redact(url)
        self.synchronous = synchronous
        self.open_tokens = open_tokens
        self.merger = Merger(reorder_window, max_properties, open_tokens, max_log_entries)
        self.pool_size = pool_size
        self.indexed_properties: tuple[str, ...] = ("$email", "$name")
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._write_conn: psycopg.Connection[Any] | None = None
        self._write_lock = threading.Lock()
        self._token_ids: dict[str, int] = {}
        self.write_retries = 0
        self.node = uuid.uuid4().hex[:16]  # this process's own rows in `stats`

    # --- connections ----------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(self.url, autocommit=True)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot connect to {self.name}: {exc}".strip()) from exc
        if self.synchronous == "normal":
            # may lose the last commits if the database server crashes, never corrupts
            conn.execute("SET synchronous_commit = off")
        return conn

    def _writer(self) -> psycopg.Connection[Any]:
        if self._write_conn is None or self._write_conn.closed:
            self._write_conn = self._connect()
        return self._write_conn

    def _drop_writer(self) -> None:
        if self._write_conn is not None:
            self._write_conn.close()
            self._write_conn = None

    def _reads(self) -> ConnectionPool[psycopg.Connection[Any]]:
        if self._pool is None:
            self._pool = ConnectionPool(
                self.url,
                min_size=1,
                max_size=self.pool_size,
                kwargs={"autocommit": True},
                open=True,
                name="peoplebase-reads",
            )
        return self._pool

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._reads().connection(timeout=30) as conn:
                return conn.execute(sql, args).fetchall()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise StoreUnavailable(f"cannot read from {self.name}: {exc}") from exc

    def applied_migrations(self) -> set[int]:
        conn = self._writer()
        exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return set()
        return {int(v) for (v,) in conn.execute("SELECT version FROM schema_migrations")}

    def schema_version(self) -> int:
        """The newest migration applied to the database (0: none)."""
        return max(self.applied_migrations(), default=0)

    def open(self) -> None:
        """Check that the schema is current (`peoplebase migrate` applies migrations)."""
        with self._write_lock:
            try:
                applied = self.applied_migrations()
            except psycopg.OperationalError as exc:
                self._drop_writer()
                raise StoreUnavailable(f"cannot open {self.name}: {exc}") from exc
        known = {v for v, _ in migrations()}
        latest = max(known)
        current = max(applied, default=0)
        if not known <= applied or current > latest:
            self.close()
        if not known <= applied:
            missing = ", ".join(f"{v:04d}" for v in sorted(known - applied))
            raise StoreUnavailable(
                f"{self.name} has schema version {current}, this Peoplebase needs {latest} "
                f"(missing migrations {missing}): run `peoplebase migrate --db URL` first"
            )
        if current > latest:
            raise StoreUnavailable(
                f"{self.name} has schema version {current}, newer than this Peoplebase "
                f"knows ({latest}): upgrade Peoplebase"
            )

    def migrate(self) -> int:
        """Apply the missing migrations, each in its own transaction; safe to run concurrently."""
        conn = self._connect()
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {v for (v,) in conn.execute("SELECT version FROM schema_migrations")}
            for version, sql in migrations():
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                done.add(version)
                log.info("applied migration %04d to %s", version, self.name)
            applied = max(done, default=0)
            citus = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'citus'").fetchone()
            if citus:
                conn.execute(citus_sql())
                log.info("distributed the tables of %s with Citus", self.name)
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
            return applied
        finally:
            conn.close()

    def close(self) -> None:
        with self._write_lock:
            self._drop_writer()
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # --- writes ---------------------------------------------------------------------------

    def write_group(
        self, requests: Sequence[Sequence[Update]], counts: dict[tuple[str, str], int] | None = None
    ) -> list[Applied]:
        """Merge the requests in one transaction; raises StoreUnavailable on storage faults.

        `counts` (outcome counts by project token) are stored in the same transaction, with
        the counts of this group's own outcomes added.
        """
        with self._write_lock:
            try:
                return self._write_group(requests, counts)
            except psycopg.OperationalError as exc:
                self._drop_writer()  # reconnect on the next group (server restart, failover)
                raise StoreUnavailable(str(exc).strip()) from exc
            except (pg_errors.DiskFull, pg_errors.ReadOnlySqlTransaction) as exc:
                raise StoreUnavailable(str(exc).strip()) from exc

    def _write_group(
        self, requests: Sequence[Sequence[Update]], counts: dict[tuple[str, str], int] | None
    ) -> list[Applied]:
        conn = self._writer()
        tokens = {u.token for updates in requests for u in updates}
        pids = self._project_ids(conn, tokens, create=self.open_tokens)
        if counts:
            pids.update(self._project_ids(conn, {t for t, _ in counts}, create=False))
        keys = sorted(
            {(pids[u.token], u.distinct_id) for r in requests for u in r if u.token in pids}
        )
        times = [[u.time for u in updates] for updates in requests]
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with conn.transaction():
                    backend = _Backend(conn, pids)
                    backend.lock(keys)
                    results = self.merger.apply(backend, requests)
                    for (token, name), n in sorted(
                        outcome_counts(requests, results, counts).items()
                    ):
                        if token in pids:
                            backend.pending.append(
                                (
                                    ADD_STATS,
                                    (pids[token], int(time.time() // 60), name, self.node, n),
                                )
                            )
                    backend.flush(keys)
                return results
            except _RETRY as exc:
                if attempt == WRITE_ATTEMPTS - 1:
                    raise StoreUnavailable(
                        f"gave up after {WRITE_ATTEMPTS} attempts: {exc}"
                    ) from exc
                self.write_retries += 1
                log.warning("retrying a group commit after: %s", str(exc).strip())
                for updates, ts in zip(requests, times, strict=True):
                    for u, t in zip(updates, ts, strict=True):
                        u.time = t  # the merger may have moved it; start over from the original
                time.sleep(random.uniform(0, 0.01 * 2**attempt))
        raise AssertionError("unreachable")

    def _project_ids(
        self, conn: psycopg.Connection[Any], tokens: set[str], create: bool
    ) -> dict[str, int]:
        out = {t: self._token_ids[t] for t in tokens if t in self._token_ids}
        missing = [t for t in tokens if t not in out]
        if not missing:
            return out
        for token, pid in conn.execute(FIND_PROJECTS, (missing,)):
            out[token] = int(pid)
        if create:
            for token in missing:
                if token in out:
                    continue
                row = conn.execute(
                    CREATE_PROJECT_IF_MISSING, (token, hash_secret(new_secret()), time.time())
                ).fetchone()
                if row is None:  # another node created it just now
                    row = conn.execute(
                        "SELECT id FROM projects WHERE token = %s", (token,)
                    ).fetchone()
                else:
                    log.info("project created for new token %r (id %s)", token, row[0])
                assert row is not None
                out[token] = int(row[0])
        self._token_ids.update(out)
        return out

    # --- projects -------------------------------------------------------------------------

    @staticmethod
    def _project(row: Sequence[Any]) -> Project:
        return Project(int(row[0]), row[1], row[2], row[3])

    def create_project(self, token: str, name: str = "") -> tuple[Project, str]:
        secret = new_secret()
        with self._write_lock:
            try:
                row = (
                    self._writer()
                    .execute(
                        "INSERT INTO projects (token, name, secret_hash, created_at) "
                        "VALUES (%s, %s, %s, %s) ON CONFLICT (token) DO NOTHING "
                        "RETURNING id, token, name, created_at",
                        (token, name, hash_secret(secret), time.time()),
                    )
                    .fetchone()
                )
            except psycopg.OperationalError as exc:
                self._drop_writer()
                raise StoreUnavailable(str(exc).strip()) from exc
        if row is None:
            raise ValueError(f"a project with token {token!r} already exists")
        return self._project(row), secret

    def rotate_secret(self, token: str) -> tuple[Project, str]:
        secret = new_secret()
        with self._write_lock:
            try:
                row = (
                    self._writer()
                    .execute(
                        "UPDATE projects SET secret_hash = %s WHERE token = %s "
                        "RETURNING id, token, name, created_at",
                        (hash_secret(secret), token),
                    )
                    .fetchone()
                )
            except psycopg.OperationalError as exc:
                self._drop_writer()
                raise StoreUnavailable(str(exc).strip()) from exc
        if row is None:
            raise UnknownProject(f"no project with token {token!r}")
        return self._project(row), secret

    def list_projects(self) -> list[Project]:
        return [self._project(r) for r in self._read(PROJECT_COLUMNS + " ORDER BY id")]

    def project_by_token(self, token: str) -> Project | None:
        rows = self._read(PROJECT_COLUMNS + " WHERE token = %s", (token,))
        return self._project(rows[0]) if rows else None

    def project_by_id(self, project_id: int) -> Project | None:
        rows = self._read(PROJECT_COLUMNS + " WHERE id = %s", (project_id,))
        return self._project(rows[0]) if rows else None

    def project_by_secret(self, secret: str) -> Project | None:
        rows = self._read(PROJECT_COLUMNS + " WHERE secret_hash = %s", (hash_secret(secret),))
        return self._project(rows[0]) if rows else None

    # --- profiles -------------------------------------------------------------------------

    def get_profiles(self, project_id: int, distinct_ids: Sequence[str]) -> list[tuple[str, Props]]:
        wanted = list(dict.fromkeys(distinct_ids))
        if not wanted:
            return []
        if len(wanted) == 1:  # one profile: routed to one shard on Citus
            rows = self._read(
                "SELECT distinct_id, props::text FROM profiles "
                "WHERE project_id = %s AND distinct_id = %s AND props IS NOT NULL",
                (project_id, wanted[0]),
            )
        else:  # one statement: one snapshot for the whole answer
            rows = self._read(
                "SELECT distinct_id, props::text FROM profiles "
                "WHERE project_id = %s AND distinct_id = ANY(%s) AND props IS NOT NULL",
                (project_id, wanted),
            )
        found = {did: props for did, props in rows}
        return [(did, orjson.loads(found[did])) for did in wanted if did in found]

    def list_profiles(
        self, project_id: int, limit: int, offset: int
    ) -> tuple[int, list[tuple[str, Props]]]:
        try:
            with self._reads().connection(timeout=30) as conn:
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    total = conn.execute(
                        "SELECT count(*) FROM profiles WHERE project_id = %s AND props IS NOT NULL",
                        (project_id,),
                    ).fetchone()
                    rows = conn.execute(
                        "SELECT distinct_id, props::text FROM profiles "
                        "WHERE project_id = %s AND props IS NOT NULL "
                        "ORDER BY distinct_id LIMIT %s OFFSET %s",
                        (project_id, limit, offset),
                    ).fetchall()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise StoreUnavailable(f"cannot read from {self.name}: {exc}") from exc
        assert total is not None
        return int(total[0]), [(str(did), orjson.loads(p)) for did, p in rows]

    def profile_history(self, project_id: int, distinct_id: str) -> list[dict[str, Any]]:
        rows = self._read(
            "SELECT time, seq, received, body FROM updates "
            "WHERE project_id = %s AND distinct_id = %s ORDER BY time, seq",
            (project_id, distinct_id),
        )
        return [
            {"time": t, "seq": s, "received": r, **orjson.loads(body)} for t, s, r, body in rows
        ]

    # --- web page -------------------------------------------------------------------------

    def stats(self, project_id: int, since: float, bucket: int) -> list[tuple[float, str, int]]:
        """Outcome counts since `since`, summed (over nodes too) into buckets of `bucket` seconds."""
        rows = self._read(
            "SELECT (minute * 60 / %s) * %s, name, sum(count) FROM stats "
            "WHERE project_id = %s AND minute >= %s GROUP BY 1, 2 ORDER BY 1, 2",
            (bucket, bucket, project_id, int(since // 60)),
        )
        return [(float(b), str(n), int(c)) for b, n, c in rows]

    def count_profiles(self, project_id: int) -> int:
        rows = self._read(
            "SELECT count(*) FROM profiles WHERE project_id = %s AND props IS NOT NULL",
            (project_id,),
        )
        return int(rows[0][0])

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
            "%s",
            "props::text",
            "((distinct_id >= %s AND distinct_id < %s) "
            "OR props -> '$email' = to_jsonb(%s::text) OR props -> '$name' = to_jsonb(%s::text))",
            project_id,
            search,
            where_sql,
            after,
            limit,
        )
        return [(str(did), orjson.loads(props)) for did, props in self._read(sql, args)]

    def compile_where(self, expression: str) -> tuple[str, list[Any]]:
        """A where expression → (SQL condition over the JSONB `props`, parameters)."""
        cond, params = self._where_sql(parse_where(expression))
        return cond, list(params)

    def sync_property_indexes(self, names: tuple[str, ...] | None = None) -> None:
        """An expression index per indexed property; drop those no longer configured.

        Every node runs this at start, so give them all the same `indexed_properties`.
        """
        if names is not None:
            self.indexed_properties = tuple(indexes.check_name(n) for n in names)
        wanted = {indexes.postgres_index_name(n): n for n in self.indexed_properties}
        conn = self._connect()
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
            existing = {
                str(name)
                for (name,) in conn.execute(
                    "SELECT indexname FROM pg_indexes WHERE tablename = 'profiles' "
                    "AND schemaname = current_schema() AND indexname LIKE 'profiles_prop_%%'"
                )
            }
            for index in sorted(existing - set(wanted)):
                # sql: reviewed: DDL; a name of ours read back from pg_indexes (profiles_prop_<hex>)
                conn.execute(f'DROP INDEX IF EXISTS "{index}"')
            for index, name in wanted.items():
                if index not in existing:
                    log.info("indexing property %r (%s)", name, index)
                    conn.execute(  # sql: reviewed: DDL; index name and expression are checked
                        f'CREATE INDEX IF NOT EXISTS "{index}" ON profiles '
                        f"(project_id, {indexes.postgres_expression(name)})"
                    )
            # No ANALYZE here: on a new, empty table it records zero rows, and the writer's
            # cached plans then scan the table as it grows (4x slower writes, measured).
            # Autovacuum keeps the statistics as the table fills.
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
        finally:
            conn.close()

    def property_names(self, project_id: int, sample: int = 500) -> list[str]:
        """Property names seen in a sample of the project's profiles (for column pickers)."""
        names: set[str] = set()
        for (props,) in self._read(
            "SELECT props::text FROM profiles WHERE project_id = %s AND props IS NOT NULL "
            "ORDER BY distinct_id LIMIT %s",
            (project_id, sample),
        ):
            names.update(orjson.loads(props))
        return sorted(names)

    def profile_detail(self, project_id: int, distinct_id: str) -> dict[str, Any] | None:
        """The materialized profile, its base snapshot, tombstone and update log, read at once."""
        with self._snapshot() as conn:
            row = conn.execute(
                "SELECT props::text, base::text, tomb, last_time FROM profiles "
                "WHERE project_id = %s AND distinct_id = %s",
                (project_id, distinct_id),
            ).fetchone()
            if row is None:
                return None
            entries = []
            for t, s, received, dedup, body in conn.execute(
                "SELECT time, seq, received, dedup, body FROM updates "
                "WHERE project_id = %s AND distinct_id = %s ORDER BY time, seq",
                (project_id, distinct_id),
            ):
                update = decode_update(body, t, distinct_id)
                update.received = received
                entries.append(LogEntry(t, s, update, dedup))
        props, base, tomb, last_time = row
        return {
            "props": _loads(props),
            "base": _loads(base),
            "tomb": tomb,
            "last_time": last_time,
            "log": entries,
        }

    # --- the Engage query API, export, service accounts ---------------------------------

    _SESSION_CHUNK = 20_000

    @contextmanager
    def _snapshot(self, timeout: float = 0.0) -> Iterator[psycopg.Connection[Any]]:
        """A read-only transaction on one snapshot; statements stop after `timeout` (0: never)."""
        try:
            with self._reads().connection(timeout=30) as conn:
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    if timeout > 0:
                        # sql: reviewed: SET takes no parameters; the value is an int
                        conn.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout * 1000))}")
                    yield conn
        except pg_errors.QueryCanceled as exc:
            raise QueryTimeout(f"the query ran longer than {timeout:g} seconds") from exc
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise StoreUnavailable(f"cannot read from {self.name}: {exc}") from exc

    def _write(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """A short write transaction on a pool connection (not the writer's)."""
        try:
            with self._reads().connection(timeout=30) as conn, conn.transaction():
                conn.cursor().executemany(sql, rows)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise StoreUnavailable(f"cannot write to {self.name}: {exc}") from exc

    def _where_sql(self, where: Node | None) -> tuple[str, tuple[Any, ...]]:
        """The compiled condition, plus JSONB equalities that indexed properties answer."""
        if where is None:
            return "true", ()
        cond, params = compile_where(where, "postgres")
        hints, hint_params = indexes.postgres_hints(where, self.indexed_properties)
        return f"({cond}){hints}", (*params, *hint_params)

    def start_query_session(
        self, project_id: int, where: Node | None, ttl: float, timeout: float
    ) -> QuerySession:
        now = time.time()
        self._expire_sessions(now)
        session_id = secrets.token_urlsafe(18)
        cond, params = self._where_sql(where)
        sql = (
            "SELECT distinct_id FROM profiles WHERE project_id = %s AND props IS NOT NULL "  # noqa: S608
            f"AND ({cond}) ORDER BY distinct_id"  # cond is compiled SQL; values are bound
        )
        insert = "INSERT INTO query_session_ids (session_id, pos, distinct_id) VALUES (%s, %s, %s)"
        total = 0
        try:
            with self._snapshot(timeout) as conn:  # one read snapshot
                ids = [did for (did,) in conn.execute(sql, (project_id, *params))]
            for start in range(0, len(ids), self._SESSION_CHUNK):
                chunk = ids[start : start + self._SESSION_CHUNK]
                self._write(insert, [(session_id, start + i, did) for i, did in enumerate(chunk)])
                total += len(chunk)
            self._write(
                "INSERT INTO query_sessions (id, project_id, total, created_at, expires_at) "
                "VALUES (%s, %s, %s, %s, %s)",
                [(session_id, project_id, total, now, now + ttl)],
            )
        except BaseException:
            if total:
                self._write("DELETE FROM query_session_ids WHERE session_id = %s", [(session_id,)])
            raise
        return QuerySession(session_id, project_id, total, now + ttl)

    def _expire_sessions(self, now: float) -> None:
        for (session_id,) in self._read(
            "SELECT id FROM query_sessions WHERE expires_at < %s", (now,)
        ):
            self._write("DELETE FROM query_session_ids WHERE session_id = %s", [(session_id,)])
            self._write("DELETE FROM query_sessions WHERE id = %s", [(session_id,)])

    def session_page(
        self, session_id: str, project_id: int, offset: int, limit: int
    ) -> tuple[QuerySession, list[tuple[str, Props | None]]]:
        with self._snapshot() as conn:  # one read snapshot for the page
            row = conn.execute(
                "SELECT id, project_id, total, expires_at FROM query_sessions WHERE id = %s",
                (session_id,),
            ).fetchone()
            if row is None or row[1] != project_id or row[3] < time.time():
                raise SessionExpired(session_id)
            session = QuerySession(str(row[0]), int(row[1]), int(row[2]), float(row[3]))
            ids = [
                str(r[0])
                for r in conn.execute(
                    "SELECT distinct_id FROM query_session_ids WHERE session_id = %s "
                    "AND pos >= %s AND pos < %s ORDER BY pos",
                    (session_id, offset, offset + limit),
                )
            ]
            found = dict(
                conn.execute(
                    "SELECT distinct_id, props::text FROM profiles "
                    "WHERE project_id = %s AND distinct_id = ANY(%s)",
                    (project_id, ids),
                ).fetchall()
            )
        return session, [(did, _loads(found.get(did))) for did in ids]

    def iter_profiles(
        self, project_id: int, where: Node | None, batch: int = 1000, timeout: float = 0.0
    ) -> Iterator[list[tuple[str, Props]]]:
        cond, params = self._where_sql(where)
        sql = (
            "SELECT distinct_id, props::text FROM profiles WHERE project_id = %s "  # noqa: S608
            f"AND props IS NOT NULL AND distinct_id > %s AND ({cond}) ORDER BY distinct_id LIMIT %s"
        )
        last = ""
        while True:
            with self._snapshot(timeout) as conn:
                rows = conn.execute(sql, (project_id, last, *params, batch)).fetchall()
            if not rows:
                return
            yield [(str(did), orjson.loads(props)) for did, props in rows]
            last = str(rows[-1][0])

    def create_service_account(
        self, name: str, project_ids: Sequence[int]
    ) -> tuple[ServiceAccount, str]:
        for pid in project_ids:
            if self.project_by_id(pid) is None:
                raise UnknownProject(f"no project with id {pid}")
        username, secret = new_service_account_credentials(name)
        now = time.time()
        try:
            with self._reads().connection(timeout=30) as conn, conn.transaction():
                row = conn.execute(
                    "INSERT INTO service_accounts (username, name, secret_hash, created_at) "
                    "VALUES (%s, %s, %s, %s) RETURNING id",
                    (username, name, hash_secret(secret), now),
                ).fetchone()
                assert row is not None
                account_id = int(row[0])
                conn.cursor().executemany(
                    "INSERT INTO service_account_projects (account_id, project_id) "
                    "VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    [(account_id, pid) for pid in project_ids],
                )
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise StoreUnavailable(f"cannot write to {self.name}: {exc}") from exc
        account = ServiceAccount(account_id, username, name, tuple(sorted(set(project_ids))), now)
        return account, secret

    def _account(self, row: Sequence[Any]) -> ServiceAccount:
        pids = tuple(
            int(r[0])
            for r in self._read(
                "SELECT project_id FROM service_account_projects WHERE account_id = %s "
                "ORDER BY project_id",
                (row[0],),
            )
        )
        return ServiceAccount(int(row[0]), str(row[1]), str(row[2]), pids, float(row[3]))

    def list_service_accounts(self) -> list[ServiceAccount]:
        rows = self._read("SELECT id, username, name, created_at FROM service_accounts ORDER BY id")
        return [self._account(r) for r in rows]

    def service_account(self, username: str, secret: str) -> ServiceAccount | None:
        rows = self._read(
            "SELECT id, username, name, created_at, secret_hash FROM service_accounts "
            "WHERE username = %s",
            (username,),
        )
        row = rows[0] if rows else None
        stored = str(row[4]) if row is not None else hash_secret(secrets.token_hex(16))
        if not secret_matches(secret, stored) or row is None:
            return None
        return self._account(row)
