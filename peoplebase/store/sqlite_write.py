"""The SQLite store's write path: group commit, with the next group merged during the commit.

A group goes through two phases on the thread that sends it, and its COMMIT runs on a third:

1. **Merge** (`GroupBackend`): the group's profiles come from the states the writer holds in
   memory (writeback.py: every profile changed and not written yet, and recently used ones)
   or, for the others, from the file. While the previous group commits, the merge reads the
   file through a read-only connection (pipelined mode). Nothing is written: `save_profiles`
   brings the states up to date (encoded props, tail, chunks to write).
2. **Write**: once the previous group's COMMIT has ended (the write lock is free), `BEGIN
   IMMEDIATE` on the write connection, the group's journal row and the rows that are due
   (`write_rows`; with write-through, those the group changed), and the group is handed to
   the `Committer` thread, which runs COMMIT and releases the write lock.
3. **COMMIT** (with `synchronous=FULL`, its fsync) runs in the committer thread, outside the
   interpreter lock, while the sending thread merges the next group. A request is answered
   only when its group's COMMIT has returned (`SqliteStore.await_group`), after the readers'
   overlay has taken the group's changes (`OverlayDelta`).

A merge made in phase 1 is used only if nothing changed under it: the previous group
committed, and no other connection committed since (`PRAGMA data_version`, read in the write
transaction). Otherwise the group is merged again inside the write transaction, through the
write connection (serial mode), as it is when it needs a new project.

The update log is kept in the profile row (`tail`) and in `log_chunks`: appending to it
changes only the row the merge changes anyway; the stored log is read and rewritten whole
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
from .writeback import ProfileState, WriteBack

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
    spills: Sequence[tuple[int, bytes]] = (),
    skip: Container[int] = (),
) -> list[RawEntry]:
    """A profile's stored log, in ($time, seq) order: its chunk rows in the file (none are read
    when `chunks` is 0; those whose `last_seq` is in `skip` are left out), the chunks not in the
    file yet (`spills`), and its tail."""
    loads = orjson.loads
    raw: list[RawEntry] = []
    if chunks:
        for last_seq, blob in conn.execute(
            "SELECT last_seq, entries FROM log_chunks WHERE project_id = ? AND distinct_id = ?",
            key,
        ):
            if last_seq not in skip:
                raw.extend(loads(blob))
    for _, blob in spills:
        raw.extend(loads(blob))
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
    rows_written: int = 0  # profile rows written
    replayed: int = 0  # journal rows replayed (catch_up)


class NeedsSerial(Exception):
    """The merge cannot be made outside the write transaction (it must create a project, or
    read a log whose rows a transaction still in flight writes)."""


@dataclass(slots=True)
class OverlayDelta:
    """What a committed transaction changes for readers of profiles (store/overlay.py)."""

    # profiles whose state changed: (key, the group's journal id, props JSON or None)
    changed: list[tuple[Key, int, str | None]] = field(default_factory=list)
    # rows written: (key, the journal id of the state written)
    written: list[tuple[Key, int]] = field(default_factory=list)
    # every row is current (a full write or a catch-up): readers may forget what they hold
    reset: bool = False

    def __bool__(self) -> bool:
        return bool(self.changed or self.written or self.reset)


class GroupBackend:
    """MergeBackend for one group over the states the writer holds (writeback.py) and the file.

    Pipelined (`pipelined=True`): `reader` is the store's read-only merge connection, and the
    group before may still be committing; sequence numbers come from the store's counter in
    memory. Serial: `reader` is the write connection inside the write transaction. A profile
    the writer holds is taken from memory; any other is read from the file. Nothing is written
    here: `save_profiles` updates the states, and the store writes rows when they are due.
    """

    def __init__(
        self,
        store: SqliteStore,
        reader: apsw.Connection,
        pipelined: bool,
        replay: int | None = None,
    ) -> None:
        self.store = store
        self.reader = reader
        self.pipelined = pipelined
        self.held = store.writeback
        self.epoch = self.held.epoch
        self.replay = replay  # the journal id of the group replayed (catch_up), if any
        self.states: dict[Key, ProfileState] = {}  # this group's profiles
        self._rewrite: set[Key] = set()  # stored logs to write back whole
        self._new: dict[Key, list[LogEntry]] = {}
        self.loaded: dict[Key, ProfileRow] = {}
        self.created_ids: dict[str, int] = {}  # projects created in this transaction
        self.jid = 0  # the group's first arrival number: its journal id
        self._seq_end: int | None = None
        self.logs_read = 0  # stored logs read from the file
        self.saved: list[tuple[Key, ProfileState]] = []  # changed by this group

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
        if self.replay is not None:
            self.jid = self.replay  # a journal row's group keeps its arrival numbers
            return self.replay
        if self.pipelined:
            start = store._seq + 1
            store._seq += count
            self._seq_end = store._seq
            self.jid = start
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
        self.jid = value - count + 1
        return self.jid

    def load_profiles(self, keys: Sequence[Key]) -> dict[Key, ProfileRow]:
        out: dict[Key, ProfileRow] = {}
        states = self.states
        held = self.held
        loads = orjson.loads
        by_project: dict[int, list[str]] = {}
        for key in keys:
            state = held.get(key)
            if state is None:
                by_project.setdefault(key[0], []).append(key[1])
                continue
            states[key] = state
            out[key] = state.row
            if state.log is not None:
                held.log_hits += 1
        cur = self.reader.cursor()
        for pid, dids in by_project.items():
            # one statement per chunk of ids rather than one per profile
            for start in range(0, len(dids), _LOAD_CHUNK):
                chunk = dids[start : start + _LOAD_CHUNK]
                sql = (
                    "SELECT distinct_id, props, last_time, base, tomb, log_min, log_n, log_floor, "  # noqa: S608
                    "tail, tail_n, chunks, jid FROM profiles WHERE project_id = ? AND distinct_id IN "
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
                    jid,
                ) in cur.execute(sql, (pid, *chunk)):
                    key = (pid, did)
                    # positionally (keywords cost a dataclass's __init__ more), the fields in
                    # their order (tests/test_writeback.py): dirty=False, then jid; in_file=True,
                    # then jid
                    row = ProfileRow(
                        loads(props) if props is not None else None,
                        last_time,
                        loads(base) if base is not None else None,
                        tomb,
                        log_min,
                        log_n,
                        log_floor,
                        False,
                        jid,
                    )
                    out[key] = row
                    states[key] = ProfileState(
                        row, props, base, row.base, tail, n, chunks, True, jid
                    )
        self.loaded = out
        return out

    def load_log(self, key: Key) -> list[LogEntry]:
        state = self.states.get(key)
        if state is None:
            return []  # a profile new in this group: nothing stored
        log = state.log
        if log is None:
            self.logs_read += 1
            if state.writing and self.reader is not self.store._write_conn:
                # Its row and chunks are written by a transaction that may not have committed
                # yet: whether this connection sees them or not, take those from memory.
                raw = read_log(
                    self.reader,
                    key,
                    state.tail,
                    0 if state.inflight_cleared else 1,
                    [*state.inflight, *state.spills],
                    {last_seq for last_seq, _ in state.inflight},
                )
            else:
                raw = read_log(
                    self.reader,
                    key,
                    state.tail,
                    0 if state.cleared else state.file_chunks,
                    state.spills,
                )
            did = key[1]
            log = state.log = [
                LogEntry(t, s, None, d, -1, body, did, received)  # request -1: stored
                for t, s, received, d, body in raw
            ]
            state.keys = None
        return log

    def preload_logs(self, keys: Iterable[Key]) -> None:
        """Read these profiles' stored logs now (the merge would read them later)."""
        for key in keys:
            self.load_log(key)

    def has_retry_key(self, key: Key, dedup: int) -> bool:
        state = self.states.get(key)
        if state is None:
            return False
        keys = state.keys
        if keys is None:
            keys = state.keys = {e.dedup for e in self.load_log(key) if e.dedup is not None}
        return dedup in keys

    def delete_log(self, key: Key, before: float) -> None:
        log = [e for e in self.load_log(key) if e.time >= before]
        state = self.states.get(key)
        if state is None:  # a profile new in this group
            state = self.states[key] = _new_state(ProfileRow())
        state.log = log
        state.keys = None
        self._rewrite.add(key)

    def insert_log(self, key: Key, entries: Sequence[LogEntry]) -> None:
        """Buffered: joins the profile's tail in save_profiles."""
        self._new.setdefault(key, []).extend(entries)

    def save_profiles(self, rows: Sequence[tuple[Key, ProfileRow]]) -> None:
        """Bring the changed profiles' states up to date: encoded props, tail, chunks to write.

        The merger calls this once per group, after every delete_log and insert_log.
        """
        states = self.states
        jid = self.jid
        for key, row in rows:
            state = states.get(key)
            if state is None:  # a profile new to the file
                state = states[key] = _new_state(row)
            new = self._new.pop(key, None)
            tail, n = state.tail, state.tail_n
            rewrite = key in self._rewrite
            if rewrite:
                # the whole log goes back into the tail; the file's chunks are dropped
                state.cleared = state.cleared or state.file_chunks > 0
                state.spills = []
                entries = state.log or []  # kept in ($time, seq) order
                tail = orjson.dumps(raw_entries(entries)) if entries else None
                n = len(entries)
            if new:
                tail = _append(tail, orjson.dumps(raw_entries(new)))
                n += len(new)
            if (
                (new or rewrite)
                and tail is not None
                and (n > TAIL_MAX_ENTRIES or len(tail) > TAIL_MAX_BYTES)
            ):
                # seqs only grow: the newest entry's seq names the chunk uniquely
                assert new or state.log is not None
                newest = new[-1].seq if new else max(e.seq for e in state.log or ())
                state.spills.append((newest, tail))
                tail, n = None, 0
            state.tail, state.tail_n = tail, n
            state.row = row
            state.props_json = _dumps(row.props) if row.props is not None else None
            if row.base is not state.base_src:
                state.base_json = _dumps(row.base) if row.base is not None else None
                state.base_src = row.base
            row.jid = state.jid = jid
            row.dirty = False
            state.dirty = True
            # the stored log as this group leaves it, when the group read it
            log = state.log
            keys = state.keys
            if log is not None and new:
                for entry in new:  # from now on, entries of an earlier group
                    entry.request = -1
                    entry.distinct_id = key[1]
                    if keys is not None and entry.dedup is not None:
                        keys.add(entry.dedup)
                    insort(log, entry)  # kept in order: a rewrite writes it as it is
            self.saved.append((key, state))
        if self._new:
            raise AssertionError(f"log entries of unsaved profiles: {list(self._new)[:3]}")

    def seal(self) -> None:
        """After the merge: hold every profile of the group, changed or not, as used last."""
        hold = self.held.hold
        for key, state in self.states.items():
            hold(key, state)

    def delta(self) -> OverlayDelta:
        """The states this group changed, for readers once its transaction has committed."""
        return OverlayDelta([(key, s.jid, s.props_json) for key, s in self.saved])

    def flush_counter(self, conn: apsw.Connection) -> None:
        """The arrival counter, as far as this group used it (pipelined merges count in
        memory)."""
        if self._seq_end is not None:
            conn.execute(
                "UPDATE counters SET value = ? WHERE name = 'seq' AND value < ?",
                (self._seq_end, self._seq_end),
            )


