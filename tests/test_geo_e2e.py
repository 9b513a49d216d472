"""Geolocation on a real `peoplebase serve` process: the official Python SDK, the browser SDK in
headless Chromium behind a proxy, spoofed headers, reloads on SIGHUP and on file change."""

from __future__ import annotations

import http.server
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from mixpanel import Consumer, Mixpanel

from tests.conftest import ROOT, ServerProcess, free_port
from tests.geo_fixtures import (
    LONDON,
    LONDON_IP,
    MILTON,
    MILTON_IP,
    PARIS,
    TOKYO,
    TOKYO_IP6,
    write_city_db,
)

pytestmark = pytest.mark.e2e

TOKEN = "geo-e2e"
GEO = ("$city", "$region", "$country_code", "$timezone")


def profiles(server: ServerProcess) -> dict[str, dict[str, Any]]:
    body = server.query(TOKEN)
    out = {}
    for r in body["results"]:
        props = dict(r["$properties"])
        props.pop("$last_seen", None)
        out[r["$distinct_id"]] = props
    return out


def post(
    server: ServerProcess,
    record: dict[str, Any],
    headers: dict[str, str] | None = None,
    **params: str,
) -> None:
    r = httpx.post(
        server.url + "/engage",
        params={"verbose": "1", **params},
        json=[{"$token": TOKEN, **record}],
        headers=headers or {},
        timeout=10,
    )
    assert r.json() == {"status": 1, "error": None}


def start(tmp_path: Path, *extra: str) -> ServerProcess:
    return ServerProcess(tmp_path / "geo.db", "--tokens", "open", *extra).start()


@pytest.fixture
def city_db(tmp_path: Path) -> Path:
    return write_city_db(tmp_path / "city.mmdb")


@pytest.fixture
def city_server(tmp_path: Path, city_db: Path) -> Iterator[ServerProcess]:
    server = start(tmp_path, "--geoip-db", str(city_db), "--trusted-proxies", "127.0.0.1,::1")
    try:
        yield server
    finally:
        server.stop()


def test_python_sdk_ip_0_with_meta_ip(city_server: ServerProcess) -> None:
    """The Python SDK always sends ip=0; its documented way to locate is meta={'$ip': ...}."""
    mp = Mixpanel(TOKEN, consumer=Consumer(people_url=f"{city_server.url}/engage"))
    mp.people_set("located", {"plan": "pro"}, meta={"$ip": MILTON_IP})
    mp.people_set_once("located6", {"first": "web"}, meta={"$ip": TOKYO_IP6})
    mp.people_set("unlocated", {"plan": "free"})  # ip=0 and no $ip: no location
    mp.people_set("off", {"plan": "free"}, meta={"$ip": "0"})
    mp.people_set("given", {"$city": "Chosen"}, meta={"$ip": MILTON_IP})
    assert profiles(city_server) == {
        "located": {"plan": "pro", **MILTON},
        "located6": {"first": "web", **TOKYO},
        "unlocated": {"plan": "free"},
        "off": {"plan": "free"},
        "given": {"$city": "Chosen"},
    }


def test_spoofed_forwarding_headers_are_ignored_by_default(tmp_path: Path, city_db: Path) -> None:
    # No trusted proxies: the loopback peer is the client, whatever the headers say (the HTTP
    # server must not rewrite the client address from them either).
    server = start(tmp_path, "--geoip-db", str(city_db))
    try:
        spoof = {
            "X-Forwarded-For": LONDON_IP,
            "Forwarded": f"for={LONDON_IP}",
            "X-Real-IP": LONDON_IP,
        }
        post(server, {"$distinct_id": "spoofer", "$set": {"x": 1}}, spoof, ip="1")
        post(server, {"$distinct_id": "honest", "$set": {"x": 1}, "$ip": LONDON_IP})
        assert profiles(server) == {"spoofer": {"x": 1}, "honest": {"x": 1, **LONDON}}
    finally:
        server.stop()


def test_trusted_proxy_header_over_http(city_server: ServerProcess) -> None:
    post(
        city_server,
        {"$distinct_id": "a", "$set": {"x": 1}},
        {"X-Forwarded-For": f"8.8.8.8, {LONDON_IP}"},
    )
    post(
        city_server, {"$distinct_id": "b", "$set": {"x": 1}}, {"X-Forwarded-For": LONDON_IP}, ip="0"
    )
    assert profiles(city_server) == {"a": {"x": 1, **LONDON}, "b": {"x": 1}}


def test_database_reloaded_on_sighup(city_server: ServerProcess, city_db: Path) -> None:
    post(city_server, {"$distinct_id": "before", "$set": {"x": 1}, "$ip": LONDON_IP})
    # Same size, same mtime second would still be a different inode; SIGHUP re-reads anyway.
    write_city_db(city_db, {"81.2.69.0/24": PARIS})
    assert city_server.proc is not None
    city_server.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 10
    while True:
        post(city_server, {"$distinct_id": "after", "$set": {"x": 1}, "$ip": LONDON_IP})
        if profiles(city_server)["after"].get("$city") == "Paris" or time.time() > deadline:
            break
        time.sleep(0.1)
    assert profiles(city_server) == {"before": {"x": 1, **LONDON}, "after": {"x": 1, **PARIS}}
    assert city_server.proc.poll() is None  # SIGHUP did not end the server
    log = city_server.log_path.read_text()
    assert "geolocation: SIGHUP, re-reading the database" in log
    assert "geolocation: reloaded" in log


