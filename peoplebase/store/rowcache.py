"""The writer's cache of busy profiles' decoded update logs (SQLite).

A late update (or a possible retry) on a profile makes the writer read the profile's whole
stored log (the `log_chunks` rows and the row's tail), decode its JSON and replay it. A busy
profile receives late updates in group after group, and reading and decoding its log again
each time was most of what a late update cost on a log of thousands of entries. The cache
keeps, for the profiles whose long log a group had to read, the committed row and that log
decoded, so the next group takes both from memory.

Only logs of at least `LOG_CACHE_MIN` entries are kept: a short log costs little to read.
Caching every written row was measured slower than reading it again (BENCHMARKS.md): every
cached object made the interpreter's full garbage collections longer, which is also why the
writer process freezes what survives each group (writeproc.Collector).

The cache holds committed state only. A group takes a profile's entry out when it loads the
profile and puts the new state back after its COMMIT, so a failed group leaves nothing of
itself behind (the writer clears the cache then too). Another connection that commits to the
file (a second server, a CLI command) changes `PRAGMA data_version`, which the writer checks at
the start of every group: the cache is cleared then.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..merge import Key, LogEntry, ProfileRow

DEFAULT_LOG_CACHE = 100_000  # decoded log entries, all profiles together
# Shorter logs are not kept: they cost a few milliseconds to read and decode, and keeping the
# many logs of a few hundred entries a skewed workload has made the cache evict and re-read all
# the time (the soak was 5% slower with logs from 64 entries on; BENCHMARKS.md).
LOG_CACHE_MIN = 1_000


@dataclass(slots=True)
class Cached:
    row: ProfileRow
    tail: bytes | None  # the row's `tail` column
    tail_n: int
    chunks: int
    log: list[LogEntry]  # the whole stored log, decoded, in ($time, seq) order
    keys: set[int] | None = None  # its retry keys, once a possible retry asked for them


class RowCache:
    """Committed rows and decoded logs of busy profiles, least recently used evicted first."""

    def __init__(self, log_entries: int = DEFAULT_LOG_CACHE, min_log: int = LOG_CACHE_MIN):
        if log_entries < 0:
            raise ValueError("the log cache size must be 0 (off) or more")
        self.budget = log_entries
        self.min_log = min_log
        self._entries: dict[Key, Cached] = {}
        self._held = 0  # decoded log entries held
        self.version: int | None = None  # PRAGMA data_version the entries belong to
        self.hits = 0  # logs taken from the cache

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def log_entries(self) -> int:
        return self._held

    def check(self, version: int) -> None:
        """Forget everything if another connection committed since the last group."""
        if version != self.version:
            self.clear()
            self.version = version

    def clear(self) -> None:
        self._entries.clear()
        self._held = 0

    def take(self, key: Key) -> Cached | None:
        """Remove and return a profile's entry (put back after the group commits)."""
        if not self._entries:
            return None
        found = self._entries.pop(key, None)
        if found is not None:
            self.hits += 1
            self._held -= len(found.log)
        return found

    def put(self, key: Key, cached: Cached) -> None:
        """Keep a profile's committed state, if its log is long enough and not too long."""
        old = self._entries.pop(key, None)
        if old is not None:
            self._held -= len(old.log)
        if not self.min_log <= len(cached.log) <= self.budget // 4:
            return
        entries = self._entries
        entries[key] = cached
        self._held += len(cached.log)
        while self._held > self.budget:
            gone = entries.pop(next(iter(entries)))
            self._held -= len(gone.log)