def _new_state(row: ProfileRow) -> ProfileState:
    """The state of a profile the file has no row for."""
    return ProfileState(row, None, None, None, None, 0, 0, in_file=False)


def write_rows(conn: apsw.Connection, due: Sequence[tuple[Key, ProfileState]]) -> None:
    """Write these states' rows and log chunks, in the open write transaction, in key order."""
    cleared: list[Key] = []
    spilled: list[tuple[int, str, int, bytes]] = []
    inserts: list[tuple[Any, ...]] = []
    updates: list[tuple[Any, ...]] = []
    for key, state in due:
        if state.cleared:
            cleared.append(key)
        for last_seq, entries in state.spills:
            spilled.append((key[0], key[1], last_seq, entries))
        row = state.row
        values = (
            state.props_json,
            row.last_time,
            state.base_json,
            row.tomb,
            row.log_min,
            row.log_n,
            row.log_floor,
            state.tail,
            state.tail_n,
            state.chunks,
            state.jid,
            key[0],
            key[1],
        )
        (updates if state.in_file else inserts).append(values)
    if cleared:
        conn.executemany("DELETE FROM log_chunks WHERE project_id = ? AND distinct_id = ?", cleared)
    if spilled:
        conn.executemany(
            "INSERT INTO log_chunks (project_id, distinct_id, last_seq, entries) "
            "VALUES (?, ?, ?, ?)",
            spilled,
        )
    if inserts:
        conn.executemany(
            "INSERT INTO profiles (props, last_time, base, tomb, log_min, log_n, log_floor, "
            "tail, tail_n, chunks, jid, project_id, distinct_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            inserts,
        )
    if updates:
        # a plain UPDATE finds each row with one seek
        conn.executemany(
            "UPDATE profiles SET props = ?, last_time = ?, base = ?, tomb = ?, log_min = ?, "
            "log_n = ?, log_floor = ?, tail = ?, tail_n = ?, chunks = ?, jid = ? "
            "WHERE project_id = ? AND distinct_id = ?",
            updates,
        )


