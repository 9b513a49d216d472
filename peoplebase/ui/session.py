"""Signed session cookies and CSRF tokens for the web page.

The cookie holds the project id, an expiry and a CSRF token, signed with HMAC-SHA256 under
the server's session key. State-changing forms carry the CSRF token; the sign-in form, used
before any session exists, uses a double-submit cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import orjson

COOKIE = "pb_session"
LOGIN_COOKIE = "pb_login_csrf"


@dataclass(frozen=True)
class Session:
    project_id: int
    expires: float
    csrf: str
    who: str  # "project secret" or the service account's user name


class Signer:
    def __init__(self, key: bytes, max_age: float = 12 * 3600) -> None:
        self.key = key
        self.max_age = max_age

    def _mac(self, payload: bytes) -> str:
        return (
            base64.urlsafe_b64encode(hmac.new(self.key, payload, hashlib.sha256).digest())
            .decode()
            .rstrip("=")
        )

    def issue(self, project_id: int, who: str) -> tuple[str, Session]:
        session = Session(project_id, time.time() + self.max_age, secrets.token_urlsafe(24), who)
        payload = orjson.dumps({"p": project_id, "e": session.expires, "c": session.csrf, "w": who})
        encoded = base64.urlsafe_b64encode(payload).decode().rstrip("=")
        return f"{encoded}.{self._mac(payload)}", session

    def read(self, cookie: str | None) -> Session | None:
        if not cookie or "." not in cookie:
            return None
        encoded, mac = cookie.rsplit(".", 1)
        try:
            payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except (ValueError, TypeError):
            return None
        if not hmac.compare_digest(self._mac(payload), mac):
            return None
        try:
            data = orjson.loads(payload)
            session = Session(
                int(data["p"]), float(data["e"]), str(data["c"]), str(data.get("w", ""))
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        if session.expires < time.time():
            return None
        return session


def tokens_match(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


def parse_cookies(header: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if not header:
        return out
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            out[name] = value
    return out


def set_cookie(
    name: str, value: str, max_age: int | None, secure: bool, path: str = "/ui"
) -> bytes:
    parts = [f"{name}={value}", f"Path={path}", "HttpOnly", "SameSite=Lax"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts).encode("latin-1")
