"""The ASGI application: routes, lifespan, and the glue between wire, records and the writer.

A plain ASGI callable (no framework) keeps the ingestion hot path short. Routes:

    /engage, /engage/ (any path prefix)      ingestion, GET/POST/OPTIONS, CORS
    /track /import /decide /flags /record    answered 200 `0` (events are not stored here)
    /groups                                  answered 200 `0` (group profiles are not stored yet)
    /api/query/engage, /api/2.0/engage       the Engage query API (Basic auth)
    /api/query/export                        streaming export, NDJSON or CSV (Basic auth)
    /healthz                                 200 once ready
    /openapi.json                            the OpenAPI document of all of these
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from . import __version__
from .clientip import ClientAddress
from .geo import Geolocator, GeoLookup
from .geo_providers import open_geo
from .openapi import openapi_json
from .outcomes import JSON, Outcome, Response, error_response, render
from .query.api import QueryAPI
from .query.indexes import parse_names as parse_indexed
from .ratelimit import RATE_LIMITED, FailedAuthLimiter, TokenBuckets, retry_after
from .records import Validator
from .settings import Settings
from .store import ProfileStore, open_store
from .store.base import StoreUnavailable
from .types import Params, Rejection, Update
from .ui.web import WebUI
from .wire import (
    RequestTooLarge,
    TooManyRecords,
    parse_form,
    parse_params,
    parse_request,
    valid_callback,
)
from .writeproc import ProcessWriteStore
from .writer import Overloaded, Writer, WriterStopped

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

EVENT_ROUTES = frozenset({"track", "import", "decide", "flags", "record", "groups"})
QUERY_ROUTES = frozenset({"/api/query/engage", "/api/2.0/engage"})
EXPORT_ROUTE = "/api/query/export"
NOSNIFF = (b"x-content-type-options", b"nosniff")


class BodyTooLarge(Exception):
    pass


class BodyCutShort(BodyTooLarge):
    """The client went away before its body was complete: nothing of it is applied (the
    answer, whatever it is, reaches nobody)."""


class PeoplebaseApp:
    def __init__(
        self, settings: Settings, store: ProfileStore | None = None, geo: GeoLookup | None = None
    ) -> None:
        self.settings = settings
        store_kwargs: dict[str, Any] = {
            "synchronous": settings.synchronous,
            "reorder_window": settings.reorder_window,
            "max_log_entries": settings.max_log_entries,
            "max_properties": settings.max_properties,
            "open_tokens": settings.tokens_open,
            "log_cache": settings.log_cache,
            "write_behind": settings.write_behind,
            "held_profiles": settings.held_profiles,
        }
        self.store = store or open_store(settings.db, **store_kwargs)
        # With `--writer process` the merge and the commits run in a child process.
        self.write_process = (
            ProcessWriteStore(settings.db, **store_kwargs)
            if settings.writer == "process" and store is None
            else None
        )
        if self.write_process is not None and hasattr(self.store, "session_writer"):
            # the child holds the write connection and the profiles not written yet: the
            # server's readers see those through the overlay the child's answers feed
            self.store.session_writer = self.write_process.session_write
            self.store.syncer = self.write_process.sync  # type: ignore[attr-defined]
            self.write_process.overlay = self.store.overlay  # type: ignore[attr-defined]
        self.writer = Writer(
            self.write_process or self.store,  # type: ignore[arg-type]
            settings.queue_records,
            settings.group_records,
            settings.queue_wait,
        )
        # Geolocation (docs/geolocation.md): the given lookup, else the one `geoip_db` names.
        self.client_address = ClientAddress(settings.trusted_proxies)
        self.geo_lookup: GeoLookup | None = geo if geo is not None else open_geo(settings.geoip_db)
        log.info("geolocation: %s", getattr(self.geo_lookup, "description", "off"))
        self.validator = Validator(
            time_skew=settings.time_skew,
            max_record_bytes=settings.max_record_bytes,
            token_known=None if settings.tokens_open else self._token_known,
            geo=Geolocator(self.geo_lookup) if self.geo_lookup is not None else None,
        )
        self.ready = False
        self._known_tokens: dict[str, float] = {}  # token -> when it was last checked
        burst = settings.rate_burst or max(settings.rate_limit * 10, settings.max_records)
        self.rate_limits = TokenBuckets(settings.rate_limit, burst)  # records per token
        self.auth_limiter = FailedAuthLimiter(settings.auth_fail_limit)
        self.query_api = QueryAPI(self)
        self.web = WebUI(self)
        self.counters = {"events_ignored": 0, "records_rejected": 0, "records_valid": 0}

    # --- lifespan -------------------------------------------------------------------------

    def startup(self) -> None:
        self.store.open()
        catch_up = getattr(self.store, "catch_up", None)
        if catch_up is not None:  # SQLite: what the journal holds goes into the rows first
            catch_up()
        sync_indexes = getattr(self.store, "sync_property_indexes", None)
        if sync_indexes is not None:
            sync_indexes(parse_indexed(self.settings.indexed_properties))
        if self.write_process is not None:
            self.write_process.start()
        self.writer.start()
        self.ready = True

    def shutdown(self) -> None:
        self.ready = False
        self.writer.stop()
        if self.write_process is not None:
            self.write_process.close()
        self.store.close()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await asyncio.get_running_loop().run_in_executor(None, self.startup)
                except Exception as exc:
                    # uvicorn logs this message and exits with status 3
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                self._watch_sighup(True)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self._watch_sighup(False)
                await asyncio.get_running_loop().run_in_executor(None, self.shutdown)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def reload_geo(self) -> None:
        """Re-read the geolocation database file (SIGHUP)."""
        reload = getattr(self.geo_lookup, "reload", None)
        if reload is not None:
            log.info("geolocation: SIGHUP, re-reading the database")
            reload()

    def _watch_sighup(self, on: bool) -> None:
        try:
            loop = asyncio.get_running_loop()
            if on:
                loop.add_signal_handler(signal.SIGHUP, self.reload_geo)
            else:
                loop.remove_signal_handler(signal.SIGHUP)
        except (AttributeError, NotImplementedError, RuntimeError, ValueError):
            pass  # no SIGHUP here (Windows), or not the main thread: the mtime check remains

    # --- routing --------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        trimmed = path.rstrip("/") or "/"
        last = trimmed.rsplit("/", 1)[-1]
        if trimmed == EXPORT_ROUTE:
            failed = await self.query_api.export(scope, receive, send)
            if failed is not None:
                await _send(send, failed, None)
            return
        if trimmed in QUERY_ROUTES:
            response = await self.query_api.handle(scope, receive)
            await _send(send, response, None)
            return
        # Ingestion routes work under any path prefix (e.g. /mp/engage behind a proxy), except
        # the query API's and the web page's own trees (/ui/static/record is a file name).
        ingest = not trimmed.startswith(("/api/", "/ui/")) and (
            last == "engage" or last in EVENT_ROUTES
        )
        if ingest:
            origin = header(scope, b"origin")
            if method == "OPTIONS":
                await _send(send, _preflight(scope), origin)
            elif method not in ("GET", "POST"):
                await _send(
                    send, error_response(405, "use GET or POST", "Method Not Allowed"), origin
                )
            elif last == "engage":
                await _send(send, await self._engage(scope, receive), origin)
            else:
                await _send(send, await self._events(scope, receive, last), origin)
            return
        if trimmed == "/ui" or trimmed.startswith("/ui/"):
            await _send(send, await self.web.handle(scope, receive), None)
            return
        if trimmed == "/":
            await _send(send, Response(303, b"", b"text/plain", [(b"location", b"/ui/")]), None)
            return
        if trimmed == "/healthz":
            if self.ready:
                body = orjson.dumps(
                    {
                        "status": "ok",
                        "version": __version__,
                        "queued_records": self.writer.queued_records,
                    }
                )
                await _send(send, Response(200, body), None)
            else:
                await _send(send, error_response(503, "starting", "Service Unavailable", 1), None)
            return
        if trimmed == "/openapi.json" and method in ("GET", "HEAD"):
            await _send(send, Response(200, openapi_json()), None)
            return
        await _send(send, error_response(404, f"no route for {path}", "Not Found"), None)

    # --- ingestion ------------------------------------------------------------------------

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.settings.max_body_bytes
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge()
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise BodyCutShort()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _events(self, scope: Scope, receive: Receive, route: str) -> Response:
        try:
            body = await self._read_body(scope, receive)
        except BodyTooLarge:
            return too_large(self.settings.max_body_bytes)
        self.counters["events_ignored"] += 1
        fields: dict[str, str] = {}
        try:
            fields.update(parse_form(scope.get("query_string", b"").decode("latin-1")))
            if body and body.lstrip()[:1] not in (b"[", b"{"):
                fields.update(parse_form(body.decode("utf-8")))  # verbose=1 may be in the body
        except (ValueError, UnicodeError):
            pass
        verbose = parse_params(fields).verbose
        what = (
            "group profiles are not stored here yet"
            if route == "groups"
            else "events are not stored here"
        )
        if verbose:
            message = f"{what}; send only engage and groups to Peoplebase"
            return Response(200, orjson.dumps({"status": 0, "error": message}))
        return Response(200, b"0", b"text/plain; charset=utf-8")

    async def _engage(self, scope: Scope, receive: Receive) -> Response:
        settings = self.settings
        now = time.time()
        overloaded = self.writer.overloaded()
        try:
            body = await self._read_body(scope, receive)
            if overloaded:  # refuse before parsing and validating; the body is read so the
                # client gets the 503 on a connection that stays usable
                return _unavailable("the write queue is full; retry later", settings.retry_after)
            payload = parse_request(
                scope["method"],
                scope.get("query_string", b""),
                header(scope, b"content-type") or "",
                header(scope, b"content-encoding") or "",
                body,
                settings.max_body_bytes,
                settings.max_records,
            )
        except (BodyTooLarge, RequestTooLarge):
            return too_large(settings.max_body_bytes)
        except TooManyRecords as exc:
            return error_response(400, str(exc), "Bad Request")
        params = payload.params
        if (
            params.callback is not None
            and not params.strict
            and not valid_callback(params.callback)
        ):
            return error_response(
                400, "callback, must be a JavaScript identifier such as mixpanel.cb", "Bad Request"
            )
        outcome = Outcome(data_error=payload.error)
        if payload.records is None:
            return render(params, outcome)
        request_ip = (
            self.client_address.resolve(_client_ip(scope), scope["headers"])
            if params.ip != "0" and self.geo_lookup is not None
            else None
        )
        check_size = payload.size > settings.max_record_bytes
        validate = self.validator.validate
        valid: list[Update] = []
        for index, raw in enumerate(payload.records):
            result = validate(raw, index, now, check_size, request_ip)
            if isinstance(result, Rejection):
                outcome.rejections.append(result)
            else:
                valid.append(result)
        if outcome.rejections:
            self._count_rejections(payload.records, outcome.rejections)
        if valid:
            if self.rate_limits.enabled and (wait := self._over_rate(valid)):
                return error_response(429, RATE_LIMITED, "Too Many Requests", retry_after(wait))
            try:
                applied = await self.writer.submit(valid)
            except (Overloaded, WriterStopped):
                return _unavailable("the write queue is full; retry later", settings.retry_after)
            except StoreUnavailable:
                return _unavailable(
                    "storage cannot accept writes right now; retry later", settings.retry_after
                )
            self.counters["records_valid"] += len(valid)
            outcome.valid = len(valid)
            if params.strict:
                for u in valid:
                    outcome.distinct_ids[u.index] = u.distinct_id
                    skips = list(u.skips) + applied.skips.get(u.index, [])
                    if skips:
                        outcome.skips[u.index] = skips
        return render(params, outcome)

    def _over_rate(self, valid: list[Update]) -> float:
        """Take this request's records from each token's bucket; the wait if one is empty."""
        per_token: dict[str, int] = {}
        for u in valid:
            per_token[u.token] = per_token.get(u.token, 0) + 1
        return max(self.rate_limits.take(token, n) for token, n in per_token.items())

    def _count_rejections(self, records: list[Any], rejections: list[Rejection]) -> None:
        self.counters["records_rejected"] += len(rejections)
        for r in rejections:
            raw = records[r.index]
            token = raw.get("$token") if isinstance(raw, dict) else None
            if isinstance(token, str) and token:
                self.writer.count(token, f"rejected: {r.error}")

    def _token_known(self, token: str) -> bool:
        """Closed mode: is this token a project? Positive answers are cached."""
        if token in self._known_tokens:
            return True
        if self.store.project_by_token(token) is not None:
            self._known_tokens[token] = time.time()
            return True
        return False


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _client_ip(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


def too_large(limit: int) -> Response:
    response = error_response(
        413, f"request exceeds max limit of {limit} bytes", "Request Entity Too Large"
    )
    response.headers.append((b"connection", b"close"))
    return response


def _unavailable(message: str, retry_after: int) -> Response:
    return error_response(503, message, "Service Unavailable", retry_after)


def _preflight(scope: Scope) -> Response:
    requested = header(scope, b"access-control-request-headers") or "content-type"
    return Response(
        200,
        b"",
        b"text/plain; charset=utf-8",
        [
            (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"access-control-allow-headers", requested.encode("latin-1")),
            (b"access-control-max-age", b"86400"),
        ],
    )


async def _send(send: Send, response: Response, origin: str | None) -> None:
    headers = [
        (b"content-type", response.content_type),
        (b"content-length", str(len(response.body)).encode()),
        NOSNIFF,
        *response.headers,
    ]
    if origin is not None:
        headers.append((b"access-control-allow-origin", origin.encode("latin-1")))
        headers.append((b"access-control-allow-credentials", b"true"))
        headers.append((b"vary", b"Origin"))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


__all__ = ["PeoplebaseApp", "Params", "JSON"]
