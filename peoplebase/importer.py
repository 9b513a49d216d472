"""`peoplebase import`: profiles from a file, through the same pipeline as /engage.

Each line of the file (NDJSON) is either an /engage update record (`$token` may be left out;
the chosen project's token is used) or a line of Mixpanel's profile export
(`{"$distinct_id": …, "$properties": {…}}`, as /api/query/engage and `peoplebase export`
give them). An export line becomes `$set` of its properties with `$ignore_time`, no
geolocation, and `$time` = its `$last_seen` (else the import time), so importing the same
file again is a retry and changes nothing. Every record is validated by `records.Validator`
and merged by the store's `write_group` (in batches), like any ingested request; each line
ends as accepted or rejected with a reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from .records import Validator
from .store.base import ProfileStore
from .types import Rejection, Update

BATCH = 2000


@dataclass
class ImportSummary:
    accepted: int = 0
    rejected: int = 0
    unchanged: int = 0  # accepted records that changed nothing (retries, not later than a delete)
    rejections: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "rejected": self.rejected, "unchanged": self.unchanged}


def last_seen_time(value: Any) -> float | None:
    """`$last_seen` (`YYYY-MM-DDTHH:MM:SS`, UTC) → seconds since the epoch."""
    from .query.evaluate import parse_date

    return parse_date(value) if isinstance(value, str) else None


def to_record(raw: Any, token: str, now: float) -> Any:
    """One decoded line → an /engage update record (or the value itself, for the validator
    to reject)."""
    if not isinstance(raw, dict):
        return raw
    if "$properties" in raw and "$distinct_id" in raw:
        props = raw["$properties"]
        if not isinstance(props, dict):
            return {"$token": token, "$distinct_id": raw["$distinct_id"], "$set": props}
        when = last_seen_time(props.get("$last_seen"))
        return {
            "$token": token,
            "$distinct_id": raw["$distinct_id"],
            "$time": when if when is not None else now,
            "$ignore_time": True,
            "$set": props,
        }
    return {**raw, "$token": token}


def import_lines(
    store: ProfileStore,
    token: str,
    lines: Iterable[bytes],
    rejected: IO[bytes] | None = None,
    progress: Callable[[int], None] | None = None,
    now: float | None = None,
) -> ImportSummary:
    """Import NDJSON lines into the project with this token; rejected lines (with their line
    number and reason) are written to `rejected` as NDJSON. `progress(n)` gets byte counts."""
    now = time.time() if now is None else now
    validator = Validator()
    summary = ImportSummary()
    batch: list[Update] = []
    index_line: list[int] = []

    def reject(line_no: int, error: str, raw: bytes) -> None:
        summary.rejected += 1
        if rejected is not None:
            rejected.write(
                orjson.dumps(
                    {"line": line_no, "error": error, "record": raw.decode("utf-8", "replace")}
                )
                + b"\n"
            )

    def flush() -> None:
        if not batch:
            return
        applied = store.write_group([batch])[0]
        summary.accepted += len(batch)
        summary.unchanged += applied.dropped
        batch.clear()
        index_line.clear()

    for line_no, line in enumerate(lines, start=1):
        if progress is not None:
            progress(len(line))
        text = line.strip()
        if not text:
            continue
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            reject(line_no, f"invalid JSON: {exc}", text)
            continue
        record = to_record(raw, token, now)
        result = validator.validate(record, len(batch), now, check_size=True)
        if isinstance(result, Rejection):
            reject(line_no, result.error, text)
            continue
        batch.append(result)
        index_line.append(line_no)
        if len(batch) >= BATCH:
            flush()
    flush()
    return summary
