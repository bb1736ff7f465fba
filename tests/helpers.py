"""Test plumbing: real uvicorn servers on loopback in background threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

import httpx
import uvicorn

from shipyard.engine import free_port


class ServerThread:
    """Serves an ASGI app on 127.0.0.1:<free port> until the context exits."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            loop="asyncio",
            http="h11",
            access_log=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def healthy(url: str) -> bool:
    """True when ``url``/health answers 200; a refused or dropped connection is simply "not yet"."""
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def ready(url: str, timeout: float = 1.0) -> bool:
    """True when ``url``/ready answers 200 (a gateway with a ready replica); not answering is "not yet"."""
    try:
        return httpx.get(f"{url}/ready", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def outcomes_when_killed(
    open_stream: Callable[[], Iterable[Any]], streams: int, kill: Callable[[], None], settle_s: float = 0.3
) -> tuple[list[tuple[str, float]], float]:
    """Start ``streams`` streaming requests, kill their upstream once each has a first chunk, and return every
    stream's outcome ("finished" or the error it raised) with the time it ended, plus the time of the kill."""
    import openai

    outcomes: list[tuple[str, float]] = []
    started = threading.Barrier(streams + 1)

    def consume() -> None:
        chunks = iter(open_stream())
        try:
            next(chunks)
            started.wait(timeout=60)
            for _ in chunks:
                pass
            outcomes.append(("finished", time.monotonic()))
        except openai.APIError as exc:
            outcomes.append((str(exc), time.monotonic()))

    threads = [threading.Thread(target=consume) for _ in range(streams)]
    for thread in threads:
        thread.start()
    started.wait(timeout=60)
    time.sleep(settle_s)
    killed_at = time.monotonic()
    kill()
    for thread in threads:
        thread.join(timeout=30)
    return outcomes, killed_at
