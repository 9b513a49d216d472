"""What every profile store offers, and the errors it raises.

StoreError
├── StoreUnavailable   storage cannot take writes now (disk full, read-only, locked): 503
└── UnknownProject     a token or id names no project
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..types import Applied, Props, Update


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


class ProfileStore(Protocol):
    """A durable profile store. `write_group` runs on the single writer thread."""

    def open(self) -> None: ...

    def close(self) -> None: ...

    def write_group(self, requests: Sequence[Sequence[Update]]) -> list[Applied]: ...

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
