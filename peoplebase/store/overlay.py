"""Acknowledged profile states whose rows the SQLite file does not hold yet (write-behind).

With `write_behind`, a group's transaction makes its updates durable in the journal and writes
the profile rows later (writeback.py). A reader must still see every acknowledged update, so
the writer hands each committed group's changed profiles (their props as JSON) to the
readers' overlay before the group is answered, and tells it which rows it has since written:
those entries are dropped, and the file answers for them again. A single-profile read looks
here first; reads that scan the table ask the writer to write every row first (the store's
`fresh`).

Deltas are applied one at a time, in commit order (the writer process's answers are read in
order, and each one's delta is applied before the next is read); readers on other threads
only look up.
"""

from __future__ import annotations

from .sqlite_write import OverlayDelta

Key = tuple[int, str]


class Overlay:
    def __init__(self) -> None:
        # key -> (journal id of the state, props JSON or None when there is no profile)
        self._entries: dict[Key, tuple[int, str | None]] = {}
        # Off in the writer process: its changes are read in the server process's overlay.
        self.enabled = True

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def get(self, key: Key) -> tuple[int, str | None] | None:
        return self._entries.get(key)

    def apply(self, delta: OverlayDelta | None) -> None:
        """Take in what a committed transaction changed (in commit order)."""
        if not delta or not self.enabled:
            return
        entries = self._entries
        if delta.reset:
            entries.clear()
        for key, jid, props in delta.changed:
            entries[key] = (jid, props)
        for key, jid in delta.written:
            held = entries.get(key)
            if held is not None and held[0] <= jid:
                del entries[key]

    def clear(self) -> None:
        self._entries.clear()
