"""The streaming leg of the proxy: upstream SSE bytes to the client as they arrive, as a raw ASGI response."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from shipyard.gateway.ejection import until_ejected
from shipyard.gateway.errors import sse_error_event
from shipyard.gateway.sse import StreamScan
from shipyard.gateway.transport import iter_raw
from shipyard.router import Replica

Resend = Callable[[Replica, str], Awaitable[tuple[Replica, httpx.Response] | None]]


class UpstreamStream(Response):
    """Forwards an upstream SSE response; ends it with an error event if the upstream fails mid-stream.

    If the replica fails before the stream produced its first byte, ``resend`` moves it to another replica
    (nothing was shown to the client yet); once tokens have streamed, a failure ends the stream with an
    error event instead of a silent retry. A client disconnect cancels the pump and closes the upstream
    connection, which makes vLLM abort the request. ``on_close`` runs exactly once, whatever happened.
    """

    def __init__(
        self,
        replica: Replica,
        upstream: httpx.Response,
        scan: StreamScan,
        headers: dict[str, str],
        on_close: Callable[[UpstreamStream], None],
        resend: Resend | None = None,
        write_timeout_s: float = 30.0,
        on_first_chunk: Callable[[UpstreamStream], None] | None = None,
    ) -> None:
        self.write_timeout_s = write_timeout_s
        """A client that takes longer than this to take one chunk has stopped reading: the stream ends (and the
        engine's request is aborted) instead of holding a slot in the engine for as long as it likes."""
        # Like StreamingResponse: no body, so no content-length header.
        self.status_code = 200
        self.media_type = "text/event-stream"
        self.background = None
        self.init_headers(headers)
        self.replica = replica
        self.upstream = upstream
        self.scan = scan
        self.on_close = on_close
        self.on_first_chunk = on_first_chunk
        """Called once, when the first chunk with output arrives (the TTFT is known then, not at the stream's
        end: the autoscaler's TTFT signal would otherwise lag by a whole generation)."""
        self.resend = resend
        self.resends = 0
        self.first_chunk_at: float | None = None
        self.error: str | None = None
        self.client_gone = False
        self._complete = False
        self._group: anyio.abc.TaskGroup | None = None
        self._writing_since: float | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._serve(receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.upstream.aclose()
            self.on_close(self)

    async def _serve(self, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:
            self._group = group

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.client_gone = not self._complete
                group.cancel_scope.cancel()

            group.start_soon(watch_disconnect)
            stop_watching = self._watch_writes(group)
            try:
                await self._pump(send)
            finally:
                stop_watching()
            group.cancel_scope.cancel()

    def _watch_writes(self, group: anyio.abc.TaskGroup) -> Callable[[], None]:
        """Start a timer that ends the stream once one chunk has waited ``write_timeout_s`` for the client to take
        it (one timer per stream, checked a few times per timeout, instead of a cancel scope per chunk); returns
        what stops it."""
        loop = asyncio.get_running_loop()
        period = min(1.0, self.write_timeout_s / 4)
        timer: list[asyncio.TimerHandle] = []

        def check() -> None:
            since = self._writing_since
            if since is not None and time.monotonic() - since >= self.write_timeout_s:
                self.client_gone = True  # it stopped reading: end here, closing the upstream aborts it
                self.error = f"the client took no data for {self.write_timeout_s:g} s (stopped reading)"
                group.cancel_scope.cancel()
                return
            timer[0] = loop.call_later(period, check)

        timer.append(loop.call_later(period, check))
        return lambda: timer[0].cancel()

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        while True:
            failure = await self._relay_until_ejected(send)
            if failure is None or self.first_chunk_at is not None or self.resend is None:
                self.error = failure
                break
            await self.upstream.aclose()
            moved = await self.resend(self.replica, failure)
            if moved is None:
                self.error = failure
                break
            self.replica, self.upstream = moved
            self.resends += 1
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

    async def _relay_until_ejected(self, send: Send) -> str | None:
        """``_relay``, cut short when the replica is ejected (hung): a stream never waits on a hung engine."""
        replica = self.replica
        with until_ejected(replica):
            return await self._relay(send)
        return f"replica {replica.name} stopped answering ({replica.last_error or 'ejected'})"

    async def _relay(self, send: Send) -> str | None:
        """Forward one upstream response; the reason it failed, or None if it finished properly."""
        scan = self.scan
        try:
            async for chunk in iter_raw(self.upstream):
                out = scan.feed(chunk)
                now = time.monotonic()
                self.replica.last_byte_at = now
                if out:
                    if self.first_chunk_at is None:
                        self.first_chunk_at = time.perf_counter()
                        if self.on_first_chunk is not None:
                            self.on_first_chunk(self)
                    self._writing_since = now  # the write watchdog ends a stream whose client stopped reading
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                    self._writing_since = None
            rest = scan.flush()
            if rest.strip():
                await send({"type": "http.response.body", "body": rest, "more_body": True})
            return None if scan.done else "upstream closed the stream before it finished"
        except httpx.ReadTimeout:
            return "upstream sent nothing for too long (read timeout)"
        except (httpx.HTTPError, AttributeError) as exc:  # AttributeError: see proxy._NOTHING_ANSWERED
            return f"upstream failed mid-stream: {type(exc).__name__}: {exc}".rstrip(": ")
