"""The Engage query API (SPEC §9): `/api/query/engage` (alias `/api/2.0/engage`) and the
streaming export `/api/query/export`.

Authentication: HTTP Basic with the project secret as user name (empty password), or a
service account `user:secret` plus `project_id`. Paging follows Mixpanel: page 0 freezes the
matching distinct_ids in a session (`session_id`), later pages name that session and read
the profiles as they are then. Store reads run on the thread pool so the event loop keeps
serving ingestion; each project may run `query_concurrency` queries at once (429 past it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson

from ..outcomes import Response, auth_error, error_response
from ..store.base import Project, QueryTimeout, SessionExpired, StoreUnavailable
from ..wire import parse_form
from .compile import ExpressionTooComplex
from .evaluate import matches
from .export import FORMATS, export_chunks
from .where import Node, WhereSyntaxError, parse

if TYPE_CHECKING:
    from ..app import PeoplebaseApp, Receive, Scope, Send


class BadQuery(Exception):
    """A parameter error: HTTP 400 with this message."""


TOO_MANY_FAILURES = "too many failed authentications from this address; retry later"


class QueryAPI:
    def __init__(self, app: PeoplebaseApp) -> None:
        self.app = app
        self.settings = app.settings
        self.store = app.store
        self._running: dict[int, int] = {}  # project id -> queries in flight

    # --- request plumbing -----------------------------------------------------------------

    async def _prepare(
        self, scope: Scope, receive: Receive
    ) -> tuple[Project, dict[str, str]] | Response:
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
        client = self.app.client_address.resolve(
            (scope.get("client") or ("?",))[0], scope["headers"]
        )
        limiter = self.app.auth_limiter
        blocked = limiter.blocked(client or "?")
        if blocked:  # too many failures from this address: the credentials are not checked
            return error_response(429, TOO_MANY_FAILURES, "Too Many Requests", blocked)
        if self._inline(fields):
            project = self._authenticate(scope, fields)
        else:
            loop = asyncio.get_running_loop()
            project = await loop.run_in_executor(None, self._authenticate, scope, fields)
        if isinstance(project, Response):
            if project.status in (401, 403):
                limiter.failed(client or "?")
            return project
        return project, fields

    def _inline(self, fields: dict[str, str]) -> bool:
        """A single-profile lookup on a local SQLite file runs on the event loop: a primary-key
        read costs less than handing it to a thread and taking the interpreter lock back from
        a loop busy with ingestion (which cost milliseconds at p99 under load)."""
        return bool(fields.get("distinct_id")) and getattr(self.store, "local_reads", False)

    def _acquire(self, project: Project) -> Response | None:
        running = self._running.get(project.id, 0)
        if running >= self.settings.query_concurrency:
            return error_response(
                429,
                f"too many queries running for this project (at most "
                f"{self.settings.query_concurrency} at once); retry later",
                "Too Many Requests",
                self.settings.retry_after,
            )
        self._running[project.id] = running + 1
        return None

    def _release(self, project: Project) -> None:
        self._running[project.id] -= 1
        if not self._running[project.id]:
            del self._running[project.id]

    async def handle(self, scope: Scope, receive: Receive) -> Response:
        prepared = await self._prepare(scope, receive)
        if isinstance(prepared, Response):
            return prepared
        project, fields = prepared
        busy = self._acquire(project)
        if busy is not None:
            return busy
        try:
            if self._inline(fields):
                return self._run_query(project, fields)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self._run_query, project, fields)
        except BadQuery as exc:
            return error_response(400, str(exc), "Bad Request")
        except QueryTimeout as exc:
            return error_response(400, f"{exc}; narrow the where expression", "Bad Request")
        except ExpressionTooComplex as exc:
            return error_response(400, str(exc), "Bad Request")
        except StoreUnavailable as exc:
            return error_response(503, str(exc), "Service Unavailable", self.settings.retry_after)
        finally:
            self._release(project)

    def _authenticate(self, scope: Scope, fields: dict[str, str]) -> Project | Response:
        header = _header(scope, b"authorization")
        if not header:
            return auth_error(
                401,
                "missing credentials: use HTTP Basic auth with the project secret, or a "
                "service account and project_id",
            )
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return auth_error(401, "unsupported authorization scheme: use HTTP Basic auth")
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError, UnicodeError):
            decoded = value.strip()  # Mixpanel accepts plain text too
        user, _, password = decoded.partition(":")
        pid_param = fields.get("project_id") or ""
        if password:
            account = self.store.service_account(user, password)
            if account is None:
                return auth_error(401, "invalid credentials")
            if not pid_param:
                return auth_error(401, "project_id, required with service account credentials")
            if not pid_param.isdigit() or int(pid_param) not in account.project_ids:
                return auth_error(403, f"this service account has no access to project {pid_param}")
            project = self.store.project_by_id(int(pid_param))
            if project is None:
                return auth_error(403, f"no project {pid_param}")
            return project
        project = self.store.project_by_secret(user)
        if project is None:
            return auth_error(401, "invalid credentials")
        if pid_param and pid_param != str(project.id):
            return auth_error(403, f"these credentials do not give access to project {pid_param}")
        return project

    # --- /api/query/engage ----------------------------------------------------------------

    def _run_query(self, project: Project, fields: dict[str, str]) -> Response:
        settings = self.settings
        where = _where(fields)
        output = _json_list(fields, "output_properties")
        page = _int(fields, "page", 0)
        page_size = settings.page_size
        ids: list[str] | None = None
        if fields.get("distinct_id"):
            ids = [fields["distinct_id"]]
        elif fields.get("distinct_ids"):
            ids = [str(x) for x in _json_list(fields, "distinct_ids") or []]
            if len(ids) > settings.max_distinct_ids:
                raise BadQuery(f"distinct_ids, at most {settings.max_distinct_ids} are accepted")
        session_id = fields.get("session_id") or ""
        rows: list[tuple[str, dict[str, Any] | None]]
        if ids is not None:
            found = self.store.get_profiles(project.id, ids)
            if where is not None:
                found = [(d, p) for d, p in found if matches(where, p)]
            total = len(found)
            rows = list(found[page * page_size : (page + 1) * page_size])
            session_id = session_id or secrets.token_urlsafe(18)
        else:
            if page > 0 and not session_id:
                raise BadQuery("session_id, required for page > 0: pass the session_id of page 0")
            try:
                if page == 0 and not session_id:
                    raise SessionExpired("")
                session, rows = self.store.session_page(
                    session_id, project.id, page * page_size, page_size
                )
            except SessionExpired as exc:
                if page > 0:
                    raise BadQuery(
                        f"session_id, unknown or expired (sessions last "
                        f"{settings.query_session_ttl:g} seconds): request page 0 again"
                    ) from exc
                session = self.store.start_query_session(
                    project.id, where, settings.query_session_ttl, settings.query_timeout
                )
                session, rows = self.store.session_page(session.id, project.id, 0, page_size)
            total = session.total
            session_id = session.id
        results = [
            {"$distinct_id": did, "$properties": _pick(props or {}, output)} for did, props in rows
        ]
        body = {
            "page": page,
            "page_size": page_size,
            "session_id": session_id,
            "status": "ok",
            "total": total,
            "results": results,
        }
        return Response(200, orjson.dumps(body))

    # --- /api/query/export ----------------------------------------------------------------

    async def export(self, scope: Scope, receive: Receive, send: Send) -> Response | None:
        """Stream every matching profile (NDJSON or CSV); returns a Response only on errors."""
        prepared = await self._prepare(scope, receive)
        if isinstance(prepared, Response):
            return prepared
        project, fields = prepared
        try:
            where = _where(fields)
            output = _json_list(fields, "output_properties")
            fmt = fields.get("format") or "ndjson"
            if fmt not in FORMATS:
                raise BadQuery(f"format, must be one of {', '.join(FORMATS)}")
        except BadQuery as exc:
            return error_response(400, str(exc), "Bad Request")
        busy = self._acquire(project)
        if busy is not None:
            return busy
        loop = asyncio.get_running_loop()
        chunks: Iterator[bytes] = export_chunks(
            self.store,
            project.id,
            where,
            fmt,
            [str(p) for p in output] if output is not None else None,
            timeout=self.settings.query_timeout,
        )
        try:
            try:
                first = await loop.run_in_executor(None, next, chunks, b"")
            except QueryTimeout as exc:
                return error_response(400, f"{exc}; narrow the where expression", "Bad Request")
            content_type = b"text/csv; charset=utf-8" if fmt == "csv" else b"application/x-ndjson"
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", content_type),
                        (b"x-content-type-options", b"nosniff"),
                    ],
                }
            )
            chunk = first
            while chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunk = await loop.run_in_executor(None, next, chunks, b"")
            await send({"type": "http.response.body", "body": b""})
            return None
        finally:
            chunks.close()  # type: ignore[attr-defined]
            self._release(project)


def _pick(props: dict[str, Any], output: list[Any] | None) -> dict[str, Any]:
    if output is None:
        return props
    return {k: props[k] for k in output if isinstance(k, str) and k in props}


def _where(fields: dict[str, str]) -> Node | None:
    text = fields.get("where") or ""
    if not text.strip():
        return None
    try:
        return parse(text)
    except WhereSyntaxError as exc:
        raise BadQuery(str(exc)) from exc
    except ExpressionTooComplex as exc:
        raise BadQuery(str(exc)) from exc


def _json_list(fields: dict[str, str], name: str) -> list[Any] | None:
    value = fields.get(name)
    if value in (None, ""):
        return None
    try:
        parsed = orjson.loads(value or "")
    except orjson.JSONDecodeError as exc:
        raise BadQuery(f"{name}, must be a JSON list") from exc
    if not isinstance(parsed, list):
        raise BadQuery(f"{name}, must be a JSON list")
    return parsed


def _int(fields: dict[str, str], name: str, default: int) -> int:
    value = fields.get(name)
    if value in (None, ""):
        return default
    try:
        number = int(value or "")
    except ValueError as exc:
        raise BadQuery(f"{name}, must be a whole number") from exc
    if number < 0:
        raise BadQuery(f"{name}, must not be negative")
    if number > 10_000_000:
        raise BadQuery(f"{name}, too large")
    return number


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
