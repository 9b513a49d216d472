"""Ordering: the stored profile is the fold of its accepted updates sorted by ($time, arrival).

(SPEC §4.) Each profile keeps a materialized state, an append-only log of the updates within
the reorder window, a base snapshot the log starts from, and a tombstone time. An update in
`$time` order is applied directly; a late one is inserted into the log and the profile is
replayed from the base; one older than the window is applied on top and recorded at the
newest time. A `$delete` purges the log up to its time and leaves a tombstone.

The merger works on any `MergeBackend`: the SQLite and PostgreSQL stores implement the few
primitives it needs inside their write transaction, and `MemoryBackend` is the reference.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from . import replay
from .logindex import LOG_ORDER, LogIndex, insort
from .ops import apply_update
from .types import Applied, Props, Skip, Update

Key = tuple[int, str]  # (project id, distinct_id)
NEVER = -math.inf
# Entries a profile's log may hold (0: no limit, the reorder window alone bounds the log). A
# late update replays the log, so a limit bounds the work one update can cause, at the price of
# the ordering guarantee for updates older than the cut (docs/ordering.md, "How long the log is").
DEFAULT_MAX_LOG_ENTRIES = 0
# From this many log entries a late update replays only the properties it touches, through the
# log's index (replay.refold); below it, indexing the log costs more than folding it
# whole (the two cost the same at about 8 entries of the benchmark workload's updates).
TOUCHED_REPLAY_MIN = 16


@dataclass(slots=True)
class ProfileRow:
    props: Props | None = None  # materialized profile; None = does not exist
    last_time: float = NEVER  # newest recorded $time applied
    base: Props | None = None  # state before the oldest log entry
    tomb: float | None = None  # time of the newest $delete
    log_min: float | None = None  # time of the oldest log entry; None = empty log
    log_n: int = 0  # entries in the log
    # Updates older than this can no longer be put in order: the log was cut at this time to
    # stay within max_log_entries (None: never cut, only the reorder window applies)
    log_floor: float | None = None
    dirty: bool = False
    # SQLite: the journal id of the group whose updates the stored row holds last (a replay of
    # the journal skips what the row has already)
    jid: int = 0
    # The profile's log indexed by property (logindex.py), once a late update on a long log
    # needed it. Not stored: it lives as long as this object, which a backend that keeps rows
    # in memory (the SQLite log cache) hands back with the same log entries. The merger uses
    # it only if it holds exactly the entries of the log read.
    log_index: LogIndex | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class LogEntry:
    """One update in a profile's log. An entry read from storage keeps its stored `body` and
    makes the `Update` only when something needs it: a replay of the properties a late update
    touches reads just the operations of most entries."""

    time: float
    seq: int
    decoded: Update | None  # None: not made from `body` yet
    dedup: int | None = None
    request: int = -1  # request number within the group; -1 = from an earlier group
    body: dict[str, Any] | None = None  # the stored form (update_body)
    distinct_id: str = ""
    received: float = 0.0
    # what replays read of every entry, as plain attributes (read many times per entry)
    ops: dict[str, Any] = field(init=False)
    ignore_time: bool = field(init=False)
    geo: Props | None = field(init=False)

    def __post_init__(self) -> None:
        decoded = self.decoded
        if decoded is not None:
            self.ops, self.ignore_time, self.geo = decoded.ops, decoded.ignore_time, decoded.geo
        else:
            body = self.body
            assert body is not None
            self.ops, self.ignore_time, self.geo = body["o"], bool(body.get("i")), body.get("g")

    @property
    def update(self) -> Update:
        if self.decoded is None:
            assert self.body is not None
            self.decoded = update_from_body(self.body, self.time, self.distinct_id, self.received)
        return self.decoded

    def stored_body(self) -> dict[str, Any]:
        return self.body if self.decoded is None else update_body(self.decoded)  # type: ignore[return-value]

    def received_at(self) -> float:
        return self.received if self.decoded is None else self.decoded.received


def update_body(update: Update) -> dict[str, Any]:
    """What the log keeps of an update besides its time: operations, $ignore_time, geo."""
    body: dict[str, Any] = {"o": update.ops}
    if update.ignore_time:
        body["i"] = 1
    if update.geo:
        body["g"] = update.geo
    return body


def encode_update(update: Update) -> bytes:
    return orjson.dumps(update_body(update))


def update_from_body(
    body: dict[str, Any], time: float, distinct_id: str = "", received: float = 0.0
) -> Update:
    return Update(
        index=0,
        token="",
        distinct_id=distinct_id,
        time=time,
        explicit_time=False,
        ignore_time=bool(body.get("i")),
        ops=body["o"],
        received=received,
        geo=body.get("g"),
    )


def decode_update(body: bytes | str, time: float, distinct_id: str = "") -> Update:
    return update_from_body(orjson.loads(body), time, distinct_id)


class MergeBackend(Protocol):
    """The storage primitives the merger needs, all inside one write transaction."""

    def project_ids(self, tokens: Iterable[str], create: bool) -> dict[str, int]: ...

    def next_seq(self, count: int) -> int: ...

    def load_profiles(self, keys: Sequence[Key]) -> dict[Key, ProfileRow]: ...

    def load_log(self, key: Key) -> list[LogEntry]:
        """The profile's stored log, preferably in ($time, seq) order (the merger sorts it
        once, which costs little then, and checks the row's `log_index` against a log in order
        without sorting it). Not changed by the merger."""
        ...

    def has_retry_key(self, key: Key, dedup: int) -> bool:
        """Whether the profile's stored log holds an entry with this dedup key (a retry check
        that makes no updates of the stored entries)."""
        ...

    def delete_log(self, key: Key, before: float) -> None:
        """Delete the profile's log entries with time < before."""
        ...

    def insert_log(self, key: Key, entries: Sequence[LogEntry]) -> None: ...

    def save_profiles(self, rows: Sequence[tuple[Key, ProfileRow]]) -> None: ...


