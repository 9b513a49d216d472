"""A group of validated updates as bytes: what the writer process receives and what the SQLite
journal keeps until the group's profile rows are written (store/sqlite.py, write-behind).

The encoding is JSON (orjson): one array per request, one array per update, holding what the
merge reads of it. Everything the merge depends on is kept, so replaying a journal row gives
exactly the profiles the first merge gave. `skips` (keys validation left out) are not: the
server reports them from its own copy of the update, and the merge never reads them.

    [1, [[update, ...], ...]]        version 1, then the requests in arrival order
    update = [index, token, distinct_id, time, explicit_time, ignore_time, ops, received,
              geo, dedup, clamped]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from .types import Update

VERSION = 1


class JournalFormatError(ValueError):
    """Bytes that are not a group this version of Peoplebase wrote."""


def encode_group(requests: Sequence[Sequence[Update]]) -> bytes:
    """The requests of one group, in arrival order, as bytes."""
    return orjson.dumps(
        [
            VERSION,
            [
                [
                    [
                        u.index,
                        u.token,
                        u.distinct_id,
                        u.time,
                        u.explicit_time,
                        u.ignore_time,
                        u.ops,
                        u.received,
                        u.geo,
                        u.dedup,
                        u.clamped,
                    ]
                    for u in updates
                ]
                for updates in requests
            ],
        ]
    )


def decode_group(body: bytes | str) -> list[list[Update]]:
    """The requests `encode_group` encoded."""
    try:
        decoded: Any = orjson.loads(body)
        version, requests = decoded
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise JournalFormatError(f"not a journal group: {exc}") from exc
    if version != VERSION:
        raise JournalFormatError(f"journal group of version {version!r}, expected {VERSION}")
    return [[Update(*fields) for fields in updates] for updates in requests]
