"""Running the gateway app under uvicorn (uvloop + httptools when available)."""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import threading
from collections.abc import Iterator
from typing import Literal

import uvicorn
from fastapi import FastAPI


def fast_loop() -> Literal["uvloop", "asyncio"]:
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def fast_http() -> Literal["httptools", "h11"]:
    return "httptools" if importlib.util.find_spec("httptools") else "h11"


def uvicorn_config(app: FastAPI, host: str, port: int, log_level: str = "info") -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop=fast_loop(),
        http=fast_http(),
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=10,
    )


class _Server(uvicorn.Server):
    """uvicorn's server, minus re-raising the stop signal once shut down: the caller still has work to do
    (stopping the engines), which a re-raised SIGTERM would cut short."""

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


def run_gateway(app: FastAPI, host: str, port: int, log_level: str = "info") -> int | None:
    """Serve until SIGINT/SIGTERM; returns after a graceful shutdown, with the signal that asked for it."""
    server = _Server(uvicorn_config(app, host, port, log_level))
    server.run()
    return server._captured_signals[0] if server._captured_signals else None
