"""What the SQLite writer keeps in memory between groups, and when it writes profile rows.

Every profile a group changes becomes a `ProfileState` held here. With `interval` 0 each
group writes the rows it changed in its own transaction (write-through). With an interval,
a group's transaction holds its updates in the `journal` table (one row, appended: a few
pages) and the rows of a slice of the profiles changed earlier (write-behind): the changed
profiles are written in key order, a little with every group, so that each one's row is
written about once per interval however many updates it received, and the pages of the table
are each written about once per interval too. Until a profile's row is written, its state
lives here (and, for readers in the server process, in the overlay), and the journal holds
the updates that made it: a crash loses nothing acknowledged (see SqliteStore.catch_up).

The schedule is a *cycle*: at its start the keys of the changed profiles are taken in key
order; each later group writes the next part of them, as much as the time since the cycle's
start says (all of them once `interval` has passed). When a cycle ends, every update of a
group up to the one that started it is in the rows, so those journal rows are deleted.

Clean states (written, and not changed since) stay as a cache of recent profiles, least
recently used evicted first beyond `max_profiles`; decoded update logs are kept only when
long (`min_log` entries), within `log_budget` entries in all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..merge import Key, LogEntry, ProfileRow
from ..types import Props

DEFAULT_INTERVAL = 0.0  # seconds; the server's setting is `write_behind`
DEFAULT_MAX_PROFILES = 100_000
# Decoded log entries kept, all profiles together (the `log_cache` setting).
DEFAULT_LOG_CACHE = 100_000
# Shorter logs are not kept decoded: they are read again at little cost. From this length on a
# late update replays through the log's index by property (merge.TOUCHED_REPLAY_MIN), which
# lives with the decoded log; keeping these logs cost 3.5% fewer instructions per record on
# the storage floor than keeping only those of 1,000 entries or more (BENCHMARKS.md).
LOG_CACHE_MIN = 16


@dataclass(slots=True, eq=False)
class ProfileState:
    """A profile as the writer holds it: its merge state and its row as it is to be written."""

    row: ProfileRow  # what the merger works on (props, times, log bounds)
    props_json: str | None  # row.props encoded: the `props` column
    base_json: str | None  # the `base` column
    base_src: Props | None  # the row.base that base_json encodes (re-encoded once replaced)
    tail: bytes | None  # the `tail` column: the newest log entries, a JSON array
    tail_n: int
    file_chunks: int  # log chunk rows the file holds for it (as of its last written row)
    in_file: bool  # the file holds its row (UPDATE), else INSERT
    jid: int = 0  # the group (journal id) whose updates it holds last
    dirty: bool = False  # changed since its row was written
    cleared: bool = False  # the file's chunks are deleted when the row is written
    spills: list[tuple[int, bytes]] = field(default_factory=list)  # chunks to insert then
    # The row is written in a transaction that has not committed yet (not evicted till then),
    # with these chunks inserted (and the older ones deleted): a merge that reads the file
    # outside that transaction may or may not see them, so it takes them from here.
    writing: bool = False
    inflight: list[tuple[int, bytes]] = field(default_factory=list)
    inflight_cleared: bool = False
    log: list[LogEntry] | None = None  # the whole log, decoded, when a group read it
    keys: set[int] | None = None  # its retry keys, once a retry check asked for them

    @property
    def chunks(self) -> int:
        """The `chunks` column: the log's chunk rows once this row is written."""
        return (0 if self.cleared else self.file_chunks) + len(self.spills)