def fold(
    base: Props | None,
    entries: Iterable[LogEntry],
    max_properties: int,
    watch: dict[int, list[Skip]] | None = None,
) -> Props | None:
    """Replay log entries in (time, seq) order on top of a base state.

    `watch` maps the seqs of entries whose skipped keys are wanted to the lists to fill.
    """
    props = dict(base) if base is not None else None
    for entry in sorted(entries, key=LOG_ORDER):
        props = apply_update(  # the entry holds what is applied: no Update is made of it
            props,
            entry,
            max_properties,
            watch.get(entry.seq) if watch else None,
            in_place=props is not None,
        )
    return props


@dataclass(slots=True)
class Loaded:
    """A group's updates by profile, the first arrival number, and the profiles' rows."""

    grouped: dict[Key, list[tuple[int, Update]]]
    seq: int
    rows: dict[Key, ProfileRow]


@dataclass(slots=True)
class _Profile:
    key: Key
    row: ProfileRow
    log: list[LogEntry] | None = None  # loaded log + new entries in LOG_ORDER, once needed
    new: list[LogEntry] = field(default_factory=list)
    purge_before: float | None = None  # delete stored log entries with time < this
    compact_before: float | None = None  # delete stored log entries with time < this
    # After a late update the state is refolded from the log once, when the profile's updates
    # of this group are all in the log (not once per late update). Until then the state is
    # stale, and the updates whose skipped keys that fold must report wait here:
    # seq -> (their log entry, their request's result, their index in the request).
    waiting: dict[int, tuple[LogEntry, Applied, int]] = field(default_factory=dict)

    @property
    def stale(self) -> bool:
        return bool(self.waiting)


