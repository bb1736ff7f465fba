"""The streaming leg of the proxy: upstream SSE bytes to the client as they arrive, as a raw ASGI response."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from shipyard.gateway.errors import sse_error_event
from shipyard.gateway.sse import StreamScan


class UpstreamStream(Response):
    """Forwards an upstream SSE response; ends it with an error event if the upstream fails mid-stream.

    A client disconnect cancels the pump and closes the upstream connection, which makes vLLM abort the
    request. ``on_close`` runs exactly once, whatever happened.
    """

    def __init__(
        self,
        upstream: httpx.Response,
        scan: StreamScan,
        headers: dict[str, str],
        on_close: Callable[[UpstreamStream], None],
    ) -> None:
        # Like StreamingResponse: no body, so no content-length header.
        self.status_code = 200
        self.media_type = "text/event-stream"
        self.background = None
        self.init_headers(headers)
        self.upstream = upstream
        self.scan = scan
        self.on_close = on_close
        self.first_chunk_at: float | None = None
        self.error: str | None = None
        self.client_gone = False
        self._complete = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    self.client_gone = not self._complete
                    group.cancel_scope.cancel()

                group.start_soon(watch_disconnect)
                await self._pump(send)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.upstream.aclose()
            self.on_close(self)

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        scan = self.scan
        try:
            async for chunk in self.upstream.aiter_raw():
                out = scan.feed(chunk)
                if out:
                    if self.first_chunk_at is None:
                        self.first_chunk_at = time.perf_counter()
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            rest = scan.flush()
            if rest.strip():
                await send({"type": "http.response.body", "body": rest, "more_body": True})
            if not scan.done:
                self.error = "upstream closed the stream before it finished"
        except httpx.ReadTimeout:
            self.error = "upstream sent nothing for too long (read timeout)"
        except httpx.HTTPError as exc:
            self.error = f"upstream failed mid-stream: {type(exc).__name__}: {exc}".rstrip(": ")
        if self.error is not None:
            await send(
                {
                    "type": "http.response.body",
                    "body": sse_error_event(502, self.error, "upstream_error"),
                    "more_body": True,
                }
            )
        self._complete = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
