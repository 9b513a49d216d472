"""The web page in real headless Chromium: sign in, search, filter, explain, time travel, sign out."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, ServerProcess, free_port

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
        "--no-first-run", "--disable-component-update", "--disable-sync"]
SHOTS = ROOT / "test-artifacts" / "ui"
DOC_SHOTS = ROOT / "docs" / "images"
TOKEN = "ui-browser"


def shot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    if os.environ.get("PEOPLEBASE_UPDATE_DOC_SCREENSHOTS"):
        DOC_SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(DOC_SHOTS / f"ui-{name}.png"), full_page=True)


@pytest.fixture
def ui_server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / "ui.db", "--tokens", "open").start()
    records = [
        {"$token": TOKEN, "$distinct_id": "alice", "$set": {"$email": "alice@example.com", "$name": "Alice", "plan": "free"}, "$time": 1_700_000_000},
        {"$token": TOKEN, "$distinct_id": "alice", "$set": {"plan": "pro"}, "$time": 1_700_086_400},
        {"$token": TOKEN, "$distinct_id": "alice", "$add": {"logins": 3}, "$time": 1_700_003_600},  # arrives late
        {"$token": TOKEN, "$distinct_id": "bob", "$set": {"$email": "bob@example.com", "$name": "Bob", "plan": "free"}, "$time": 1_700_000_000},
        {"$token": TOKEN, "$distinct_id": "carol", "$set": {"$name": "<script>alert('x')</script>", "plan": "pro"}, "$time": 1_700_000_000},
    ]
    for record in records:
        r = httpx.post(server.url + "/engage?verbose=1", json=[record])
        assert r.json()["status"] == 1
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def browser() -> Iterator[object]:
    assert Path(CHROMIUM).exists(), "Debian chromium is missing: run `make chromium` (the browser tests never skip)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def test_sign_in_search_filter_explain_travel_sign_out(ui_server: ServerProcess, browser) -> None:  # type: ignore[no-untyped-def]
    secret = ui_server.secret(TOKEN)
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.goto(ui_server.url + "/ui/")
    assert page.url.endswith("/ui/login")
    page.fill("#secret", "wrong-secret")
    with page.expect_navigation():
        page.click("#sign-in")
    assert "do not open any project" in page.inner_text("#login-error")
    shot(page, "login-refused")
    assert [e for e in errors if "401" not in e] == []  # the refusal itself is a 401
    errors.clear()

    page.fill("#secret", secret)
    page.keyboard.press("Enter")
    page.wait_for_url("**/ui/")
    assert page.inner_text("#profile-count") == "3"
    shot(page, "overview")

    with page.expect_navigation():
        page.click("text=Profiles")
    page.fill("#q", "bob@example.com")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    links = page.locator("#profiles tbody a").all_inner_texts()
    assert links == ["bob"]

    page.fill("#q", "")
    page.fill("#where", 'properties["plan"] == "pro"')
    with page.expect_navigation():
        page.click("#apply")
    assert sorted(page.locator("#profiles tbody a").all_inner_texts()) == ["alice", "carol"]
    assert "<script>" in page.inner_text("#profiles")  # shown as text, not run
    shot(page, "profiles-where")

    page.fill("#where", 'properties["plan"] ==')
    with page.expect_navigation():
        page.click("#apply")
    assert "position" in page.inner_text("#where-error")
    shot(page, "where-error")

    page.fill("#where", "")
    with page.expect_navigation():
        page.click("#apply")
    with page.expect_navigation():
        page.click("#profiles >> text=alice")
    assert page.inner_text("#distinct-id") == "alice"
    late = page.locator("#history li.late")
    assert late.count() == 1
    assert "logins" in late.inner_text()
    shot(page, "profile-history")

    slider = page.locator("#at-slider")
    slider.focus()
    page.keyboard.press("Home")  # the first update: plan was free, nothing else yet
    page.wait_for_url("**at=*")
    then = page.inner_text("#then")
    assert "free" in then and "pro" not in then and "logins" not in then
    shot(page, "time-travel")

    page.click("#sign-out")
    page.wait_for_url("**/ui/login")
    page.goto(ui_server.url + "/ui/profiles")
    assert page.url.endswith("/ui/login")
    assert errors == []
    context.close()


def test_cross_site_posts_without_csrf_are_refused(ui_server: ServerProcess, browser) -> None:  # type: ignore[no-untyped-def]
    secret = ui_server.secret(TOKEN)
    port = free_port()
    evil = f"""<!doctype html><html><body>
<form id="f1" method="post" action="{ui_server.url}/ui/login"><input name="secret" value="{secret}"></form>
<script>document.getElementById('f1').submit();</script></body></html>"""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = evil.encode()
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        context = browser.new_context()
        page = context.new_page()
        # a signed-in user visits another site that posts to the sign-in form
        page.goto(ui_server.url + "/ui/login")
        page.fill("#secret", secret)
        page.click("#sign-in")
        page.wait_for_url("**/ui/")
        page.goto(f"http://localhost:{port}/")
        page.wait_for_url(f"{ui_server.url}/ui/login")
        assert "came from another site" in page.inner_text("main")
        shot(page, "csrf-refused")
        context.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
