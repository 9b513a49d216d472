"""Per-request outcome → HTTP response: `1`/`0`, verbose JSON, strict, JSONP, image (SPEC §7)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import orjson

from .types import Params, Rejection, Skip

PIXEL_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")

Headers = list[tuple[bytes, bytes]]

TEXT = b"text/plain; charset=utf-8"
JSON = b"application/json"
JS = b"text/javascript; charset=utf-8"
GIF = b"image/gif"


@dataclass
class Response:
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: Headers = field(default_factory=list)


def error_response(
    status: int, message: str, reason: str, retry_after: int | None = None
) -> Response:
    """The request-level error body: {"code","error","status"}."""
    body = orjson.dumps({"code": status, "error": message, "status": reason})
    headers: Headers = []
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    return Response(status, body, JSON, headers)


def auth_error(status: int, message: str) -> Response:
    """The read API's 401/403 body: {"error", "status": "error"}."""
    headers: Headers = []
    if status == 401:
        headers.append((b"www-authenticate", b'Basic realm="Peoplebase"'))
    return Response(status, orjson.dumps({"error": message, "status": "error"}), JSON, headers)


@dataclass
class Outcome:
    """Exactly one outcome per record: valid (applied) or rejected with a reason."""

    valid: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    skips: dict[int, list[Skip]] = field(default_factory=dict)
    distinct_ids: dict[int, str] = field(default_factory=dict)
    data_error: str | None = None

    @property
    def first_error(self) -> str | None:
        if self.data_error:
            return self.data_error
        if self.rejections:
            return self.rejections[0].error
        return None


def render(params: Params, outcome: Outcome) -> Response:
    if params.strict:
        return _strict(outcome)
    status = 1 if outcome.valid > 0 else 0
    if params.verbose:
        payload: Any = {"status": status, "error": None if status else outcome.first_error}
        body = orjson.dumps(payload)
    else:
        body = b"1" if status else b"0"
    if params.callback:
        return Response(200, params.callback.encode() + b"(" + body + b")", JS)
    if params.img:
        return Response(200, PIXEL_GIF, GIF)
    return Response(200, body, JSON if params.verbose else TEXT)


def _strict(outcome: Outcome) -> Response:
    if outcome.data_error:
        return error_response(400, outcome.data_error, "Bad Request")
    failed: list[tuple[int, dict[str, Any]]] = []
    for r in outcome.rejections:
        failed.append(
            (
                r.index,
                {
                    "index": r.index,
                    "$distinct_id": r.distinct_id,
                    "field": r.field,
                    "message": r.message,
                },
            )
        )
    for index, skips in outcome.skips.items():
        for s in skips:
            failed.append(
                (
                    index,
                    {
                        "index": index,
                        "$distinct_id": outcome.distinct_ids.get(index),
                        "field": s.field,
                        "message": f"skipped: {s.message}",
                    },
                )
            )
    if not failed:
        body = {"code": 200, "num_records_imported": outcome.valid, "status": "OK"}
        return Response(200, orjson.dumps(body))
    failed.sort(key=lambda f: f[0])
    body = {
        "code": 400,
        "error": "some data points in the request failed validation",
        "failed_records": [f for _, f in failed],
        "num_records_imported": outcome.valid,
        "status": "Bad Request",
    }
    return Response(400, orjson.dumps(body))
