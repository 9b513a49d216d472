"""The vocabulary shared by the ingestion pipeline: wire → records → operations → merge → store."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields
from typing import Any

# Operations in the fixed order they are applied within one record (SPEC §2).
OP_ORDER: tuple[str, ...] = ("$set", "$set_once", "$add", "$union", "$append", "$remove", "$unset")
KNOWN_OPS = frozenset(OP_ORDER) | {"$delete"}
GEO_PROPERTIES = ("$city", "$region", "$country_code", "$timezone")

Props = dict[str, Any]


@dataclass(slots=True)
class Skip:
    """A key left out of an operation; the record stays valid (reported in strict mode)."""

    field: str
    message: str


@dataclass(slots=True)
class Update:
    """One validated update record, ready to be merged into a profile."""

    index: int  # position within its request
    token: str
    distinct_id: str
    time: float  # seconds since the epoch, clamped
    explicit_time: bool
    ignore_time: bool
    ops: dict[str, Any]  # op name -> sanitized value; "$delete" -> True
    received: float = 0.0  # when the request carrying it arrived
    geo: Props | None = None  # implicit $set resolved at ingestion
    dedup: int | None = None  # identity of a record with an explicit $time
    clamped: bool = False  # its $time lay in the future and was brought back to now
    skips: list[Skip] = field(default_factory=list)

    @property
    def is_delete(self) -> bool:
        return "$delete" in self.ops

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # `--writer process` pickles every update: a plain tuple of fields pickles in half
        # the time of the dataclass's generated __getstate__/__setstate__
        return (Update, _update_fields(self))


_update_fields = operator.attrgetter(*(f.name for f in fields(Update)))


@dataclass(slots=True)
class Rejection:
    """An invalid record: it is not applied."""

    index: int
    distinct_id: str | None
    field: str
    message: str

    @property
    def error(self) -> str:
        return f"{self.field}, {self.message}"


@dataclass(slots=True)
class Params:
    """Request parameters read from the query string and the form body."""

    ip: str | None = None
    verbose: bool = False
    strict: bool = False
    callback: str | None = None
    img: bool = False


@dataclass(slots=True)
class Applied:
    """What the writer reports for one request after its commit."""

    skips: dict[int, list[Skip]] = field(default_factory=dict)  # record index -> dynamic skips
    dropped: int = 0  # records that changed nothing (retries, not later than a delete)
    late: int = 0  # records re-ordered into place
    beyond_window: int = 0  # records older than the reorder window, applied on top
