"""The SQLite store's write path: group commit, with the next group merged during the commit.

A group goes through two phases on the thread that sends it, and its COMMIT runs on a third:

1. **Merge** (`GroupBackend` in pipelined mode): the group's profiles are read through a
   read-only connection, and through the states the previous group left in memory
   (`Written`) for the profiles it wrote, because that group may still be committing. No
   SQL is written yet: `save_profiles` only computes the rows.
2. **Write**: once the previous group's COMMIT has ended (the write lock is free), `BEGIN
   IMMEDIATE` on the write connection, the rows are written (`flush`), and the group is
   handed to the `Committer` thread, which runs COMMIT and releases the write lock.
3. **COMMIT** (with `synchronous=FULL`, its fsync) runs in the committer thread, outside the
   interpreter lock, while the sending thread merges the next group. A request is answered
   only when its group's COMMIT has returned (`SqliteStore.await_group`).

A merge made in phase 1 is used only if nothing changed under it: the previous group
committed, and no other connection committed to the file since (`PRAGMA data_version`, read
in the write transaction). Otherwise the group is merged again inside the write transaction,
through the write connection (serial mode), as it is when it needs a new project.

The update log is kept in the profile row (`tail`) and in `log_chunks`: appending to it
rewrites only the row the merge rewrites anyway; the stored log is read and rewritten whole
only for late records, deletes and compaction.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import apsw
import orjson

from ..logindex import insort
from ..merge import Key, LogEntry, ProfileRow
from ..types import Applied, Update
from .base import hash_secret, new_secret
from .rowcache import Cached, RowCache

if TYPE_CHECKING:
    from .sqlite import SqliteStore

log = logging.getLogger(__name__)

# A profile's newest log entries live in its row; past either limit they move to log_chunks.
TAIL_MAX_ENTRIES = 16
TAIL_MAX_BYTES = 2048

_LOAD_CHUNK = 500  # distinct_ids per SELECT when loading a group's profiles

RawEntry = list[Any]  # [time, seq, received, dedup, body] as the log stores it


def _one(conn: apsw.Connection, sql: str, args: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(sql, args).fetchone()
    assert row is not None
    return row[0]


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def raw_entries(entries: Sequence[LogEntry]) -> list[RawEntry]:
    """Log entries in the form the tail and the chunks hold (a JSON array of these)."""
    return [[e.time, e.seq, e.received_at(), e.dedup, e.stored_body()] for e in entries]


def read_log(
    conn: apsw.Connection,
    key: Key,
    tail: bytes | None,
    chunks: int,
    spill: tuple[int, bytes] | None = None,
) -> list[RawEntry]:
    """A profile's stored log (chunks and tail), in ($time, seq) order.

    `spill` is a chunk written by a group that may not have committed yet: it replaces the
    stored chunk of the same `last_seq`, whether the connection sees that one or not.
    """
    loads = orjson.loads
    raw: list[RawEntry] = []
    if chunks:
        if spill is None:
            for (blob,) in conn.execute(
                "SELECT entries FROM log_chunks WHERE project_id = ? AND distinct_id = ?", key
            ):
                raw.extend(loads(blob))
        else:
            for last_seq, blob in conn.execute(
                "SELECT last_seq, entries FROM log_chunks WHERE project_id = ? AND distinct_id = ?",
                key,
            ):
                if last_seq != spill[0]:
                    raw.extend(loads(blob))
            raw.extend(loads(spill[1]))
    if tail is not None:
        raw.extend(loads(tail))
    raw.sort(key=_entry_order)
    return raw


def _entry_order(entry: RawEntry) -> tuple[float, int]:
    return (entry[0], entry[1])


def _append(tail: bytes | None, new: bytes) -> bytes:
    """Join two JSON arrays without parsing them."""
    if tail is None or tail == b"[]":
        return new
    return tail[:-1] + b"," + new[1:]


@dataclass
class PipelineStats:
    """How the store's groups were merged (for benchmarks and tests)."""

    groups: int = 0
    overlapped: int = 0  # merged while the previous group committed
    preloaded: int = 0  # their profiles read inside the previous group's transaction
    merged_again: int = 0  # merged again inside their transaction: the state they used changed
    logs_read_late: int = 0  # stored logs read after the preload (the prediction missed them)


