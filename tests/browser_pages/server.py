"""Serves the browser test page and mixpanel-browser's dist file on a second localhost origin.

The page is loaded from `http://localhost:PORT/` while the SDK talks to Peoplebase at
`http://127.0.0.1:API_PORT`, so every SDK request is cross-origin and CORS applies exactly as
it does for a site that embeds the SDK.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SDK_DIST = ROOT / "node_modules" / "mixpanel-browser" / "dist" / "mixpanel.umd.js"

FILES = {
    "/": (HERE / "index.html", "text/html; charset=utf-8"),
    "/index.html": (HERE / "index.html", "text/html; charset=utf-8"),
    "/harness.js": (HERE / "harness.js", "text/javascript; charset=utf-8"),
    "/mixpanel.umd.js": (SDK_DIST, "text/javascript; charset=utf-8"),
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        entry = FILES.get(path)
        if entry is None:
            self.send_error(404)
            return
        body = entry[0].read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", entry[1])
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class PageServer:
    """The test page on http://localhost:PORT/ (a thread in the test process)."""

    def __init__(self) -> None:
        if not SDK_DIST.is_file():
            raise RuntimeError(f"{SDK_DIST} is missing: run `make node` (npm ci)")
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://localhost:{self.port}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> PageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
