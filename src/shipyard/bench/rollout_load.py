"""Streaming clients that keep a gateway busy while something changes (a rollout, a crash), recording every
request's outcome and the version that served it.

>>> with StreamingClients(url, api_key, model, clients=16) as load:   # doctest: +SKIP
...     deploy_new_version()
>>> load.summary()["failed"]                                          # doctest: +SKIP
0
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from types import TracebackType
from typing import Any

import aiohttp

from shipyard.bench.load import RequestRecord, send_request
from shipyard.bench.scenarios import RequestSpec


class StreamingClients:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        model: str,
        *,
        clients: int = 16,
        max_tokens: int = 32,
        prompt: str = "Tell me about ships.",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
        self.spec = RequestSpec("/v1/chat/completions", {**body, "ignore_eos": True, "stream": True}, stream=True)
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.clients = clients
        self.records: list[RequestRecord] = []
        self.origin = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="streaming-clients")

    def __enter__(self) -> StreamingClients:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def stop(self, timeout: float = 120.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def now(self) -> float:
        """Seconds since the load began, on the clock the records use."""
        return time.perf_counter() - self.origin

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

            async def client() -> None:
                while not self._stop.is_set():
                    record = await send_request(session, self.base_url, self.headers, self.spec, self.origin)
                    self.records.append(record)
                    if not record.ok:
                        await asyncio.sleep(0.05)  # a client that backs off a little, not a tight error loop

            await asyncio.gather(*(client() for _ in range(self.clients)))

    def summary(self) -> dict[str, Any]:
        records = list(self.records)
        failed = [r for r in records if not r.ok]
        return {
            "requests": len(records),
            "failed": len(failed),
            "truncated": sum(1 for r in failed if r.error and "truncated" in r.error),
            "errors": sorted({r.error or f"HTTP {r.status}" for r in failed})[:5],
            "served_by_version": dict(Counter(r.version or "?" for r in records)),
        }

    def last_start_on(self, version: str) -> float | None:
        """When (load clock) the last request served by ``version`` started."""
        starts = [r.started for r in self.records if r.version == version]
        return max(starts) if starts else None

    def first_start_on(self, version: str) -> float | None:
        starts = [r.started for r in self.records if r.version == version]
        return min(starts) if starts else None
