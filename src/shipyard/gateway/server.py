"""Running the gateway app under uvicorn (uvloop + httptools when available), in one process or several."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import uvicorn
from fastapi import FastAPI

from shipyard.gateway.metrics import GatewayMetrics, GCWatch
from shipyard.gateway.protocol import http_protocol
from shipyard.settings import Settings

if TYPE_CHECKING:
    from shipyard.gateway.workers import Workers


def fast_loop() -> Literal["uvloop", "asyncio"]:
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def fast_http() -> Literal["httptools", "h11"]:
    return "httptools" if importlib.util.find_spec("httptools") else "h11"


def uvicorn_config(app: FastAPI, host: str, port: int, log_level: str = "info") -> uvicorn.Config:
    """uvicorn as the gateway runs it: every wait on a client bounded (headers, idle keep-alive), connections
    capped per process, and streams in flight given ``shutdown_grace_s`` to finish on SIGTERM."""
    settings: Settings = getattr(app.state, "settings", None) or Settings()
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop=fast_loop(),
        http=http_protocol(fast_http(), settings.header_timeout_s),
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        timeout_keep_alive=int(settings.keep_alive_timeout_s),
        limit_concurrency=settings.max_connections,
    )


class _Server(uvicorn.Server):
    """uvicorn's server, minus re-raising the stop signal once shut down: the caller still has work to do
    (stopping the engines), which a re-raised SIGTERM would cut short. Once started it freezes what start-up
    made (``gc.freeze``) and times every garbage collection into the gateway's metrics."""

    GC_FLUSH_S = 1.0
    """How often the collections' pauses reach the metrics (see ``GCWatch``)."""

    def __init__(self, config: uvicorn.Config, metrics: GatewayMetrics | None = None) -> None:
        super().__init__(config)
        self.metrics = metrics
        self.gc_watch: GCWatch | None = None
        self._gc_flusher: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # Start-up objects (the app, its routes and schemas, settings, clients) live as long as the process; a
        # full collection would walk all of them (~50 ms on these CPUs, a stall every request in flight waits
        # out). Frozen, a full collection walks only what serving made.
        gc.freeze()
        if self.metrics is not None:
            self.gc_watch = GCWatch(self.metrics)
            self._gc_flusher = asyncio.get_running_loop().create_task(self._flush_gc(self.gc_watch))

    async def _flush_gc(self, watch: GCWatch) -> None:
        while True:
            await asyncio.sleep(self.GC_FLUSH_S)
            watch.flush()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._gc_flusher is not None:
            self._gc_flusher.cancel()
        if self.gc_watch is not None:
            self.gc_watch.stop()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _metrics_of(app: FastAPI) -> GatewayMetrics | None:
    metrics = getattr(app.state, "metrics", None)
    return metrics if isinstance(metrics, GatewayMetrics) else None


def serve_on(app: FastAPI, sockets: list[socket.socket], log_level: str = "info") -> None:
    """Serve ``app`` on sockets made elsewhere (a serving worker's inherited listening socket)."""
    server = _Server(uvicorn_config(app, "", 0, log_level), _metrics_of(app))
    server.run(sockets=sockets)


def run_gateway(
    app: FastAPI, host: str, port: int, log_level: str = "info", workers: Workers | None = None
) -> int | None:
    """Serve until SIGINT/SIGTERM; returns after a graceful shutdown, with the signal that asked for it.

    With ``workers``, this process is the primary: it binds the port, starts the serving workers on the same
    listening socket once it serves itself, and stops them when it stops."""
    config = uvicorn_config(app, host, port, log_level)
    server = _Server(config, _metrics_of(app))
    if workers is None:
        server.run()
        return server._captured_signals[0] if server._captured_signals else None
    sockets = workers.sockets(config.bind_socket())

    def start_when_serving() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            workers.start(shutting_down=lambda: server.should_exit)

    threading.Thread(target=start_when_serving, name="shipyard-workers-start", daemon=True).start()
    try:
        server.run(sockets=sockets)
    finally:
        workers.stop()
    return server._captured_signals[0] if server._captured_signals else None
