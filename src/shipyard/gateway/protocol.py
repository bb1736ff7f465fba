"""uvicorn's HTTP protocol with a deadline on request headers: a client that sends them slowly (slowloris) is
cut off instead of holding a connection, and with it a file descriptor, for as long as it likes.

uvicorn bounds the idle time between requests (``timeout_keep_alive``) and the number of connections
(``limit_concurrency``) but not the time a request's headers take to arrive; this adds it, for both of its
parsers. The body has its own deadline where it is read (``Proxy.read_body``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def with_header_deadline(base: type[Any], header_timeout_s: float) -> type[asyncio.Protocol]:
    """``base`` (an uvicorn HTTP protocol class) closing connections whose request headers take longer than
    ``header_timeout_s`` from their first byte."""

    class HeaderDeadline(base):  # type: ignore[misc]
        _header_timer: asyncio.TimerHandle | None = None
        _awaited: Any = None

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._awaited = self.cycle
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._awaited:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.cycle is self._awaited and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

    HeaderDeadline.__name__ = f"{base.__name__}WithHeaderDeadline"
    return HeaderDeadline


def http_protocol(name: str, header_timeout_s: float) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn's ``http`` setting ("httptools" or "h11")."""
    return with_header_deadline(HttpToolsProtocol if name == "httptools" else H11Protocol, header_timeout_s)