class WriteBack:
    """The held profile states (least recently used first) and the row-writing schedule."""

    def __init__(
        self,
        interval: float = DEFAULT_INTERVAL,
        max_profiles: int = DEFAULT_MAX_PROFILES,
        log_budget: int = DEFAULT_LOG_CACHE,
        min_log: int = LOG_CACHE_MIN,
    ) -> None:
        if interval < 0:
            raise ValueError("write_behind must be 0 (write-through) or more seconds")
        if log_budget < 0:
            raise ValueError("the log cache size must be 0 (off) or more")
        self.interval = interval
        self.max_profiles = max_profiles
        self.log_budget = log_budget
        self.min_log = min_log
        self.states: dict[Key, ProfileState] = {}
        self.changed: set[Key] = set()  # the keys of the dirty states
        # Bumped whenever the states are dropped: a merge made on the old ones is void.
        self.epoch = 0
        self._logs: dict[Key, int] = {}  # states holding a decoded log: its length (LRU)
        self.log_entries = 0
        self._cycle: list[Key] = []
        self._pos = 0
        self._cycle_start = 0.0
        self._cycle_jid = 0  # the group whose transaction started the cycle
        self.log_hits = 0  # decoded logs a group found here instead of reading them

    def __len__(self) -> int:
        return len(self.states)

    def get(self, key: Key) -> ProfileState | None:
        return self.states.get(key)

    def hold(self, key: Key, state: ProfileState) -> None:
        """Hold a state, as the most recently used; its decoded log too, if long enough."""
        states = self.states
        states.pop(key, None)
        states[key] = state
        if state.dirty:
            self.changed.add(key)
        log = state.log
        old = self._logs.pop(key, None)
        if old is not None:
            self.log_entries -= old
        if log is None:
            return
        if len(log) < self.min_log or len(log) > self.log_budget // 4:
            _forget_log(state)  # cheap to read again, or too big to keep
            return
        self._logs[key] = len(log)
        self.log_entries += len(log)

    def written(self, key: Key, state: ProfileState) -> None:
        """The state's row is written (in a transaction that may not have committed yet)."""
        state.dirty = False
        state.writing = True
        self.changed.discard(key)

    def has_dirty(self) -> bool:
        return bool(self.changed)

    def drop(self) -> None:
        """Forget every state (the file and the journal are what is true now)."""
        self.states = {}
        self.changed = set()
        self._logs = {}
        self.log_entries = 0
        self._cycle = []
        self._pos = 0
        self.epoch += 1

    def drop_clean(self) -> None:
        """Forget the states whose rows are written (another connection may have changed
        those rows); the changed ones stay, since no writer touches their rows without first
        replaying the journal that holds their updates."""
        kept = {k: s for k, s in self.states.items() if s.dirty}
        self.states = kept
        for key in [k for k in self._logs if k not in kept]:
            self.log_entries -= self._logs.pop(key)
        self.epoch += 1

    def due(self, now: float, jid: int) -> tuple[list[tuple[Key, ProfileState]], int | None]:
        """The states whose rows the transaction of group `jid` writes, in key order, and the
        newest journal row those writes make unneeded (None: none yet).

        Write-through (interval 0): every changed state. Otherwise the next part of the
        current cycle, starting a new cycle when the last one has ended.
        """
        if self.interval <= 0:
            return self.everything(), None
        trim = None
        if self._pos >= len(self._cycle):
            self._cycle = sorted(self.changed)
            self._pos = 0
            self._cycle_start = now
            self._cycle_jid = jid
            if not self._cycle:
                return [], None
        cycle = self._cycle
        share = (now - self._cycle_start) / self.interval
        if len(self.states) > self.max_profiles:
            share = 1.0  # over budget: write the rest of the cycle now, so states can go
        end = max(self._pos, math.floor(len(cycle) * min(1.0, share)))
        states = self.states
        changed = self.changed
        out = [(key, states[key]) for key in cycle[self._pos : end] if key in changed]
        self._pos = end
        if end >= len(cycle):
            trim = self._cycle_jid  # every update of that group and older is in the rows now
            self._cycle = []
            self._pos = 0
        return out, trim

    def everything(self) -> list[tuple[Key, ProfileState]]:
        """Every changed state, in key order (and the current cycle is over)."""
        self._cycle = []
        self._pos = 0
        states = self.states
        return [(key, states[key]) for key in sorted(self.changed)]

    def evict(self) -> None:
        """Keep within the budgets: clean states beyond `max_profiles` go, least recently
        used first, and the least recently used decoded logs beyond `log_budget` entries are
        dropped (the file holds them). Called with no row write in flight."""
        states = self.states
        excess = len(states) - self.max_profiles
        if excess > 0:
            gone = []
            for key, state in states.items():
                if not state.dirty and not state.writing:
                    gone.append(key)
                    if len(gone) >= excess:
                        break
            for key in gone:
                del states[key]
                n = self._logs.pop(key, None)
                if n is not None:
                    self.log_entries -= n
        logs = self._logs
        while self.log_entries > self.log_budget and logs:
            key = next(iter(logs))
            self.log_entries -= logs.pop(key)
            kept = states.get(key)
            if kept is not None:
                _forget_log(kept)


def _forget_log(state: ProfileState) -> None:
    """Drop a state's decoded log, and the index the merger built of it."""
    state.log = state.keys = None
    state.row.log_index = None
