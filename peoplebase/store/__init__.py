"""Profile stores. `open_store(settings)` picks the backend from the `--db` setting."""

from __future__ import annotations

from .base import ProfileStore, Project, StoreUnavailable
from .sqlite import SqliteStore

__all__ = ["ProfileStore", "Project", "SqliteStore", "StoreUnavailable", "open_store"]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(db: str) -> bool:
    return db.startswith(POSTGRES_SCHEMES)


def open_store(db: str, **kwargs: object) -> ProfileStore:
    """A PostgresStore for postgresql:// (or postgres://) URLs, else a SqliteStore on that path."""
    if is_postgres_url(db):
        from .postgres import PostgresStore

        # several nodes may write one database: each merge reads the rows it changes
        for sqlite_only in ("log_cache", "write_behind", "held_profiles"):
            kwargs.pop(sqlite_only, None)
        return PostgresStore(db, **kwargs)  # type: ignore[arg-type]
    return SqliteStore(db, **kwargs)  # type: ignore[arg-type]
