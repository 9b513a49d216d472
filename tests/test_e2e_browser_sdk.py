"""The official browser SDK (npm `mixpanel-browser` 2.83.0) in real headless Chromium.

The test page is served from `http://localhost:PAGE_PORT` (tests/browser_pages/) and the SDK
is pointed at a real `peoplebase serve` process with `api_host: 'http://127.0.0.1:API_PORT'`,
so every SDK request is cross-site and CORS applies. Each scenario calls `identify` and every
`people.*` method, and checks: no console errors (except the SDK's own deprecation notice for
`track_charge`, which sends nothing), no failed or CORS-blocked request, every API answer a
200 carrying the page's origin in `Access-Control-Allow-Origin`, the SDK's localStorage queues
drained to empty, and the stored profiles exactly as Mixpanel's semantics give.

Chromium is Debian's (`/usr/bin/chromium`, installed by `make chromium`); without it these
tests fail, they are never skipped.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, Request, sync_playwright

from tests.browser_pages.server import PageServer
from tests.browser_pages.slow_proxy import SlowProxy
from tests.conftest import ROOT, ServerProcess

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = ROOT / "test-artifacts" / "browser-sdk"
TRACK_CHARGE_NOTICE = (
    "Mixpanel error: mixpanel.people.track_charge() is deprecated and no longer has any effect."
)


def last_seen(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(t)))


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdk_playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(sdk_playwright: Playwright) -> Iterator[Browser]:
    assert os.access(CHROMIUM, os.X_OK), (
        f"{CHROMIUM} is missing: run `make chromium` (Debian package `chromium`). "
        "The browser SDK tests need it and are never skipped."
    )
    b = sdk_playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    db = tmp_path_factory.mktemp("browser-sdk") / "server.db"
    server = ServerProcess(db, "--tokens", "open").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pages() -> Iterator[PageServer]:
    with PageServer() as server:
        yield server


# --- one browser tab, watched ------------------------------------------------------------------


@dataclass
class Watched:
    """A page with its console and its traffic to the API recorded."""

    page: Page
    api_url: str
    page_origin: str
    console: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)
    failed: list[tuple[str, str | None]] = field(default_factory=list)

    def attach(self) -> None:
        page = self.page
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("request", self._on_request)
        page.on("requestfinished", self._on_finished)
        page.on("requestfailed", self._on_failed)

    def _on_console(self, message: ConsoleMessage) -> None:
        self.console.append((message.type, message.text))

    def _is_api(self, request: Request) -> bool:
        return request.url.startswith(self.api_url)

    def _on_request(self, request: Request) -> None:
        if self._is_api(request):
            self.requests.append(request)

    def _on_finished(self, request: Request) -> None:
        if self._is_api(request):
            self.finished.append(request)

    def _on_failed(self, request: Request) -> None:
        if self._is_api(request):
            self.failed.append((request.url, request.failure))

    def engage_requests(self) -> list[Request]:
        return [r for r in self.requests if urlsplit(r.url).path.rstrip("/") == "/engage"]

    def settle(self, engage_at_least: int, timeout: float = 15.0) -> None:
        """Wait until `engage_at_least` engage requests have finished and none is in flight."""
        deadline = time.monotonic() + timeout
        while True:
            done_engage = sum(
                1 for r in self.finished if urlsplit(r.url).path.rstrip("/") == "/engage"
            )
            in_flight = len(self.requests) - len(self.finished) - len(self.failed)
            if done_engage >= engage_at_least and in_flight == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"requests did not settle: {done_engage} of {engage_at_least} engage "
                    f"requests finished, {in_flight} in flight, failed: {self.failed}"
                )
            self.page.wait_for_timeout(25)

    def queues(self) -> dict[str, int]:
        return dict(self.page.evaluate("harness.queues()"))

    def wait_drained(self, timeout: float = 20.0) -> None:
        """Wait until the SDK's localStorage queues are empty and no request is in flight."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.queues()
            in_flight = len(self.requests) - len(self.finished) - len(self.failed)
            if not any(left.values()) and in_flight == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"queues not drained: {left}, {in_flight} in flight")
            self.page.wait_for_timeout(50)

    def save_log(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        log = {
            "console": self.console,
            "page_errors": self.errors,
            "failed": self.failed,
            "requests": [
                {"method": r.method, "url": r.url, "post_data": r.post_data} for r in self.requests
            ],
        }
        (ARTIFACTS / f"{name}.json").write_text(json.dumps(log, indent=1))

    def check_clean(self, allowed_errors: tuple[str, ...] = (), aborted: int = 0) -> None:
        """No console error beyond the allowed ones, no CORS failure, every answer a 200.

        `aborted`: how many engage requests the SDK itself aborted (its request timeout).
        """
        assert self.errors == []
        unexpected = [
            text for kind, text in self.console if kind == "error" and text not in allowed_errors
        ]
        assert unexpected == []
        assert [text for _, text in self.console if "CORS" in text] == []
        assert [failure for _, failure in self.failed] == ["net::ERR_ABORTED"] * aborted
        assert all(urlsplit(url).path == "/engage/" for url, _ in self.failed)
        assert self.requests, "the SDK sent nothing to the API"
        for request in self.finished:
            response = request.response()
            assert response is not None, request.url
            assert response.status == 200, (request.url, response.status)
            if request.resource_type == "xhr":
                headers = response.headers
                assert headers.get("access-control-allow-origin") == self.page_origin
                assert headers.get("access-control-allow-credentials") == "true"


@pytest.fixture
def open_page(browser: Browser, pages: PageServer) -> Iterator[Any]:
    """Open the test page in a fresh browser context (empty storage) and watch it."""
    contexts = []
    opened: list[tuple[str, Watched]] = []

    def open_(api_url: str, name: str) -> Watched:
        context = browser.new_context()
        contexts.append(context)
        page = context.new_page()
        watched = Watched(page, api_url, pages.url.rstrip("/"))
        watched.attach()
        page.goto(pages.url)
        opened.append((name, watched))
        return watched

    try:
        yield open_
    finally:
        for name, watched in opened:
            watched.save_log(name)
        for context in contexts:
            context.close()


# --- what is sent, and what must be stored ----------------------------------------------------

# (method, args): each is mixpanel.people[method](...args, callback)
ADA_STEPS: list[tuple[str, list[Any]]] = [
    ("set", [{"name": "Ada", "plan": "free"}]),
    ("set", ["plan", "pro"]),
    ("set_once", [{"plan": "enterprise", "first_source": "web"}]),
    ("set_once", ["first_source", "other"]),
    ("increment", ["logins"]),
    ("increment", ["logins", 2]),
    ("increment", [{"credits": 10, "balance": -2.5}]),
    ("append", ["events", "signup"]),
    ("append", [{"events": "login", "pages": "home"}]),
    ("append", ["events", {"kind": "click"}]),
    ("union", [{"tags": ["a", "b"]}]),
    ("union", ["tags", ["b", "c"]]),
    ("union", [{"langs": "en"}]),
    ("remove", ["events", "signup"]),
    ("unset", ["first_source"]),
    ("unset", [["balance", "never_set"]]),
    ("track_charge", [9.99]),
    # the SDK leaves $ip and $ignore_time inside $set; they are reserved, never stored
    ("set", [{"city": "Paris", "$ip": "203.0.113.7", "$ignore_time": True}]),
    ("clear_charges", []),
    ("set", ["long", "x" * 300]),
]

# Engage requests each step makes (track_charge sends nothing).
ADA_REQUESTS = [0 if method == "track_charge" else 1 for method, _ in ADA_STEPS]


def ada_expected(browser_version: int) -> dict[str, Any]:
    return {
        "name": "Ada",
        "plan": "pro",
        "logins": 3,
        "credits": 10,
        "events": ["login", {"kind": "click"}],
        "pages": ["home"],
        "tags": ["a", "b", "c"],
        "langs": ["en"],
        "city": "Paris",
        "$transactions": [],
        "long": "x" * 255,  # the SDK truncates strings to 255 characters
        # added by the SDK to every people.set, and by init's referrer $set_once
        "$os": "Linux",
        "$browser": "Chrome",
        "$browser_version": browser_version,
        "$initial_referrer": "$direct",
        "$initial_referring_domain": "$direct",
    }


def browser_major(page: Page) -> int:
    agent = page.evaluate("navigator.userAgent")
    match = re.search(r"Chrome/(\d+)", agent)
    assert match, agent
    return int(match.group(1))


def stored(api: ServerProcess, token: str) -> dict[str, dict[str, Any]]:
    body = api.query(token)
    return {r["$distinct_id"]: r["$properties"] for r in body["results"]}


def check_profile(got: dict[str, Any], want: dict[str, Any], started: float) -> None:
    got = dict(got)
    seen = got.pop("$last_seen")
    assert last_seen(started - 1) <= seen <= last_seen(time.time() + 1)
    for name in ("$ip", "$ignore_time", "$city", "$country_code"):
        assert name not in got
    assert got == want


def decode_data(request: Request) -> tuple[str, Any]:
    """('json' | 'base64', decoded payload) of an engage request as the SDK sent it."""
    if request.method == "GET":
        raw = parse_qs(urlsplit(request.url).query)["data"][0]
    else:
        body = request.post_data or ""
        assert body.startswith("data="), body[:40]
        raw = unquote(body[len("data=") :])
    if raw[:1] in "[{":
        return "json", json.loads(raw)
    return "base64", json.loads(base64.b64decode(raw))


# --- scenarios ---------------------------------------------------------------------------------

SCENARIOS: dict[str, dict[str, Any]] = {
    "xhr-base64": {"batch_requests": False},
    "xhr-json": {"batch_requests": False, "api_payload_format": "json"},
    "xhr-get": {"batch_requests": False, "api_method": "GET"},
    "sendbeacon": {"batch_requests": False, "api_transport": "sendBeacon"},
    "batch-base64": {"batch_requests": True, "batch_flush_interval_ms": 300},
    "batch-json": {
        "batch_requests": True,
        "batch_flush_interval_ms": 300,
        "api_payload_format": "json",
    },
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_people_call(name: str, api: ServerProcess, open_page: Any) -> None:
    config = SCENARIOS[name]
    batched = bool(config["batch_requests"])
    token = f"web-{name}"
    tab: Watched = open_page(api.url, name)
    page = tab.page
    started = time.time()
    page.evaluate(
        "([token, config]) => harness.init(token, config)",
        [token, {"api_host": api.url, "debug": True, **config}],
    )

    # ada: identify, then every people call
    assert page.evaluate("harness.identify('ada')") == "ada"
    if batched:
        callbacks = page.evaluate("steps => harness.peopleSeq(steps)", ADA_STEPS)
        tab.wait_drained()
    else:
        tab.settle(1)  # identify sends the referrer $set_once queued by init
        callbacks = []
        expected_engage = len(tab.engage_requests())
        for (method, args), count in zip(ADA_STEPS, ADA_REQUESTS, strict=True):
            callbacks.append(page.evaluate("([m, a]) => harness.people(m, a)", [method, args]))
            expected_engage += count
            tab.settle(expected_engage)
    with_callback = [
        c for (m, _), c in zip(ADA_STEPS, callbacks, strict=True) if m != "track_charge"
    ]
    assert with_callback == [1] * len(with_callback)

    profiles = stored(api, token)
    assert set(profiles) == {"ada"}
    check_profile(profiles["ada"], ada_expected(browser_major(page)), started)

    # bob: a new user on the same page, then delete_user (sends {"$delete": distinct_id})
    page.evaluate("harness.reset()")
    assert page.evaluate("harness.identify('bob')") == "bob"
    before = len(tab.engage_requests())
    assert page.evaluate("harness.people('set', [{name: 'Bob'}])") == 1
    if not batched:
        tab.settle(before + 1)
        assert "bob" in stored(api, token)
    page.evaluate("harness.people('delete_user', [])")
    if batched:
        tab.wait_drained()
    else:
        tab.settle(before + 2)
    assert set(stored(api, token)) == {"ada"}

    tab.wait_drained()
    assert tab.queues() == {k: 0 for k in tab.queues()}
    tab.check_clean(allowed_errors=(TRACK_CHARGE_NOTICE,))
    assert TRACK_CHARGE_NOTICE in [text for _, text in tab.console]  # and nothing was sent

    # the scenario really used the transport, method and format it claims
    engage = tab.engage_requests()
    assert engage
    for request in engage:
        assert urlsplit(request.url).path == "/engage/"
        query = parse_qs(urlsplit(request.url).query)
        assert query["ip"] == ["1"]
        fmt, payload = decode_data(request)
        assert fmt == config.get("api_payload_format", "base64")
        if batched:
            assert request.method == "POST"
            assert query["verbose"] == ["1"]
            assert isinstance(payload, list)
        else:
            assert request.method == config.get("api_method", "POST")
            assert isinstance(payload, dict)
        if config.get("api_transport") == "sendBeacon":
            assert request.resource_type == "ping"
            assert request.all_headers()["content-type"] == "text/plain;charset=UTF-8"
        else:
            assert request.resource_type == "xhr"


def test_resend_after_timeout(api: ServerProcess, open_page: Any) -> None:
    """A batch answered later than batch_request_timeout_ms is sent again by the SDK.

    The records carry no `$time`, so the server cannot tell the copy from a new update
    (SPEC §4): the idempotent operations ($set, $set_once, $union, $unset) end as if applied
    once, while $add and $append are applied twice. docs/sdks.md says so.
    """
    token = "web-timeout"
    with SlowProxy(api.url, delay=3.0) as proxy:
        tab: Watched = open_page(proxy.url, "batch-timeout-resend")
        page = tab.page
        started = time.time()
        config = {
            "api_host": proxy.url,
            "debug": True,
            "batch_requests": True,
            "batch_flush_interval_ms": 3000,
            "batch_request_timeout_ms": 1000,
        }
        page.evaluate("([t, c]) => harness.init(t, c)", [token, config])
        steps = [
            ("set", [{"name": "Ada", "plan": "pro"}]),
            ("set_once", [{"first_source": "web"}]),
            ("increment", ["logins"]),
            ("increment", [{"credits": 2.5}]),
            ("append", ["events", "signup"]),
            ("union", [{"tags": ["a", "b"]}]),
            ("append", ["hist", "x"]),
            ("append", ["hist", "y"]),
            ("remove", ["hist", "x"]),
            ("unset", ["plan"]),
        ]
        callbacks = page.evaluate(
            "steps => { harness.identify('ada'); return harness.peopleSeq(steps); }", steps
        )
        assert callbacks == [1] * len(steps)
        assert proxy.engage_posts() == [], "the batch must hold every update; flush came early"
        tab.wait_drained(timeout=30)
        posts = proxy.engage_posts()

    assert len(posts) == 2, [(p.path, p.delayed) for p in posts]
    first, second = posts
    assert first.delayed and not second.delayed
    assert first.body == second.body  # the same batch, sent again after the timeout
    batch = json.loads(base64.b64decode(unquote(first.body.decode()[len("data=") :])))
    assert len(batch) == len(steps) + 1  # and init's referrer $set_once
    assert all("$time" not in record for record in batch)

    profiles = stored(api, token)
    assert set(profiles) == {"ada"}
    want = {
        "name": "Ada",
        "first_source": "web",
        "logins": 2,
        "credits": 5.0,
        "events": ["signup", "signup"],
        "tags": ["a", "b"],
        "hist": ["y", "y"],
        "$os": "Linux",
        "$browser": "Chrome",
        "$browser_version": browser_major(page),
        "$initial_referrer": "$direct",
        "$initial_referring_domain": "$direct",
    }
    check_profile(profiles["ada"], want, started)
    # the SDK reports the timeout and its retry; nothing else goes wrong
    tab.check_clean(
        allowed_errors=(
            "Mixpanel error: timeout",
            "Mixpanel error: [batch] Network timeout; retrying",
        ),
        aborted=1,
    )
    assert ("error", "Mixpanel error: [batch] Network timeout; retrying") in tab.console