def test_database_reloaded_when_replaced_on_disk(city_server: ServerProcess, city_db: Path) -> None:
    post(city_server, {"$distinct_id": "u", "$set": {"x": 1}, "$ip": TOKYO_IP6})
    assert profiles(city_server)["u"] == {"x": 1, **TOKYO}
    write_city_db(city_db, {"2400:cb00::/32": MILTON})
    deadline = time.time() + 15
    while time.time() < deadline:  # checked at most once a second
        post(city_server, {"$distinct_id": "u", "$set": {"x": 2}, "$ip": TOKYO_IP6})
        if profiles(city_server)["u"].get("$city") == "Milton":
            break
        time.sleep(0.2)
    assert profiles(city_server)["u"] == {"x": 2, **MILTON}


def test_embedded_default_out_of_the_box(server: ServerProcess) -> None:
    for did, ip in [
        ("google", "8.8.8.8"),
        ("ripe", "193.0.6.139"),
        ("google6", "2001:4860:4860::8888"),
    ]:
        r = httpx.post(
            server.url + "/engage",
            json=[{"$token": TOKEN, "$distinct_id": did, "$set": {"x": 1}, "$ip": ip}],
            timeout=10,
        )
        assert r.text == "1"
    assert profiles(server) == {
        "google": {"x": 1, "$country_code": "US"},
        "ripe": {"x": 1, "$country_code": "NL"},
        "google6": {"x": 1, "$country_code": "US"},
    }


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--geoip-db", "/nonexistent/city.mmdb"],
            "geoip database /nonexistent/city.mmdb: no such file",
        ),
        (["--trusted-proxies", "10.0.0.0/8,proxy.example"], "'proxy.example' is not an IP address"),
    ],
)
def test_bad_settings_stop_serve_with_a_clear_message(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "peoplebase",
            "serve",
            "--db",
            str(tmp_path / "x.db"),
            "--port",
            str(free_port()),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert message in out.stderr


# --- the browser SDK behind a reverse proxy ---------------------------------------------------

MIXPANEL_JS = ROOT / "node_modules" / "mixpanel-browser" / "dist" / "mixpanel.umd.js"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PAGE = """<!doctype html><html><head><meta charset="utf-8"><script src="/mixpanel.js"></script></head>
<body><script>
mixpanel.init(%r, {api_host: location.origin, batch_requests: false, debug: true,
  loaded: function (mp) {
    mp.identify("browser-user");
    mp.people.set({plan: "pro"}, function (status) { window.sent = status; });
  }});
</script></body></html>"""


class Proxy(http.server.ThreadingHTTPServer):
    """A reverse proxy on 127.0.0.1 that says the browser is at `client_ip`, as a load
    balancer in front of Peoplebase would (appending to X-Forwarded-For)."""

    daemon_threads = True

    def __init__(self, upstream: str, client_ip: str) -> None:
        self.upstream = upstream
        self.client_ip = client_ip
        self.engage_queries: list[str] = []
        super().__init__(("127.0.0.1", free_port()), ProxyHandler)


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: Proxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(
        self, status: int, body: bytes, content_type: str, extra: Sequence[tuple[str, str]] = ()
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _forward(self) -> None:
        if self.path == "/":
            self._reply(200, (PAGE % TOKEN).encode(), "text/html; charset=utf-8")
            return
        if self.path == "/mixpanel.js":
            self._reply(200, MIXPANEL_JS.read_bytes(), "application/javascript")
            return
        if self.path.startswith("/engage"):
            self.server.engage_queries.append(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in ("host", "content-length", "connection")
        }
        prior = self.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = (
            f"{prior}, {self.server.client_ip}" if prior else self.server.client_ip
        )
        r = httpx.request(
            self.command,
            self.server.upstream + self.path,
            content=body,
            headers=headers,
            timeout=10,
        )
        passed = [(k, v) for k, v in r.headers.items() if k.lower().startswith("access-control-")]
        self._reply(r.status_code, r.content, r.headers.get("content-type", "text/plain"), passed)

    do_GET = do_POST = do_OPTIONS = _forward


@pytest.mark.browser
def test_browser_sdk_behind_trusted_proxy(city_server: ServerProcess) -> None:
    assert Path(CHROMIUM).exists(), "Debian chromium is missing (the browser tests never skip)"
    from playwright.sync_api import sync_playwright

    proxy = Proxy(city_server.url, LONDON_IP)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(f"http://127.0.0.1:{proxy.server_address[1]}/")
                page.wait_for_function("window.sent !== undefined", timeout=20_000)
                assert page.evaluate("window.sent") == 1
                assert errors == []
            finally:
                browser.close()
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert any("ip=1" in q for q in proxy.engage_queries), proxy.engage_queries
    found = profiles(city_server)["browser-user"]
    assert {k: found.get(k) for k in GEO} == LONDON
    assert found["plan"] == "pro"