class NeedsSerial(Exception):
    """The merge cannot be made outside the write transaction (it must create a project)."""


@dataclass(slots=True)
class Written:
    """A profile as a group left it, for the next group while this one may still commit."""

    row: ProfileRow
    tail: bytes | None  # the row's `tail` column
    tail_n: int
    chunks: int
    log: list[LogEntry] | None  # the whole stored log after the group, when the group read it
    keys: set[int] | None  # its retry keys, when a retry check asked for them
    spill: tuple[int, bytes] | None  # (last_seq, entries) of the chunk the group wrote


class GroupBackend:
    """MergeBackend for one group: reads through `reader` and `previous`, writes in `flush`.

    Pipelined (`pipelined=True`): `reader` is the store's read-only merge connection and
    `previous` the states of the group before, which may be committing; sequence numbers come
    from the store's counter in memory. Serial: `reader` is the write connection inside the
    write transaction and `previous` is empty. Busy profiles' rows and decoded logs come from
    the store's cache when it has them.
    """

    def __init__(
        self,
        store: SqliteStore,
        reader: apsw.Connection,
        previous: dict[Key, Written],
        pipelined: bool,
    ) -> None:
        self.store = store
        self.reader = reader
        self.previous = previous
        self.pipelined = pipelined
        self._tails: dict[Key, tuple[bytes | None, int, int]] = {}  # tail, tail_n, chunks
        self._spills: dict[Key, tuple[int, bytes]] = {}  # previous group's chunks, per profile
        # stored logs read (or taken from the cache) in this group, in ($time, seq) order
        self._logs: dict[Key, list[LogEntry]] = {}
        self._keys: dict[Key, set[int]] = {}  # the retry keys of some of them
        self._rewrite: set[Key] = set()  # stored logs to write back whole
        self._new: dict[Key, list[LogEntry]] = {}
        self._cache: RowCache = store.row_cache
        self.loaded: dict[Key, ProfileRow] = {}
        self.created_ids: dict[str, int] = {}  # projects created in this transaction
        self.written: dict[Key, Written] = {}
        self._seq_end: int | None = None
        self.logs_read = 0  # stored logs read from the file
        # the rows to write, computed by save_profiles, written by flush
        self._cleared: list[Key] = []
        self._spilled: list[tuple[int, str, int, bytes]] = []
        self._inserts: list[tuple[Any, ...]] = []
        self._updates: list[tuple[Any, ...]] = []

    def project_ids(self, tokens: Iterable[str], create: bool) -> dict[str, int]:
        out: dict[str, int] = {}
        known = self.store._token_ids
        for token in tokens:
            pid = known.get(token)
            if pid is None:
                row = self.reader.execute(
                    "SELECT id FROM projects WHERE token = ?", (token,)
                ).fetchone()
                if row is None and create:
                    if self.pipelined:
                        raise NeedsSerial()
                    self.reader.execute(
                        "INSERT INTO projects (token, name, secret_hash, created_at) VALUES (?, ?, ?, ?)",
                        (token, "", hash_secret(new_secret()), time.time()),
                    )
                    row = (self.reader.last_insert_rowid(),)
                    log.info("project created for new token %r (id %s)", token, row[0])
                if row is None:
                    continue
                pid = int(row[0])
                if self.pipelined:
                    known[token] = pid  # read outside any write: it is committed
                else:
                    self.created_ids[token] = pid  # known once the transaction commits
            out[token] = pid
        return out

    def next_seq(self, count: int) -> int:
        store = self.store
        if self.pipelined:
            start = store._seq + 1
            store._seq += count
            self._seq_end = store._seq
            return start
        # the counter in memory may be ahead of the file after a failed group: never go back
        value = int(
            _one(
                self.reader,
                "UPDATE counters SET value = max(value, ?) + ? WHERE name = 'seq' RETURNING value",
                (store._seq, count),
            )
        )
        store._seq = value
        return value - count + 1

    def load_profiles(self, keys: Sequence[Key]) -> dict[Key, ProfileRow]:
        out: dict[Key, ProfileRow] = {}
        tails = self._tails
        previous = self.previous
        loads = orjson.loads
        by_project: dict[int, list[str]] = {}
        take = self._cache.take
        for key in keys:
            written = previous.get(key)
            if written is not None:
                out[key] = written.row
                tails[key] = (written.tail, written.tail_n, written.chunks)
                if written.log is not None:
                    self._logs[key] = written.log
                elif written.spill is not None:
                    self._spills[key] = written.spill
                if written.keys is not None:
                    self._keys[key] = written.keys
                continue
            cached = take(key)
            if cached is None:
                by_project.setdefault(key[0], []).append(key[1])
                continue
            out[key] = cached.row
            tails[key] = (cached.tail, cached.tail_n, cached.chunks)
            self._logs[key] = cached.log
            if cached.keys is not None:
                self._keys[key] = cached.keys
        cur = self.reader.cursor()
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
        self.loaded = out
        return out

    def load_log(self, key: Key) -> list[LogEntry]:
        log = self._logs.get(key)
        if log is None:
            self.logs_read += 1
            tail, _, chunks = self._tails.get(key, (None, 0, 0))
            did = key[1]
            log = self._logs[key] = [
                LogEntry(t, s, None, d, body=body, distinct_id=did, received=received)
                for t, s, received, d, body in read_log(
                    self.reader, key, tail, chunks, self._spills.get(key)
                )
            ]
        return log

    def preload_logs(self, keys: Iterable[Key]) -> None:
        """Read these profiles' stored logs now (the merge would read them later)."""
        for key in keys:
            self.load_log(key)

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
        """Compute the rows to write (flush writes them) and what the next group starts from.

        The merger calls this once per group, after every delete_log and insert_log.
        """
        tails = self._tails
        for key, row in rows:
            tail, n, chunks = tails.get(key, (None, 0, 0))
            new = self._new.pop(key, None)
            added = raw_entries(new) if new else None
            rewrite = key in self._rewrite
            if rewrite:
                if chunks:
                    self._cleared.append(key)
                    chunks = 0
                entries = self._logs[key]
                tail = orjson.dumps(raw_entries(entries)) if entries else None
                n = len(entries)
            if added:
                tail = _append(tail, orjson.dumps(added))
                n += len(added)
            spill = None
            if (
                (new or rewrite)
                and tail is not None
                and (n > TAIL_MAX_ENTRIES or len(tail) > TAIL_MAX_BYTES)
            ):
                # seqs only grow: the newest entry's seq names the chunk uniquely
                newest = new[-1].seq if new else max(e.seq for e in self._logs[key])
                spill = (newest, tail)
                self._spilled.append((key[0], key[1], newest, tail))
                tail, n, chunks = None, 0, chunks + 1
            tails[key] = (tail, n, chunks)
            (self._updates if key in self.loaded else self._inserts).append(
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
            # the stored log as this group leaves it, when the group read it
            log = self._logs.get(key)
            keys = self._keys.get(key)
            if log is not None and new:
                for entry in new:  # from now on, entries of an earlier group
                    entry.request = -1
                    entry.distinct_id = key[1]
                    if keys is not None and entry.dedup is not None:
                        keys.add(entry.dedup)
                    insort(log, entry)  # kept in order: a rewrite writes it as it is
            row.dirty = False
            self.written[key] = Written(row, tail, n, chunks, log, keys, spill)
        if self._new:
            raise AssertionError(f"log entries of unsaved profiles: {list(self._new)[:3]}")

    def seal(self) -> None:
        """After the merge: the profiles read but not written are handed on as they were."""
        for key, row in self.loaded.items():
            if key not in self.written:
                tail, n, chunks = self._tails[key]
                self.written[key] = Written(
                    row, tail, n, chunks, self._logs.get(key), self._keys.get(key), None
                )

    def flush(self, conn: apsw.Connection) -> None:
        """Write the group's rows, in the open write transaction."""
        if self._cleared:
            conn.executemany(
                "DELETE FROM log_chunks WHERE project_id = ? AND distinct_id = ?", self._cleared
            )
        if self._spilled:
            conn.executemany(
                "INSERT INTO log_chunks (project_id, distinct_id, last_seq, entries) "
                "VALUES (?, ?, ?, ?)",
                self._spilled,
            )
        if self._inserts:
            conn.executemany(
                "INSERT INTO profiles (props, last_time, base, tomb, log_min, log_n, log_floor, "
                "tail, tail_n, chunks, project_id, distinct_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                self._inserts,
            )
        if self._updates:
            # a plain UPDATE finds each row with one seek
            conn.executemany(
                "UPDATE profiles SET props = ?, last_time = ?, base = ?, tomb = ?, log_min = ?, "
                "log_n = ?, log_floor = ?, tail = ?, tail_n = ?, chunks = ? "
                "WHERE project_id = ? AND distinct_id = ?",
                self._updates,
            )
        if self._seq_end is not None:
            conn.execute(
                "UPDATE counters SET value = ? WHERE name = 'seq' AND value < ?",
                (self._seq_end, self._seq_end),
            )


def remember(cache: RowCache, written: dict[Key, Written], skip: Container[Key] = ()) -> None:
    """After a group committed: keep its busy profiles' logs for later groups.

    `skip` are the profiles the next group read from `written`: that group hands them on.
    """
    if not cache.budget:
        return
    for key, state in written.items():
        if state.log is None or key in skip:
            continue
        cache.put(
            key, Cached(state.row, state.tail, state.tail_n, state.chunks, state.log, state.keys)
        )


@dataclass(eq=False)
class Group:
    """One group on its way: merged and written, then committed by the Committer thread."""

    requests: Sequence[Sequence[Update]]
    counts: dict[tuple[str, str], int]
    results: list[Applied] = field(default_factory=list)
    written: dict[Key, Written] | None = None  # None: not usable by the next group
    created_ids: dict[str, int] = field(default_factory=dict)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Committer:
    """The thread that runs each group's COMMIT, then releases the store's write lock.

    With `synchronous=full` the write connection commits with `synchronous=NORMAL` (the WAL
    is not fsync'd inside COMMIT) and this thread fsyncs the WAL file itself after releasing
    the lock, before the group is answered: the next group is written during that fsync.
    An answered group is as durable as with SQLite's FULL: its frames were in the file
    before the fsync began. A failed fsync leaves the store faulted: the groups behind it
    are rolled back unanswered, and the next group first makes what is committed durable
    (SqliteStore._recover).
    """

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self._queue: queue.SimpleQueue[Group | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="peoplebase-commit", daemon=True)
        self._worker.start()

    def commit(self, group: Group) -> None:
        """COMMIT the open transaction of `group`; the write lock is released after it."""
        self._queue.put(group)

    def stop(self) -> None:
        self._queue.put(None)
        self._worker.join()

    def _run(self) -> None:
        while True:
            group = self._queue.get()
            if group is None:
                return
            finish(self.store, group)


def finish(store: SqliteStore, group: Group) -> None:
    """COMMIT a written group (the write lock is held), release the lock, fsync the WAL, and
    mark the group done: on the committer thread, or on the sender's (`write_group`)."""
    try:
        store._finish_commit(group)
    except BaseException as exc:  # reported by await_group
        group.error = exc
        store._write_lock.release()
        group.done.set()
        return
    store._write_lock.release()
    try:
        store._sync_wal()
    except BaseException as exc:
        group.error = exc
    group.done.set()
