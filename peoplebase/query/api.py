"""The Engage query API (SPEC §9): `/api/query/engage` and `/api/2.0/engage`.

Authentication (HTTP Basic with the project secret), parameters, and Mixpanel's response
shape. Runs the store's reads on the thread pool so the event loop keeps serving ingestion.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from typing import TYPE_CHECKING, Any

import orjson

from ..outcomes import Response, auth_error, error_response
from ..store.base import Project
from ..wire import parse_form

if TYPE_CHECKING:
    from ..app import PeoplebaseApp, Receive, Scope


class QueryAPI:
    def __init__(self, app: PeoplebaseApp) -> None:
        self.app = app
        self.settings = app.settings
        self.store = app.store

    async def handle(self, scope: Scope, receive: Receive) -> Response:
        from ..app import BodyTooLarge, too_large

        if scope["method"] not in ("GET", "POST"):
            return error_response(405, "use GET or POST", "Method Not Allowed")
        try:
            body = await self.app._read_body(scope, receive)
        except BodyTooLarge:
            return too_large(self.settings.max_body_bytes)
        try:
            fields = parse_form(scope.get("query_string", b"").decode("latin-1"))
            if body:
                fields.update(parse_form(body.decode("utf-8")))
        except (ValueError, UnicodeError):
            return error_response(400, "parameters are not valid UTF-8", "Bad Request")
        loop = asyncio.get_running_loop()
        project = await loop.run_in_executor(None, self._authenticate, scope)
        if isinstance(project, Response):
            return project
        pid_param = fields.get("project_id")
        if pid_param not in (None, "") and pid_param != str(project.id):
            return auth_error(403, f"these credentials do not give access to project {pid_param}")
        try:
            return await loop.run_in_executor(None, self._run_query, project, fields)
        except _BadQuery as exc:
            return error_response(400, str(exc), "Bad Request")

    def _authenticate(self, scope: Scope) -> Project | Response:
        header = _header(scope, b"authorization")
        if not header:
            return auth_error(
                401, "missing credentials: use HTTP Basic auth with the project secret"
            )
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return auth_error(401, "unsupported authorization scheme: use HTTP Basic auth")
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError, UnicodeError):
            decoded = value.strip()  # Mixpanel accepts plain text too
        user, _, password = decoded.partition(":")
        if password:
            return auth_error(401, "invalid credentials")
        project = self.store.project_by_secret(user)
        if project is None:
            return auth_error(401, "invalid credentials")
        return project

    def _run_query(self, project: Project, fields: dict[str, str]) -> Response:
        settings = self.settings
        if fields.get("where"):
            raise _BadQuery("where, expressions are not supported by this server yet")
        output = _json_list(fields, "output_properties")
        page = _int(fields, "page", 0)
        page_size = settings.page_size
        ids: list[str] | None = None
        if fields.get("distinct_id"):
            ids = [fields["distinct_id"]]
        elif fields.get("distinct_ids"):
            ids = [str(x) for x in _json_list(fields, "distinct_ids") or []]
            if len(ids) > settings.max_distinct_ids:
                raise _BadQuery(f"distinct_ids, at most {settings.max_distinct_ids} are accepted")
        if ids is not None:
            rows = self.store.get_profiles(project.id, ids)
            total = len(rows)
            rows = rows[page * page_size : (page + 1) * page_size]
        else:
            total, rows = self.store.list_profiles(project.id, page_size, page * page_size)
        results = [
            {
                "$distinct_id": did,
                "$properties": props
                if output is None
                else {k: props[k] for k in output if k in props},
            }
            for did, props in rows
        ]
        body = {
            "page": page,
            "page_size": page_size,
            "session_id": fields.get("session_id") or f"{int(time.time())}-{project.id}",
            "status": "ok",
            "total": total,
            "results": results,
        }
        return Response(200, orjson.dumps(body))


class _BadQuery(Exception):
    pass


def _json_list(fields: dict[str, str], name: str) -> list[Any] | None:
    value = fields.get(name)
    if value in (None, ""):
        return None
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise _BadQuery(f"{name}, must be a JSON list") from exc
    if not isinstance(parsed, list):
        raise _BadQuery(f"{name}, must be a JSON list")
    return parsed


def _int(fields: dict[str, str], name: str, default: int) -> int:
    value = fields.get(name)
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except ValueError as exc:
        raise _BadQuery(f"{name}, must be a whole number") from exc
    if number < 0:
        raise _BadQuery(f"{name}, must not be negative")
    return number


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
