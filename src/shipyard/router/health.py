"""The executor that keeps replica readiness current: polls ``/health`` and ``/v1/models``."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx

from shipyard.router.replica import Replica, ReplicaPool

log = logging.getLogger("shipyard.router")


async def probe(client: httpx.AsyncClient, replica: Replica, timeout: float = 2.0) -> None:
    """Update one replica's readiness and model list in place; log when readiness changes."""
    was_ready = replica.ready
    await _probe(client, replica, timeout)
    if replica.ready != was_ready:
        if replica.ready:
            log.info("replica %s is ready (%s)", replica.name, ", ".join(sorted(replica.models)))
        else:
            log.warning("replica %s is not ready: %s", replica.name, replica.last_error)


async def _probe(client: httpx.AsyncClient, replica: Replica, timeout: float) -> None:
    try:
        health = await client.get(f"{replica.url}/health", timeout=timeout)
        if health.status_code != 200:
            replica.ready, replica.last_error = False, f"/health answered {health.status_code}"
            return
        listing = await client.get(f"{replica.url}/v1/models", timeout=timeout)
        listing.raise_for_status()
        replica.models = {str(card["id"]): card.get("max_model_len") for card in listing.json().get("data", [])}
        replica.ready, replica.last_error = bool(replica.models), "" if replica.models else "serves no model"
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        replica.ready, replica.last_error = False, f"{type(exc).__name__}: {exc}"


class HealthMonitor:
    """Probes every replica of a pool every ``interval_s`` seconds in a background task."""

    def __init__(self, pool: ReplicaPool, client: httpx.AsyncClient, interval_s: float = 1.0) -> None:
        self.pool = pool
        self.client = client
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def check_all(self) -> None:
        await asyncio.gather(*(probe(self.client, r, timeout=max(self.interval_s, 1.0)) for r in self.pool.replicas))

    async def _run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="shipyard-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