def mark_written(held: WriteBack, due: Sequence[tuple[Key, ProfileState]]) -> None:
    """After write_rows: the states match their rows (once the transaction commits)."""
    for key, state in due:
        state.file_chunks = state.chunks
        state.inflight, state.inflight_cleared = state.spills, state.cleared
        state.cleared = False
        state.spills = []
        state.in_file = True
        held.written(key, state)


@dataclass(eq=False)
class Group:
    """One group on its way: merged and written, then committed by the Committer thread."""

    requests: Sequence[Sequence[Update]]
    counts: dict[tuple[str, str], int]
    body: bytes | None = None  # the requests as the journal keeps them (journal.py)
    results: list[Applied] = field(default_factory=list)
    created_ids: dict[str, int] = field(default_factory=dict)
    delta: OverlayDelta = field(default_factory=OverlayDelta)
    # the states whose rows the transaction writes: `writing` until it has committed
    wrote: list[tuple[Key, ProfileState]] = field(default_factory=list)
    epoch: int = 0  # the writer's epoch the group was written in
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
    for _, state in group.wrote:  # committed: other connections see these rows now
        done_writing(state)
    store._write_lock.release()
    try:
        store._sync_wal()
    except BaseException as exc:
        group.error = exc
        store._caught_up = False  # not answered: the states are taken from the file again
    if group.error is None:
        store.overlay.apply(group.delta)
    group.done.set()


def done_writing(state: ProfileState) -> None:
    """The transaction that wrote the state's row has ended."""
    state.writing = False
    state.inflight = []
    state.inflight_cleared = False
