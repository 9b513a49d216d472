"""The embedded store: one SQLite file in WAL mode, with one write connection.

Writes come through `send_group` / `await_group` (or `write_group`, both at once), which the
writer calls with every request it took from the queue: they share one `BEGIN IMMEDIATE …
COMMIT` (group commit) and, with `synchronous=FULL`, one fsync. The COMMIT and the fsync run
on a thread of their own while the next group is merged (sqlite_write.py). With
`write_behind`, a group's transaction holds its updates as one `journal` row and the rows of
the profiles it changed are written later (writeback.py); `catch_up` replays the journal after
a restart, and reads see what the rows do not hold yet through the overlay (overlay.py), or
after `fresh` has every row written. Reads use their own connection per thread and never
block the writer (WAL).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import apsw
import orjson

from ..journal import decode_group, encode_group
from ..merge import DEFAULT_MAX_LOG_ENTRIES, Loaded, LogEntry, Merger, update_from_body
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
from .overlay import Overlay
from .sqlite_write import (
    Committer,
    Group,
    GroupBackend,
    NeedsSerial,
    OverlayDelta,
    PipelineStats,
    done_writing,
    finish,
    mark_written,
    read_log,
    write_rows,
)
from .writeback import DEFAULT_INTERVAL, DEFAULT_LOG_CACHE, DEFAULT_MAX_PROFILES, WriteBack

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


def _file_props(conn: apsw.Connection, project_id: int, distinct_id: str) -> Props | None:
    """A profile's props as its row in the file holds them (None: no profile)."""
    row = conn.execute(
        "SELECT props FROM profiles WHERE project_id = ? AND distinct_id = ? AND props IS NOT NULL",
        (project_id, distinct_id),
    ).fetchone()
    return orjson.loads(row[0]) if row is not None else None