class Merger:
    def __init__(
        self,
        reorder_window: float = 7 * 86400.0,
        max_properties: int = 2000,
        open_tokens: bool = True,
        max_log_entries: int = DEFAULT_MAX_LOG_ENTRIES,
    ) -> None:
        self.window = reorder_window
        self.max_properties = max_properties
        self.open_tokens = open_tokens
        # 0: no limit. Otherwise a log longer than this is cut to 3/4 of it (hysteresis).
        if max_log_entries < 0:
            raise ValueError("max_log_entries must be 0 (no limit) or more")
        self.max_log_entries = max_log_entries

    def apply(
        self,
        backend: MergeBackend,
        requests: Sequence[Sequence[Update]],
        loaded: Loaded | None = None,
        replay: int | None = None,
    ) -> list[Applied]:
        """Merge the updates of several requests (in arrival order) in one transaction.

        `loaded` is what `load` returned for these requests on this backend, when the store
        read the profiles beforehand. `replay`: the group is a journal row merged again after
        a restart (the journal id); profiles whose row holds that group already are skipped.
        """
        if loaded is None:
            loaded = self.load(backend, requests)
        results = [Applied() for _ in requests]
        if not loaded.grouped:
            return results
        seq = loaded.seq
        rows = loaded.rows
        touched: list[_Profile] = []
        for key, items in loaded.grouped.items():
            row = rows.get(key)
            if replay is not None and row is not None and row.jid >= replay:
                seq += len(items)  # the arrival numbers stay those of the first merge
                continue
            prof = _Profile(key, row or ProfileRow())
            for r, u in items:
                self._one(backend, prof, r, u, seq, results[r])
                seq += 1
            if prof.stale:
                self._refold(backend, prof)
            self._maybe_compact(backend, prof)
            touched.append(prof)
        self._write(backend, touched)
        return results

    def load(self, backend: MergeBackend, requests: Sequence[Sequence[Update]]) -> Loaded:
        """The first step of `apply`: project ids, updates by profile, arrival numbers, rows."""
        tokens = {u.token for updates in requests for u in updates}
        pids = backend.project_ids(tokens, create=self.open_tokens)
        grouped: dict[Key, list[tuple[int, Update]]] = {}
        count = 0
        for r, updates in enumerate(requests):
            for u in updates:
                pid = pids.get(u.token)
                if pid is None:
                    continue
                grouped.setdefault((pid, u.distinct_id), []).append((r, u))
                count += 1
        if not grouped:
            return Loaded({}, 0, {})
        seq = backend.next_seq(count)
        return Loaded(grouped, seq, backend.load_profiles(list(grouped)))

    def logs_wanted(self, loaded: Loaded) -> list[Key]:
        """The profiles whose stored log `apply` may read: each update that is not newer than
        everything before it (late, a possible retry), a $delete, a clamped time, compaction
        or a log over its limit. A superset: the others' logs are not read."""
        out = []
        window = self.window
        limit = self.max_log_entries
        for key, items in loaded.grouped.items():
            row = loaded.rows.get(key)
            if row is None or row.log_min is None:
                continue  # no stored log
            newest = row.last_time
            wanted = bool(limit) and row.log_n + len(items) > limit
            for _, u in items:
                if wanted or u.time <= newest or u.clamped or "$delete" in u.ops:
                    wanted = True
                    break
                newest = u.time
            if wanted or row.log_min < newest - 1.5 * window:
                out.append(key)
        return out

    # --- one update ------------------------------------------------------------------------

    def _log(self, backend: MergeBackend, prof: _Profile) -> list[LogEntry]:
        if prof.log is None:
            row = prof.row
            stored = backend.load_log(prof.key) if row.log_min is not None else []
            if prof.purge_before is not None:
                stored = [e for e in stored if e.time >= prof.purge_before]
            index = row.log_index
            if index is not None and index.holds(stored, prof.new):
                # a stored log in order, and this group's entries (in order) after it: the
                # index's own list, without sorting
                prof.log = index.entries
                return prof.log
            log = [*stored, *prof.new]
            log.sort(key=LOG_ORDER)  # once: entries added later are put in their place
            if index is not None and index.holds(log):
                log = index.entries
            else:
                row.log_index = None  # not of these entries (the log was read anew, or changed)
            prof.log = log
        return prof.log

    def _append(self, prof: _Profile, entry: LogEntry) -> None:
        prof.new.append(entry)
        row = prof.row
        if row.log_index is not None:
            row.log_index.add(entry)  # its entries are the log, if loaded
        elif prof.log is not None:
            insort(prof.log, entry)
        row.log_min = entry.time if row.log_min is None else min(row.log_min, entry.time)
        row.log_n += 1

    def _one(
        self, backend: MergeBackend, prof: _Profile, r: int, u: Update, seq: int, result: Applied
    ) -> None:
        row = prof.row
        t = u.time
        # Deletion is final for the past (SPEC §4): an update that arrives after the delete with
        # a $time not later than the delete's is dropped, one with exactly its $time included.
        if row.tomb is not None and t <= row.tomb:
            result.dropped += 1
            return
        # A retry repeats an accepted record, so its $time is not newer than the profile's
        # newest, unless it was clamped from the future: then its time moved on with the clock.
        maybe_retry = t <= row.last_time or u.clamped
        if u.dedup is not None and maybe_retry and self._is_retry(backend, prof, r, u):
            result.dropped += 1
            return
        beyond = (row.last_time != NEVER and t < row.last_time - self.window) or (
            row.log_floor is not None and t < row.log_floor
        )
        if beyond:
            t = row.last_time
            result.beyond_window += 1
        row.dirty = True
        if "$delete" in u.ops:  # u.is_delete, without a call
            u.time = t
            self._delete(backend, prof, LogEntry(t, seq, u, u.dedup, r))
            return
        entry = LogEntry(t, seq, u, u.dedup, r)
        if t >= row.last_time and not prof.stale:
            u.time = t
            skips: list[Skip] = []
            row.props = apply_update(row.props, u, self.max_properties, skips, True)  # in place
            self._append(prof, entry)
            row.last_time = t
            if skips:
                result.skips.setdefault(u.index, []).extend(skips)
            return
        if t >= row.last_time:
            u.time = t
            row.last_time = t
        else:
            self._log(backend, prof)
            result.late += 1
        self._append(prof, entry)
        prof.waiting[seq] = (entry, result, u.index)

    def _refold(self, backend: MergeBackend, prof: _Profile) -> None:
        watch: dict[int, list[Skip]] = {seq: [] for seq in prof.waiting}
        row = prof.row
        log = self._log(backend, prof)
        props = None
        if row.props is not None and len(log) >= TOUCHED_REPLAY_MIN:
            if row.log_index is None:
                row.log_index = LogIndex(log)  # kept up to date from now on (_append)
            late = [entry for entry, _, _ in prof.waiting.values()]
            props = replay.refold(
                row.props, row.base, row.log_index, late, self.max_properties, watch
            )
        row.props = props if props is not None else fold(row.base, log, self.max_properties, watch)
        for seq, (_, result, index) in prof.waiting.items():
            if watch[seq]:
                result.skips.setdefault(index, []).extend(watch[seq])
        prof.waiting = {}

    def _is_retry(self, backend: MergeBackend, prof: _Profile, r: int, u: Update) -> bool:
        dedup = u.dedup
        assert dedup is not None
        if prof.log is not None:
            entries: Iterable[LogEntry] = prof.log
        else:
            # the stored log is only asked: an update that turns out older than the window or
            # the log's cut is then applied without making updates of the log. (A $delete of
            # this group loads the log first, so nothing of the stored log is purged yet.)
            assert prof.purge_before is None
            if prof.row.log_min is not None and backend.has_retry_key(prof.key, dedup):
                return True
            entries = prof.new
        return any(e.dedup == dedup and e.request != r for e in entries)

    def _delete(self, backend: MergeBackend, prof: _Profile, entry: LogEntry) -> None:
        """Purge the log before the delete's time and log the delete itself.

        Entries at exactly its time stay in the log, under it (they arrived earlier, so every
        replay applies the delete after them), and so does the delete. What arrives after it
        with that time is dropped by the tombstone (SPEC §4).
        """
        row = prof.row
        t = entry.time
        if prof.stale:
            self._refold(backend, prof)  # skips of the updates the delete may purge
        log = self._log(backend, prof)
        prof.log = [e for e in log if e.time >= t]
        row.log_index = None  # built again for the next late update that needs it
        prof.new = [e for e in prof.new if e.time >= t]
        prof.purge_before = t if prof.purge_before is None else max(prof.purge_before, t)
        row.tomb = t
        row.base = None
        row.log_n = len(prof.log)
        self._append(prof, entry)
        row.props = fold(None, prof.log, self.max_properties)
        row.log_min = min(e.time for e in prof.log)
        row.last_time = max(row.last_time, t)

    def _maybe_compact(self, backend: MergeBackend, prof: _Profile) -> None:
        """Fold log entries into the base: those older than the window, and the oldest of a log
        longer than max_log_entries (both with hysteresis)."""
        row = prof.row
        if row.log_min is not None and row.log_min < row.last_time - 1.5 * self.window:
            self._fold_before(backend, prof, row.last_time - self.window)
        limit = self.max_log_entries
        if limit and row.log_n > limit:
            times = [e.time for e in self._log(backend, prof)]
            keep = max(1, limit * 3 // 4)
            if len(times) <= keep:  # the count was off (it is exact from here on)
                row.log_n = len(times)
                row.dirty = True
                return
            # keep the newest 3/4 of the limit; entries sharing the cut's $time stay with it,
            # unless there are so many of them that the log would stay over the limit: then they
            # go too, and the cut lies just after their $time
            cutoff = times[len(times) - keep]
            if len(times) - bisect.bisect_left(times, cutoff) > limit:
                after = bisect.bisect_right(times, cutoff)
                cutoff = times[after] if after < len(times) else math.nextafter(cutoff, math.inf)
            self._fold_before(backend, prof, cutoff)
            # an update older than the cut can no longer be put in its place
            row.log_floor = cutoff if row.log_floor is None else max(row.log_floor, cutoff)

    def _fold_before(self, backend: MergeBackend, prof: _Profile, cutoff: float) -> None:
        row = prof.row
        log = self._log(backend, prof)
        old = [e for e in log if e.time < cutoff]
        row.base = fold(row.base, old, self.max_properties)
        prof.log = [e for e in log if e.time >= cutoff]
        row.log_index = None  # built again for the next late update that needs it
        prof.new = [e for e in prof.new if e.time >= cutoff]
        prof.compact_before = (
            cutoff if prof.compact_before is None else max(prof.compact_before, cutoff)
        )
        row.log_min = min((e.time for e in prof.log), default=None)
        row.log_n = len(prof.log)
        row.dirty = True

    def _write(self, backend: MergeBackend, touched: list[_Profile]) -> None:
        for prof in touched:
            if prof.purge_before is not None:
                backend.delete_log(prof.key, prof.purge_before)
            if prof.compact_before is not None:
                backend.delete_log(prof.key, prof.compact_before)
            if prof.new:
                backend.insert_log(prof.key, prof.new)
        backend.save_profiles([(p.key, p.row) for p in touched if p.row.dirty])


class MemoryBackend:
    """The reference backend: plain dicts, no durability. Used by tests and as a model."""

    def __init__(self) -> None:
        self.projects: dict[str, int] = {}
        self.rows: dict[Key, ProfileRow] = {}
        self.logs: dict[Key, list[tuple[float, int, bytes, int | None]]] = {}
        self.seq = 0

    def project_ids(self, tokens: Iterable[str], create: bool) -> dict[str, int]:
        out = {}
        for token in tokens:
            if token not in self.projects and create:
                self.projects[token] = len(self.projects) + 1
            if token in self.projects:
                out[token] = self.projects[token]
        return out

    def next_seq(self, count: int) -> int:
        start = self.seq + 1
        self.seq += count
        return start

    def load_profiles(self, keys: Sequence[Key]) -> dict[Key, ProfileRow]:
        out = {}
        for key in keys:
            row = self.rows.get(key)
            if row is not None:
                out[key] = ProfileRow(
                    props=orjson.loads(orjson.dumps(row.props)) if row.props is not None else None,
                    last_time=row.last_time,
                    base=orjson.loads(orjson.dumps(row.base)) if row.base is not None else None,
                    tomb=row.tomb,
                    log_min=row.log_min,
                    log_n=row.log_n,
                    log_floor=row.log_floor,
                )
        return out

    def load_log(self, key: Key) -> list[LogEntry]:
        return [
            LogEntry(t, s, None, d, body=orjson.loads(body), distinct_id=key[1])
            for t, s, body, d in sorted(self.logs.get(key, []), key=lambda e: (e[0], e[1]))
        ]

    def has_retry_key(self, key: Key, dedup: int) -> bool:
        return any(e[3] == dedup for e in self.logs.get(key, []))

    def delete_log(self, key: Key, before: float) -> None:
        entries = self.logs.get(key, [])
        self.logs[key] = [e for e in entries if e[0] >= before]

    def insert_log(self, key: Key, entries: Sequence[LogEntry]) -> None:
        self.logs.setdefault(key, []).extend(
            (e.time, e.seq, encode_update(e.update), e.dedup) for e in entries
        )

    def save_profiles(self, rows: Sequence[tuple[Key, ProfileRow]]) -> None:
        for key, row in rows:
            self.rows[key] = ProfileRow(
                props=orjson.loads(orjson.dumps(row.props)) if row.props is not None else None,
                last_time=row.last_time,
                base=orjson.loads(orjson.dumps(row.base)) if row.base is not None else None,
                tomb=row.tomb,
                log_min=row.log_min,
                log_n=row.log_n,
                log_floor=row.log_floor,
            )

    def profile(self, token: str, distinct_id: str) -> Props | None:
        pid = self.projects.get(token)
        row = self.rows.get((pid, distinct_id)) if pid is not None else None
        return row.props if row is not None else None
