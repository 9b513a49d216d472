"""What every profile store offers, and the errors it raises.

StoreError
├── StoreUnavailable   storage cannot take writes now (disk full, read-only, locked): 503
├── UnknownProject     a token or id names no project
├── QueryTimeout       a read query ran past its time limit
└── SessionExpired     a query session is unknown, expired or of another project
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..types import Applied, Props, Update

if TYPE_CHECKING:
    from ..query.where import Node


class StoreError(Exception):
    pass


class StoreUnavailable(StoreError):
    """Storage cannot commit now; nothing of the failed transaction was kept."""


class UnknownProject(StoreError):
    pass


@dataclass(frozen=True)
class Project:
    id: int
    token: str
    name: str
    created_at: float

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "token": self.token,
            "name": self.name,
            "created_at": self.created_at,
        }


def new_secret() -> str:
    return secrets.token_hex(16)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


class QueryTimeout(StoreError):
    """A read query ran longer than its time limit and was stopped."""


class SessionExpired(StoreError):
    """A query session is unknown, expired, or belongs to another project."""


@dataclass(frozen=True)
class ServiceAccount:
    """A read-API identity (user name + secret) scoped to some projects."""

    id: int
    username: str
    name: str
    project_ids: tuple[int, ...]
    created_at: float

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "username": self.username,
            "name": self.name,
            "project_ids": list(self.project_ids),
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class QuerySession:
    """The frozen answer of one query: `total` distinct_ids, read page by page."""

    id: str
    project_id: int
    total: int
    expires_at: float


def outcome_counts(
    requests: Sequence[Sequence[Update]],
    results: Sequence[Applied],
    extra: dict[tuple[str, str], int] | None = None,
) -> dict[tuple[str, str], int]:
    """Per-token counts of accepted, late, beyond-window and dropped records."""
    counts = dict(extra or {})
    for updates, applied in zip(requests, results, strict=True):
        if not updates:
            continue
        token = updates[0].token
        if all(u.token == token for u in updates):
            pairs = [(token, "accepted", len(updates))]
        else:
            per: dict[str, int] = {}
            for u in updates:
                per[u.token] = per.get(u.token, 0) + 1
            pairs = [(t, "accepted", n) for t, n in per.items()]
        for name, n in (
            ("late", applied.late),
            ("beyond window", applied.beyond_window),
            ("dropped", applied.dropped),
        ):
            if n:
                pairs.append((token, name, n))
        for t, name, n in pairs:
            counts[(t, name)] = counts.get((t, name), 0) + n
    return counts


def new_service_account_credentials(name: str) -> tuple[str, str]:
    """(user name, secret) for a new service account; the name is readable, the rest random."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "account"
    return f"{slug}.{secrets.token_hex(4)}.pb-service-account", secrets.token_urlsafe(24)


def browse_query(
    placeholder: str,
    props_column: str,
    search_sql: str,
    project_id: int,
    search: str | None,
    where: tuple[str, Sequence[Any]] | None,
    after: str | None,
    limit: int,
) -> tuple[str, list[Any]]:
    """The web page's keyset read, for either backend.

    `search_sql` matches a distinct_id prefix (two placeholders: from, to) or `$email`/`$name`
    (two more), spelled in the backend's dialect; `where` is already compiled.
    """
    p = placeholder
    clauses = [f"project_id = {p}", "props IS NOT NULL"]
    args: list[Any] = [project_id]
    if after is not None:
        clauses.append(f"distinct_id > {p}")
        args.append(after)
    if search:
        clauses.append(search_sql)
        args += [search, search + "\U0010ffff", search, search]
    if where is not None:
        clauses.append(where[0])
        args += list(where[1])
    sql = (
        f"SELECT distinct_id, {props_column} FROM profiles WHERE "  # noqa: S608 - fixed fragments
        + " AND ".join(clauses)
        + f" ORDER BY distinct_id LIMIT {p}"
    )
    args.append(limit)
    return sql, args


class ProfileStore(Protocol):
    """A durable profile store. `write_group` runs on the single writer thread."""

    def open(self) -> None: ...

    def close(self) -> None: ...

    def write_group(
        self, requests: Sequence[Sequence[Update]], counts: dict[tuple[str, str], int] | None = None
    ) -> list[Applied]: ...

    # projects
    def create_project(self, token: str, name: str = "") -> tuple[Project, str]: ...

    def rotate_secret(self, token: str) -> tuple[Project, str]: ...

    def list_projects(self) -> list[Project]: ...

    def project_by_token(self, token: str) -> Project | None: ...

    def project_by_id(self, project_id: int) -> Project | None: ...

    def project_by_secret(self, secret: str) -> Project | None: ...

    # profiles
    def get_profiles(
        self, project_id: int, distinct_ids: Sequence[str]
    ) -> list[tuple[str, Props]]: ...

    def list_profiles(
        self, project_id: int, limit: int, offset: int
    ) -> tuple[int, list[tuple[str, Props]]]: ...

    # the web page
    def count_profiles(self, project_id: int) -> int: ...

    def browse_profiles(
        self,
        project_id: int,
        search: str | None = None,
        where: str | None = None,
        after: str | None = None,
        limit: int = 50,
    ) -> list[tuple[str, Props]]: ...

    def property_names(self, project_id: int, sample: int = 500) -> list[str]: ...

    def profile_detail(self, project_id: int, distinct_id: str) -> dict[str, Any] | None:
        """{"props", "base", "tomb", "last_time", "log": [merge.LogEntry with update.received]}"""
        ...

    def stats(self, project_id: int, since: float, bucket: int) -> list[tuple[float, str, int]]: ...

    # the Engage query API, export and service accounts (peoplebase/query/)
    def start_query_session(
        self, project_id: int, where: Node | None, ttl: float, timeout: float
    ) -> QuerySession:
        """Freeze the distinct_ids of the project's profiles matching `where` (None: all),
        in distinct_id order, under a new random session id that lives `ttl` seconds.

        The matching runs in one read snapshot (stopped with QueryTimeout after `timeout`
        seconds); the ids are written in short transactions, so no read transaction outlives
        the call. Expired sessions are removed here.
        """
        ...

    def session_page(
        self, session_id: str, project_id: int, offset: int, limit: int
    ) -> tuple[QuerySession, list[tuple[str, Props | None]]]:
        """Profiles at positions [offset, offset+limit) of a session, as they are now
        (None for a profile deleted since page 0). Raises SessionExpired."""
        ...

    def iter_profiles(
        self, project_id: int, where: Node | None, batch: int = 1000, timeout: float = 0.0
    ) -> Iterator[list[tuple[str, Props]]]:
        """Every matching profile, in distinct_id order, in batches: each batch is a short
        keyset read (`distinct_id > last`), so memory stays constant and no read transaction
        spans the walk. `timeout` (0: none) bounds each batch's read."""
        ...

    def create_service_account(
        self, name: str, project_ids: Sequence[int]
    ) -> tuple[ServiceAccount, str]:
        """A new service account for these projects; returns it and its secret (stored
        hashed, shown once). Raises UnknownProject for an id that names no project."""
        ...

    def list_service_accounts(self) -> list[ServiceAccount]: ...

    def service_account(self, username: str, secret: str) -> ServiceAccount | None:
        """The account with this user name if the secret matches (constant-time compare)."""
        ...
