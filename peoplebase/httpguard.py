"""Slow clients: a request must arrive whole within `request_timeout` seconds.

uvicorn's keep-alive timeout covers only the wait *between* requests. A client that opens a
connection and then sends nothing, or its headers or body a byte at a time (slow-loris),
would hold the connection (and, for a body, a waiting request) forever. This protocol arms a
timer when the connection opens and again when a new request starts; the request's last
byte disarms it. When it fires, the connection is closed: a request still being read is
dropped whole (its body is cut short, so nothing of it is applied).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


def guarded_protocol(request_timeout: float) -> type[HttpToolsProtocol]:
    """The httptools protocol with the request timeout (seconds)."""

    class GuardedProtocol(HttpToolsProtocol):
        _guard: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._guard is None:
                self._arm()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def _arm(self) -> None:
            self._guard = self.loop.call_later(request_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._guard is not None:
                self._guard.cancel()
                self._guard = None

        def _too_slow(self) -> None:
            self._guard = None
            if self.transport.is_closing():
                return
            peer = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.warning(
                "closing the connection of %s: no complete request within %gs",
                peer,
                request_timeout,
            )
            self.transport.close()

    return GuardedProtocol
