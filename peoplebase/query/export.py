"""Export every matching profile as NDJSON or CSV, in constant memory.

NDJSON lines are `{"$distinct_id": …, "$properties": {…}}`, the shape of the query API's
results and of Mixpanel's profile export, so `peoplebase import` reads them back. CSV has a
header row: `$distinct_id`, then the chosen `output_properties`, or else the sorted union of
every property of the exported profiles (found by a first pass over them). CSV cells hold
strings as they are, other values as JSON, and nothing for a missing property.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import IO, Any

import orjson

from ..store.base import ProfileStore
from .where import Node

FORMATS = ("ndjson", "csv")
BATCH = 1000


def export_chunks(
    store: ProfileStore,
    project_id: int,
    where: Node | None = None,
    fmt: str = "ndjson",
    output_properties: list[str] | None = None,
    timeout: float = 0.0,
    batch: int = BATCH,
) -> Iterator[bytes]:
    """The export as a stream of byte chunks (one per batch of profiles)."""
    for chunk, _ in counted_chunks(
        store, project_id, where, fmt, output_properties, timeout, batch
    ):
        yield chunk


def counted_chunks(
    store: ProfileStore,
    project_id: int,
    where: Node | None = None,
    fmt: str = "ndjson",
    output_properties: list[str] | None = None,
    timeout: float = 0.0,
    batch: int = BATCH,
) -> Iterator[tuple[bytes, int]]:
    """(chunk, number of profiles in it) pairs; the CSV header comes with the first batch."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    if fmt == "ndjson":
        for rows in store.iter_profiles(project_id, where, batch, timeout):
            lines = [_ndjson_line(did, props, output_properties) for did, props in rows]
            yield b"".join(lines), len(rows)
        return
    columns = output_properties
    if columns is None:
        names: set[str] = set()
        for rows in store.iter_profiles(project_id, where, batch, timeout):
            for _, props in rows:
                names.update(props)
        columns = sorted(names)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["$distinct_id", *columns])
    for rows in store.iter_profiles(project_id, where, batch, timeout):
        for did, props in rows:
            writer.writerow([did, *(_cell(props, name) for name in columns)])
        yield buffer.getvalue().encode("utf-8"), len(rows)
        buffer.seek(0)
        buffer.truncate()
    rest = buffer.getvalue()
    if rest:
        yield rest.encode("utf-8"), 0


def _ndjson_line(did: str, props: dict[str, Any], output: list[str] | None) -> bytes:
    if output is not None:
        props = {k: props[k] for k in output if k in props}
    return orjson.dumps({"$distinct_id": did, "$properties": props}) + b"\n"


def _cell(props: dict[str, Any], name: str) -> str:
    if name not in props:
        return ""
    value = props[name]
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def export_to(
    out: IO[bytes],
    store: ProfileStore,
    project_id: int,
    where: Node | None = None,
    fmt: str = "ndjson",
    output_properties: list[str] | None = None,
    progress: Any = None,
) -> int:
    """Write the export to a binary file; returns the number of profiles written.

    `progress(n)` (optional) is called with the number of profiles of each batch written.
    """
    count = 0
    for chunk, n in counted_chunks(store, project_id, where, fmt, output_properties):
        out.write(chunk)
        count += n
        if progress is not None and n:
            progress(n)
    return count