def _one(conn: apsw.Connection, sql: str, args: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(sql, args).fetchone()
    assert row is not None
    return row[0]


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
        write_behind: float = DEFAULT_INTERVAL,
        held_profiles: int = DEFAULT_MAX_PROFILES,
    ) -> None:
        self.path = path
        self.synchronous = synchronous.upper()
        self.indexed_properties = tuple(indexes.check_name(n) for n in indexed_properties)
        self.merger = Merger(reorder_window, max_properties, open_tokens, max_log_entries)
        self._local = threading.local()
        self._write_conn: apsw.Connection | None = None
        self._token_ids: dict[str, int] = {}
        # Held from a group's BEGIN to the end of its COMMIT (released by the committer
        # thread), and by every other use of the write connection.
        self._write_lock = threading.Lock()
        self._merge_lock = threading.Lock()  # one group is merged at a time
        self._merge_conn: apsw.Connection | None = None
        self._reopen_merge_conn = False
        self._committer: Committer | None = None
        self._inflight: Group | None = None  # the last group handed to the committer
        # the next group's requests, and their profiles read in the previous transaction
        self._preloaded: tuple[Sequence[Sequence[Update]], GroupBackend, Loaded] | None = None
        self._seq = 0  # the arrival counter, as far as this store has handed it out
        # PRAGMA data_version of the write connection at the last group: when it changes,
        # another connection has committed, and what this store keeps in memory is old
        self._dv: int | None = None
        self._next_optimize = 0.0
        self.clock: Callable[[], float] = time.monotonic  # the write-behind schedule's
        self.pipeline = PipelineStats()
        self._wal_path = str(Path(path).expanduser().resolve()) + "-wal"
        self._wal_fd: int | None = None
        self._sync_lock = threading.Lock()
        self._faulted: BaseException | None = None  # a failed WAL fsync, until _recover
        # the profiles the writer holds between groups, and when their rows are written
        self.writeback = WriteBack(write_behind, held_profiles, log_cache)
        # False until the journal has been replayed into the rows by this store (catch_up),
        # and again whenever the held states may not be the file's and the journal's
        self._caught_up = False
        self._journal_newest: int | None = None  # the newest journal row this store knows
        # acknowledged states whose rows are not written yet, for this process's readers
        self.overlay = Overlay()
        # Set by the server with `--writer process`: query-session writes go to the process
        # that holds the write connection instead of competing with it for the file's lock,
        # and so does making every row current (`fresh`).
        self.session_writer: Callable[[str, Sequence[tuple[Any, ...]]], None] | None = None
        self.syncer: Callable[[], None] | None = None

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
            if self.synchronous == "FULL":
                # the WAL is fsync'd by _sync_wal after each commit, outside the write lock
                self._write_conn.execute("PRAGMA synchronous = NORMAL")
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
        wanted = {indexes.sqlite_index_name(n): n for n in self.indexed_properties}
        with self._write_tx() as conn:
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
                    # cost the index nothing when written but a substring search; a query
                    # names the same terms (indexes.sqlite_hints) to use it.
                    expression = indexes.sqlite_expression(name)
                    conn.execute(  # sql: reviewed: DDL; index name and expression are checked
                        f'CREATE INDEX "{index}" ON profiles (project_id, {expression}) '
                        f"WHERE {indexes.sqlite_indexed(name)}"
                    )
        self.analyze()

    def migrate(self) -> int:
        with self._write_lock:
            self.writeback.drop()
            self._caught_up = False
            conn = self._writer()
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
                self._sync_wal()
            self._seq = max(
                self._seq, int(_one(conn, "SELECT value FROM counters WHERE name = 'seq'"))
            )
            self._dv = _one(conn, "PRAGMA data_version")
            return applied

    def _close_writer(self) -> None:
        """Close the write connection (the write lock is held); the next use reopens it.

        The merge connection is reopened too, by the next merge: a connection kept open
        across a storage fault keeps the file's old state (its shared memory, its handles).
        """
        self._dv = None
        self._reopen_merge_conn = True
        conn, self._write_conn = self._write_conn, None
        if conn is not None:
            try:
                conn.close()
            except apsw.Error as exc:
                log.warning("closing the write connection after a storage fault: %s", exc)

    def _sync_wal(self) -> None:
        """fsync the WAL file: what `synchronous=FULL` does inside each COMMIT, done after it
        (the write connection commits with NORMAL). Called after every commit on the write
        connection; a failure leaves the store faulted until `_recover` succeeds."""
        if self.synchronous != "FULL":
            return
        with self._sync_lock:
            if self._faulted is not None:
                raise StoreUnavailable(f"storage fault: {self._faulted}")
            try:
                status = os.stat(self._wal_path)
                fd = self._wal_fd
                if fd is None or os.fstat(fd).st_ino != status.st_ino:
                    if fd is not None:
                        os.close(fd)
                    self._wal_fd = None
                    fd = os.open(self._wal_path, os.O_RDONLY)
                    self._wal_fd = fd
                    # a new WAL file: its directory entry must survive a power loss too
                    directory = os.open(os.path.dirname(self._wal_path) or ".", os.O_RDONLY)
                    try:
                        os.fsync(directory)
                    finally:
                        os.close(directory)
                os.fsync(fd)
            except OSError as exc:
                self._faulted = exc
                log.error("fsync of %s failed: %s", self._wal_path, exc)
                raise StoreUnavailable(f"fsync of the WAL failed: {exc}") from exc

    def _recover(self, conn: apsw.Connection) -> None:
        """After a failed fsync: copy what is committed into the database file and fsync it
        (a checkpoint), so nothing written after the fault depends on frames that may be
        lost. Raises StoreUnavailable while that fails (the write lock is held)."""
        try:
            conn.execute("PRAGMA synchronous = FULL")
            busy = _one(conn, "PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("PRAGMA synchronous = NORMAL")
        except apsw.Error as exc:
            raise StoreUnavailable(f"storage fault: {exc}") from exc
        if busy:
            raise StoreUnavailable(f"storage fault: {self._faulted} (checkpoint busy)")
        with self._sync_lock:
            self._faulted = None
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None
        log.warning("storage fault cleared: the WAL is copied into %s and synced", self.path)

    @contextmanager
    def _write_tx(self) -> Iterator[apsw.Connection]:
        """The write connection in a transaction of its own (not a group's): committed on
        exit, and as durable as a group's before this returns."""
        with self._write_lock:
            conn = self._writer()
            if self._faulted is not None:
                self._recover(conn)
            with conn:
                yield conn
            self._sync_wal()

    def _merge_reader(self) -> apsw.Connection:
        """The read-only connection groups are merged through (under the merge lock)."""
        if self._merge_conn is None:
            self._merge_conn = self._connect()
            self._merge_conn.execute("PRAGMA query_only = 1")
        return self._merge_conn

    def close(self) -> None:
        with self._merge_lock:
            if self._inflight is not None:
                self._inflight.done.wait()
            if self._caught_up and (self.writeback.has_dirty() or self._journal_newest):
                try:  # the rows now, so the next start has nothing to replay
                    self._sync(full=True)
                except StoreUnavailable as exc:
                    log.warning(
                        "profile rows not written at close (the journal keeps them): %s", exc
                    )
            with self._write_lock:  # the group in flight has committed
                self._inflight = None
                if self._committer is not None:
                    self._committer.stop()
                    self._committer = None
                for conn in (self._write_conn, self._merge_conn):
                    if conn is not None:
                        conn.close()
                self._write_conn = self._merge_conn = None
                if self._wal_fd is not None:
                    os.close(self._wal_fd)
                    self._wal_fd = None
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- writes ---------------------------------------------------------------------------

    # In the server process (`--writer thread`) the writer calls write_group: merging the
    # next group during a COMMIT only adds contention for the interpreter lock there, which
    # HTTP parsing and validation hold too (measured slower at b2000, BENCHMARKS.md). The
    # writer process pipelines with send_group (writeproc.py), and tells it of the next group.
    PIPELINE_DEPTH = 1

    def write_group(
        self, requests: Sequence[Sequence[Update]], counts: dict[tuple[str, str], int] | None = None
    ) -> list[Applied]:
        """Merge the requests in one transaction and commit it durably; raises
        StoreUnavailable on storage faults.

        `counts` (outcome counts by project token) are stored in the same transaction, with
        the counts of this group's own outcomes added. The COMMIT runs on the calling thread:
        nothing is merged meanwhile (`send_group` pipelines).
        """
        return self.await_group(self.send_group(requests, counts, inline=True))

    def send_group(
        self,
        requests: Sequence[Sequence[Update]],
        counts: dict[tuple[str, str], int] | None = None,
        upcoming: Callable[[], Sequence[Sequence[Update]] | None] | None = None,
        inline: bool = False,
        body: bytes | None = None,
    ) -> Group:
        """Merge and write a group, and hand its COMMIT to the committer thread.

        Returns when the group is written and the previous group has committed, so the
        caller can send the next group while this one commits (sqlite_write.py). The answer
        to the group's requests is `await_group`'s. `upcoming`, when given, tells the next
        group's requests if they are known already: their profiles are then read inside
        this group's transaction, where the pages are at hand. `body` is the requests as
        `journal.encode_group` encodes them, when the caller has it.
        """
        with self._merge_lock:
            if self._reopen_merge_conn and self._merge_conn is not None:
                self._merge_conn.close()
                self._merge_conn = None
            self._reopen_merge_conn = False
            previous = self._inflight
            preloaded, self._preloaded = self._preloaded, None
            if body is None and self.writeback.interval > 0:
                body = encode_group(requests)  # before the merge moves any update's time
            group = Group(requests, counts or {}, body)
            self.pipeline.groups += 1
            backend: GroupBackend | None = None
            loaded: Loaded | None = None
            if preloaded is not None and preloaded[0] is requests:
                backend, loaded = preloaded[1], preloaded[2]
                self.pipeline.preloaded += 1
            merged = False
            if (
                previous is not None
                and not previous.done.is_set()
                and self._dv is not None
                and self._caught_up
            ):
                # the previous group is committing: merge this one meanwhile
                if backend is None:
                    backend = GroupBackend(self, self._merge_reader(), True)
                backend.reader = self._merge_reader()
                try:
                    if loaded is None:
                        loaded = self.merger.load(backend, requests)
                    group.results = self.merger.apply(backend, requests, loaded)
                    backend.seal()
                    merged = True
                    self.pipeline.overlapped += 1
                    self.pipeline.logs_read_late += backend.logs_read
                except NeedsSerial:
                    backend, loaded = None, None
                except BaseException:
                    # the merge may have changed held states: they are dropped
                    self._caught_up = False
                    raise
            # the next group, if it is there already: asked now, while the previous COMMIT
            # runs, since getting it may take a while (the writer process unpickles it)
            following = self._ask(upcoming) if upcoming is not None else None
            self._write_lock.acquire()  # free once the previous group's COMMIT has ended
            try:
                self._write(group, backend, loaded, merged)
                if following:
                    self._preload(group, following)
            except BaseException:
                self._write_lock.release()
                raise
            self._inflight = group
            if inline:
                finish(self, group)
                return group
            if self._committer is None:
                self._committer = Committer(self)
            self._committer.commit(group)  # releases the write lock after COMMIT
            return group

    def _changed_elsewhere(self, conn: apsw.Connection) -> bool:
        """In a write transaction: whether another connection committed since this store's
        last transaction. Then what this store holds may not be the file's: if the other
        touched the journal (it replayed it, or wrote groups of its own), every held state is
        dropped and the journal replayed; else the states whose rows are written are dropped."""
        version = _one(conn, "PRAGMA data_version")
        if version == self._dv:
            return False
        self._dv = version
        newest = _one(conn, "SELECT max(id) FROM journal")
        if newest != self._journal_newest:
            self._caught_up = False
        else:
            self.writeback.drop_clean()
        return True

    def _write(
        self,
        group: Group,
        backend: GroupBackend | None,
        loaded: Loaded | None,
        merged: bool,
    ) -> None:
        """Open the group's transaction, write its journal row and the rows that are due
        (the write lock is held).

        `merged`: the group was merged while the previous one committed; else it is merged
        here, inside the transaction (on `backend` if its profiles were read already).
        """
        self._inflight = None
        held = self.writeback
        with self._group_tx() as conn:
            if self._changed_elsewhere(conn) and merged:
                # the merge made meanwhile changed held states in place: all are dropped
                self._caught_up = False
            reset = False
            if not self._caught_up:
                group.wrote = self._catch_up(conn)
                reset = True
            if backend is not None and backend.epoch != held.epoch:
                # merged (or read ahead) on states that are gone: merge again, from the file
                self.pipeline.merged_again += 1
                backend, loaded, merged = None, None, False
            if not merged:
                if backend is None:
                    backend = GroupBackend(self, conn, pipelined=False)
                    loaded = None
                backend.reader = conn
                group.results = self.merger.apply(backend, group.requests, loaded)
                backend.seal()
            assert backend is not None  # merged, or merged just now
            behind = held.interval > 0
            if behind and backend.jid:
                conn.execute(
                    "INSERT INTO journal (id, body) VALUES (?, ?)", (backend.jid, group.body)
                )
                self._journal_newest = backend.jid
            due, trim = held.due(self.clock(), self._journal_newest or 0)
            group.wrote += self._write_due(conn, due, trim)
            backend.flush_counter(conn)
            self.add_stats(
                conn, outcome_counts(group.requests, group.results, group.counts), time.time()
            )
            held.evict()
            delta = backend.delta() if behind else OverlayDelta()
            delta.written = [(key, state.jid) for key, state in due] if behind else []
            delta.reset = reset
            group.delta = delta
        group.created_ids = backend.created_ids
        group.epoch = held.epoch

    @contextmanager
    def _group_tx(self) -> Iterator[apsw.Connection]:
        """BEGIN IMMEDIATE, for a group or for rows written behind (under the write lock).

        What raises inside rolls the transaction back, and the held states are not trusted
        until the journal is replayed again (they may hold what was rolled back). A storage
        fault closes the connection: reopened on the next commit, since one that fell back to
        read-only, or whose file went bad, would otherwise keep failing after the fault is
        fixed. The caller commits (or leaves the COMMIT to the committer thread).
        """
        try:
            conn = self._writer()
            if self._faulted is not None:
                self._recover(conn)
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                self._caught_up = False
                if not conn.getautocommit():
                    conn.execute("ROLLBACK")
                raise
        except _UNAVAILABLE as exc:
            self._caught_up = False
            self._close_writer()
            raise StoreUnavailable(str(exc)) from exc

    def _write_due(self, conn: apsw.Connection, due: list[Any], trim: int | None) -> list[Any]:
        """Write the rows that are due, and delete the journal rows they all hold now."""
        write_rows(conn, due)
        mark_written(self.writeback, due)
        self.pipeline.rows_written += len(due)
        if trim:
            self._trim(conn, trim)
        return due

    def _trim(self, conn: apsw.Connection, upto: int) -> None:
        """Delete the journal rows whose updates every profile row holds now."""
        conn.execute("DELETE FROM journal WHERE id <= ?", (upto,))
        if self._journal_newest is not None and self._journal_newest <= upto:
            self._journal_newest = None

    def _catch_up(self, conn: apsw.Connection) -> list[Any]:
        """In a write transaction: drop the held states and replay the journal into the rows
        (after a restart, a failed group, or another connection's replay), so that the file's
        rows hold every committed update. Returns the states written."""
        held = self.writeback
        held.drop()
        rows = conn.execute("SELECT id, body FROM journal ORDER BY id").fetchall()
        for jid, body in rows:
            number = int(jid)  # type: ignore[arg-type]
            backend = GroupBackend(self, conn, pipelined=False, replay=number)
            self.merger.apply(backend, decode_group(body), replay=number)  # type: ignore[arg-type]
            backend.seal()
        due = held.everything()
        write_rows(conn, due)
        mark_written(held, due)
        if rows:
            conn.execute("DELETE FROM journal")
            log.info(
                "replayed %d journal groups into %d profile rows of %s",
                len(rows),
                len(due),
                self.path,
            )
        self.pipeline.replayed += len(rows)
        self._journal_newest = None
        self._caught_up = True
        return due

    def catch_up(self) -> None:
        """Replay what the journal holds into the profile rows: the server does it when it
        starts (after a crash, the journal holds what was acknowledged and not written); the
        first group of any store does it too, and so does `fresh`."""
        self.sync(full=True)

    def sync(self, full: bool = True) -> OverlayDelta:
        """Write profile rows now, in a transaction of their own: every changed profile's
        (`full`: the journal is emptied), or the part of the current cycle that is due."""
        with self._merge_lock:
            if self._inflight is not None:
                self._inflight.done.wait()  # its readers' changes go first
            return self._sync(full)

    def _sync(self, full: bool) -> OverlayDelta:
        held = self.writeback
        wrote: list[Any] = []
        with self._write_lock:
            try:
                with self._group_tx() as conn:
                    self._changed_elsewhere(conn)
                    reset = False
                    if not self._caught_up:
                        wrote = self._catch_up(conn)
                        reset = True
                    if full:
                        due, trim = held.everything(), self._journal_newest
                        reset = True
                    else:
                        due, trim = held.due(self.clock(), self._journal_newest or 0)
                    wrote += self._write_due(conn, due, trim)
                    held.evict()
                    conn.execute("COMMIT")
            finally:
                for _, state in wrote:
                    done_writing(state)
        self._sync_wal()
        delta = OverlayDelta(written=[(key, state.jid) for key, state in wrote], reset=reset)
        self.overlay.apply(delta)
        return delta

    def idle(self) -> OverlayDelta | None:
        """When no group comes: write the rows that are due (write-behind), if any."""
        if self.writeback.interval <= 0 or not (self.writeback.has_dirty() or self._journal_newest):
            return None
        return self.sync(full=False)

    def fresh(self) -> None:
        """Make the file's rows hold every acknowledged update, for a read that scans them
        (with write-behind, the newest updates of a profile may be only in the journal)."""
        if self.syncer is not None:  # the writer process holds them
            if self.overlay:
                self.syncer()
            return
        if self.overlay:
            self.sync(full=True)
            return
        # This store holds nothing unwritten; a server on the same file may.
        if self._reader().execute("SELECT 1 FROM journal LIMIT 1").fetchone() is not None:
            self.sync(full=True)

    @staticmethod
    def _ask(
        upcoming: Callable[[], Sequence[Sequence[Update]] | None],
    ) -> Sequence[Sequence[Update]] | None:
        try:
            return upcoming()
        except Exception:  # the caller's: this group goes on without it
            log.exception("reading the next group ahead failed")
            return None

    def _preload(self, group: Group, requests: Sequence[Sequence[Update]]) -> None:
        """Read the next group's profiles (and the logs it may need) in this group's
        transaction, which shows what this group wrote, through the connection whose page
        cache holds those pages. The next group is then merged while this one commits."""
        known = self._token_ids
        if any(u.token not in known for updates in requests for u in updates):
            return  # a project this transaction may have created is not committed yet
        backend = GroupBackend(self, self._writer(), pipelined=True)
        try:
            loaded = self.merger.load(backend, requests)
            backend.preload_logs(self.merger.logs_wanted(loaded))
        except _UNAVAILABLE:
            return  # the COMMIT will tell
        except NeedsSerial:
            return
        except Exception:  # the next group is merged without it, and fails there if it must
            log.exception("reading the next group's profiles ahead failed")
            return
        backend.logs_read = 0  # from here on, those the prediction missed
        self._preloaded = (requests, backend, loaded)

    def _finish_commit(self, group: Group) -> None:
        """On the committer thread, with the write lock held: COMMIT the group."""
        conn = self._write_conn
        assert conn is not None
        try:
            if self._faulted is not None:  # a WAL fsync failed: nothing more is committed
                raise StoreUnavailable(f"storage fault: {self._faulted}")
            conn.execute("COMMIT")
        except BaseException:
            self._dv = None  # the next group starts from the file
            self._caught_up = False
            try:
                if not conn.getautocommit():
                    conn.execute("ROLLBACK")
            except apsw.Error:
                pass
            self._close_writer()
            raise
        self._token_ids.update(group.created_ids)
        if time.monotonic() >= self._next_optimize:
            self._optimize(conn)

    def await_group(self, group: Group) -> list[Applied]:
        """The group's results once its COMMIT has returned; raises what the COMMIT raised."""
        group.done.wait()
        error = group.error
        if error is None:
            return group.results
        if isinstance(error, _UNAVAILABLE):
            raise StoreUnavailable(str(error)) from error
        raise error

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
        with self._write_lock:
            conn = self._writer()
            conn.execute("PRAGMA analysis_limit = 400")
            conn.execute("ANALYZE")
            self._sync_wal()
            self._next_optimize = time.monotonic() + self.OPTIMIZE_EVERY

    # --- projects -------------------------------------------------------------------------

    @staticmethod
    def _project(row: Sequence[Any]) -> Project:
        return Project(int(row[0]), row[1], row[2], row[3])

    def create_project(self, token: str, name: str = "") -> tuple[Project, str]:
        secret = new_secret()
        with self._write_tx() as conn:
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
        with self._write_tx() as conn:
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
        """The profiles that exist among these distinct_ids, with every acknowledged update.

        One profile: from the overlay when its row is not written yet, else from the file.
        Several: all from one read of the file, once every row is written (`fresh`), so the
        answer is one moment's state (a request that changed two of them is in both or in
        neither)."""
        ids = list(dict.fromkeys(distinct_ids))
        conn = self._reader()
        if len(ids) == 1:
            found = self._props(conn, project_id, ids[0])
            return [(ids[0], found)] if found is not None else []
        self.fresh()
        out = []
        with conn:  # one read snapshot for the whole answer
            for did in ids:
                found = _file_props(conn, project_id, did)
                if found is not None:
                    out.append((did, found))
        return out

    def _props(self, conn: apsw.Connection, project_id: int, distinct_id: str) -> Props | None:
        """One profile's props: the overlay's when it holds the profile, else the file's.
        The file is read after the overlay was asked, in a read of its own: an entry leaves the
        overlay only once the row holding it has committed, so the read sees that row."""
        held = self.overlay.get((project_id, distinct_id))
        if held is not None:
            return orjson.loads(held[1]) if held[1] is not None else None
        return _file_props(conn, project_id, distinct_id)

    def list_profiles(
        self, project_id: int, limit: int, offset: int
    ) -> tuple[int, list[tuple[str, Props]]]:
        self.fresh()
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
        self.fresh()
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
        self.fresh()
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
        self.fresh()
        sql, args = browse_query(
            "?",
            "props",
            "((distinct_id >= ? AND distinct_id < ?) "
            f"OR ({indexes.sqlite_equals('$email')}) OR ({indexes.sqlite_equals('$name')}))",
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
        self.fresh()
        rows = self._reader().execute(
            "SELECT props FROM profiles WHERE project_id = ? AND props IS NOT NULL LIMIT ?",
            (project_id, sample),
        )
        for (props,) in rows:
            names.update(orjson.loads(props))
        return sorted(names)

    def profile_detail(self, project_id: int, distinct_id: str) -> dict[str, Any] | None:
        """The materialized profile, its base snapshot, tombstone and update log, read at once."""
        self.fresh()
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
        ids = GroupBackend(self, conn, pipelined=False).project_ids(
            {token for token, _ in counts}, create=False
        )
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
        self.fresh()
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
        try:
            with self._write_tx() as conn:
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
        self.fresh()  # every acknowledged update in the rows, then one snapshot of them
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
            out = [(did, _file_props(conn, project_id, did)) for did in ids]
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
        self.fresh()
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
        with self._write_tx() as conn:
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
