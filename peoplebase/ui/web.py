"""The web page under /ui/: sign in, browse and search profiles, explain one profile.

Server-rendered (Jinja2, autoescaped); the little JavaScript it uses is bundled in
ui/static and only improves the time-travel control. Every state-changing form carries a
CSRF token; the session cookie is signed, HttpOnly and SameSite=Lax.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import secrets
import time
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import jinja2
import orjson

from ..outcomes import Response
from ..wire import parse_form
from . import session as sess
from .charts import bar_chart
from .history import MISSING, as_of, explain

if TYPE_CHECKING:
    from ..app import PeoplebaseApp, Receive, Scope

log = logging.getLogger(__name__)

HTML = b"text/html; charset=utf-8"
PAGE = 50
STATIC_TYPES = {
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".svg": b"image/svg+xml",
}


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def _show(value: Any) -> str:
    if value is MISSING:
        return "(not set)"
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def _fmt_time(t: float | None) -> str:
    if t is None:
        return ""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _parse_at(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


class WebUI:
    def __init__(self, app: PeoplebaseApp) -> None:
        self.app = app
        self.store = app.store
        key = (
            app.settings.session_key.encode()
            if app.settings.session_key
            else secrets.token_bytes(32)
        )
        self.signer = sess.Signer(key)
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("peoplebase.ui", "templates"),
            autoescape=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["show"] = _show
        self.env.filters["type_of"] = _type_of
        self.env.filters["when"] = _fmt_time
        self.env.globals["MISSING"] = MISSING
        self.env.globals["quote"] = lambda s: quote(s, safe="")

    # --- plumbing -------------------------------------------------------------------------

    def _render(
        self,
        template: str,
        status: int = 200,
        headers: Any = None,
        **context: Any,
    ) -> Response:
        body = self.env.get_template(template).render(**context).encode()
        all_headers = [
            (b"cache-control", b"no-store"),
            (
                b"content-security-policy",
                b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"same-origin"),
            *(headers or []),
        ]
        return Response(status, body, HTML, all_headers)

    @staticmethod
    def _redirect(location: str, headers: list[tuple[bytes, bytes]] | None = None) -> Response:
        return Response(303, b"", HTML, [(b"location", location.encode()), *(headers or [])])

    def _secure(self, scope: Scope) -> bool:
        return scope.get("scheme") == "https"

    async def handle(self, scope: Scope, receive: Receive) -> Response:
        from ..app import BodyTooLarge, header

        path: str = scope["path"]
        method: str = scope["method"]
        if path.startswith("/ui/static/"):
            return self._static(path[len("/ui/static/") :])
        fields: dict[str, str] = {}
        try:
            fields = parse_form(scope.get("query_string", b"").decode("latin-1"))
            form: dict[str, str] = {}
            if method == "POST":
                body = await self.app._read_body(scope, receive)
                form = parse_form(body.decode("utf-8"))
        except (ValueError, UnicodeError, BodyTooLarge):
            return self._render("error.html", 400, message="The request could not be read.")
        cookies = sess.parse_cookies(header(scope, b"cookie"))
        current = self.signer.read(cookies.get(sess.COOKIE))
        route = path[len("/ui") :].rstrip("/") or "/"
        loop = asyncio.get_running_loop()

        if route == "/login":
            if method == "POST":
                return await loop.run_in_executor(None, self._login, scope, form, cookies)
            return self._login_page(scope, None)
        if method == "POST" and route == "/logout":
            if current is None or not sess.tokens_match(current.csrf, form.get("csrf")):
                return self._render(
                    "error.html", 403, message="This form has expired; sign in again."
                )
            return self._redirect(
                "/ui/login",
                [(b"set-cookie", sess.set_cookie(sess.COOKIE, "", 0, self._secure(scope)))],
            )
        if current is None:
            return self._redirect("/ui/login")
        if method == "POST":
            return self._render("error.html", 405, message="Nothing to post here.")
        project = await loop.run_in_executor(None, self.store.project_by_id, current.project_id)
        if project is None:
            return self._redirect("/ui/login")
        base = {"project": project, "session": current}
        if route == "/":
            return await loop.run_in_executor(None, self._overview, base)
        if route == "/profiles":
            return await loop.run_in_executor(None, self._profiles, base, fields)
        if route.startswith("/profiles/"):
            from urllib.parse import unquote

            did = unquote(route[len("/profiles/") :])
            return await loop.run_in_executor(None, self._profile, base, did, fields)
        return self._render("error.html", 404, message="No such page.", **base)

    def _static(self, name: str) -> Response:
        # Only the files shipped in ui/static are served: the requested name is looked up in
        # their list and never reaches the file system (a name too long for it gave a 500).
        if name not in _static_names():
            return Response(404, b"not found", b"text/plain")
        suffix = name[name.rfind(".") :]
        data = resources.files("peoplebase.ui").joinpath("static", name).read_bytes()
        return Response(
            200,
            data,
            STATIC_TYPES.get(suffix, b"application/octet-stream"),
            [(b"cache-control", b"public, max-age=3600")],
        )

    # --- sign in --------------------------------------------------------------------------

    def _login_page(self, scope: Scope, error: str | None, status: int = 200) -> Response:
        token = secrets.token_urlsafe(24)
        cookie = sess.set_cookie(sess.LOGIN_COOKIE, token, 3600, self._secure(scope))
        return self._render(
            "login.html", status, [(b"set-cookie", cookie)], csrf=token, error=error
        )

    def _login(self, scope: Scope, form: dict[str, str], cookies: dict[str, str]) -> Response:
        if not sess.tokens_match(cookies.get(sess.LOGIN_COOKIE), form.get("csrf")):
            return self._render(
                "error.html",
                403,
                message="This sign-in form has expired or came from another site. Reload and try again.",
            )
        client = (
            self.app.client_address.resolve((scope.get("client") or ("?",))[0], scope["headers"])
            or "?"
        )
        blocked = self.app.auth_limiter.blocked(client)
        if blocked:  # too many failed sign-ins from this address: the secret is not checked
            page = self._login_page(
                scope, "Too many failed sign-ins from your address; wait a minute.", 429
            )
            page.headers.append((b"retry-after", str(blocked).encode()))
            return page
        secret = form.get("secret", "").strip()
        project = None
        who = "project secret"
        if ":" in secret:
            user, _, password = secret.partition(":")
            pid_text = form.get("project_id", "").strip()
            account = self.store.service_account(user, password) if password else None
            if account is not None and pid_text.isdigit() and int(pid_text) in account.project_ids:
                project = self.store.project_by_id(int(pid_text))
                who = user
        elif secret:
            project = self.store.project_by_secret(secret)
        if project is None:
            self.app.auth_limiter.failed(client)
            time.sleep(0.2)  # slow down guessing
            return self._login_page(scope, "Those credentials do not open any project.", 401)
        cookie, _ = self.signer.issue(project.id, who)
        return self._redirect(
            "/ui/",
            [
                (
                    b"set-cookie",
                    sess.set_cookie(
                        sess.COOKIE, cookie, int(self.signer.max_age), self._secure(scope)
                    ),
                )
            ],
        )

    # --- pages ----------------------------------------------------------------------------

    def _overview(self, base: dict[str, Any]) -> Response:
        project = base["project"]
        now = time.time()
        count = self.store.count_profiles(project.id)
        hour = self.store.stats(project.id, now - 3600, 300)
        day = self.store.stats(project.id, now - 86400, 3600)
        charts = []
        totals = {}
        for title, data, span, width in (
            ("Last hour (5-minute bars)", hour, 3600, 300),
            ("Last day (hourly bars)", day, 86400, 3600),
        ):
            start = (now - span) // width * width
            buckets = [start + i * width for i in range(int(span // width) + 1)]
            labels = [_fmt_time(b)[11:16] for b in buckets]
            names = sorted({name for _, name, _ in data})
            series = {name: [0] * len(buckets) for name in names}
            index = {b: i for i, b in enumerate(buckets)}
            for bucket, name, value in data:
                i = index.get(bucket)
                if i is not None:
                    series[name][i] += value
            totals[title] = {name: sum(values) for name, values in series.items()}
            charts.append((title, bar_chart(title, labels, series) if series else ""))
        return self._render("overview.html", count=count, charts=charts, totals=totals, **base)

    def _profiles(self, base: dict[str, Any], fields: dict[str, str]) -> Response:
        project = base["project"]
        search = fields.get("q", "").strip()
        where = fields.get("where", "").strip()
        after = fields.get("after") or None
        columns = [c for c in fields.get("cols", "$email,$name,$last_seen").split(",") if c][:12]
        error = None
        rows: list[tuple[str, dict[str, Any]]] = []
        try:
            rows = self.store.browse_profiles(
                project.id, search=search or None, where=where or None, after=after, limit=PAGE + 1
            )
        except ValueError as exc:  # a where expression that does not parse, with its position
            error = str(exc)
        more = len(rows) > PAGE
        rows = rows[:PAGE]
        next_link = None
        if more:
            params = {k: v for k, v in fields.items() if k != "after"}
            params["after"] = rows[-1][0]
            next_link = "/ui/profiles?" + urlencode(params)
        names = self.store.property_names(project.id)
        return self._render(
            "profiles.html",
            rows=rows,
            search=search,
            where=where,
            error=error,
            columns=columns,
            names=names,
            next_link=next_link,
            first=after is None,
            shown=len(rows),
            **base,
        )

    def _profile(self, base: dict[str, Any], did: str, fields: dict[str, str]) -> Response:
        project = base["project"]
        detail = self.store.profile_detail(project.id, did)
        if detail is None:
            return self._render("error.html", 404, message=f"No profile {did!r}.", **base)
        entries = detail["log"]
        received = {e.seq: e.update.received for e in entries}
        steps = explain(detail["base"], entries, received)
        at = _parse_at(fields.get("at"))
        at_error = None
        then = None
        if fields.get("at") and at is None:
            at_error = "Give a time as 2024-01-31T12:00:00 (UTC) or as epoch seconds."
        elif at is not None:
            then = as_of(detail["base"], entries, at)
        times = sorted({e.time for e in entries})
        props = detail["props"] or {}
        location = {
            k: props[k] for k in ("$city", "$region", "$country_code", "$timezone") if k in props
        }
        return self._render(
            "profile.html",
            did=did,
            props=props,
            exists=detail["props"] is not None,
            steps=steps[::-1],
            at=at,
            at_text=fields.get("at", ""),
            at_error=at_error,
            then=then,
            times=times,
            history_start=times[0] if times else None,
            has_base=detail["base"] is not None,
            tomb=detail["tomb"],
            location=location,
            window_days=self.app.settings.reorder_window / 86400,
            max_log_entries=self.app.settings.max_log_entries,
            **base,
        )


@functools.cache
def _static_names() -> frozenset[str]:
    folder = resources.files("peoplebase.ui").joinpath("static")
    return frozenset(item.name for item in folder.iterdir() if item.is_file())
