"""A forwarding HTTP proxy that answers the first `/engage` POST late.

It sits between the browser and Peoplebase. Every request is forwarded at once, so the server
applies the first batch right away, but that first answer is held back for `delay` seconds:
longer than the SDK's `batch_request_timeout_ms`, so the SDK aborts and sends the batch again,
as it does when a real network or server is slow. Every request is recorded.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-encoding",
    "host",
}


@dataclass
class Seen:
    method: str
    path: str
    body: bytes
    delayed: bool


class SlowProxy:
    def __init__(self, upstream: str, delay: float) -> None:
        self.upstream = upstream.rstrip("/")
        self.delay = delay
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.delayed_once = False
        self.client = httpx.Client(timeout=30)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0].rstrip("/")
                with proxy.lock:
                    delay = (
                        self.command == "POST"
                        and path.endswith("/engage")
                        and not proxy.delayed_once
                    )
                    if delay:
                        proxy.delayed_once = True
                    proxy.seen.append(Seen(self.command, self.path, body, delay))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                answer = proxy.client.request(
                    self.command, proxy.upstream + self.path, headers=headers, content=body
                )
                if delay:
                    time.sleep(proxy.delay)
                try:
                    self.send_response(answer.status_code)
                    for name, value in answer.headers.items():
                        if name.lower() not in HOP_BY_HOP:
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(answer.content)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(answer.content)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the browser gave up on this request (the point of the delay)

            do_GET = do_POST = do_OPTIONS = _forward  # noqa: N815

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> SlowProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.client.close()

    def engage_posts(self) -> list[Seen]:
        with self.lock:
            return [
                s
                for s in self.seen
                if s.method == "POST" and s.path.split("?", 1)[0].rstrip("/").endswith("/engage")
            ]
