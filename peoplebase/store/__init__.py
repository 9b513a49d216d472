"""Profile stores. `open_store(settings)` picks the backend from the `--db` setting."""

from __future__ import annotations

from .base import ProfileStore, Project, StoreUnavailable
from .sqlite import SqliteStore

__all__ = ["ProfileStore", "Project", "SqliteStore", "StoreUnavailable", "open_store"]


def open_store(db: str, **kwargs: object) -> ProfileStore:
    return SqliteStore(db, **kwargs)  # type: ignore[arg-type]
