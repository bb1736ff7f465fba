"""The executor that keeps replica readiness current: polls ``/health`` and ``/v1/models``."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx

from shipyard.router.fleet import Fleet
from shipyard.router.loop import BackgroundLoop
from shipyard.router.replica import Replica, ReplicaPool

log = logging.getLogger("shipyard.router")

SLOW_PROBES_TO_UNREADY = 3
"""A ready replica whose probes time out this many times in a row is taken out. One slow answer is not enough:
a saturated engine (or a saturated gateway loop) answers /health late while it still serves every request —
seen on an H200 at 400 intent req/s, where taking the only replica out on the first 1 s timeout turned a slow
service into 1,898 503s. Refused connections and non-200 answers still take a replica out at once."""


async def probe(
    client: httpx.AsyncClient, replica: Replica, timeout: float = 5.0, pool: ReplicaPool | Fleet | None = None
) -> None:
    """Update one replica's readiness and model list in place; log when readiness changes. With ``pool``, a
    replica found hung (see :func:`hung`) is ejected from it: requests waiting on it stop waiting."""
    was_ready = replica.ready
    if await _probe(client, replica, timeout) and pool is not None:
        pool.eject(replica, replica.last_error)
    if replica.ready and not was_ready and time.monotonic() < replica.held_out_until and pool is not None:
        others = [r for r in pool.replicas if r is not replica and r.ready and r.models.keys() & replica.models.keys()]
        if others:  # back too soon after an ejection: held out a while longer (unless it is all there is)
            replica.ready = False
            replica.last_error = (
                f"ejected {replica.ejections} time(s) in a row: held out for "
                f"{replica.held_out_until - time.monotonic():.1f} s more although it answers again"
            )
    if replica.ready != was_ready:
        if replica.ready:
            log.info("replica %s is ready (%s)", replica.name, ", ".join(sorted(replica.models)))
        else:
            log.warning("replica %s is not ready: %s", replica.name, replica.last_error)


async def _probe(client: httpx.AsyncClient, replica: Replica, timeout: float) -> bool:
    """True when the probe found the replica hung (see :func:`hung`)."""
    try:
        health = await client.get(f"{replica.url}/health", timeout=timeout)
        replica.slow_probes, replica.unresponsive_since = 0, None
        if health.status_code != 200:
            replica.ready, replica.last_error = False, f"/health answered {health.status_code}"
            return False
        listing = await client.get(f"{replica.url}/v1/models", timeout=timeout)
        listing.raise_for_status()
        cards = listing.json().get("data", [])
        replica.models = {str(card["id"]): card.get("max_model_len") for card in cards}
        replica.roots = tokenizer_roots(cards)
        replica.ready, replica.last_error = bool(replica.models), "" if replica.models else "serves no model"
    except httpx.TimeoutException as exc:
        replica.slow_probes += 1
        if replica.unresponsive_since is None:
            replica.unresponsive_since = time.monotonic() - timeout
        stuck = hung(replica, timeout)
        if not replica.ready or replica.slow_probes >= SLOW_PROBES_TO_UNREADY or stuck:
            replica.ready = False
            replica.last_error = (
                f"{replica.slow_probes} health probe(s) in a row timed out ({type(exc).__name__}) and no answer "
                f"made progress for {time.monotonic() - replica.last_byte_at:.1f} s"
            )
        else:
            log.info("replica %s answered its health probe late (%d in a row)", replica.name, replica.slow_probes)
        return stuck
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        replica.ready, replica.last_error = False, f"{type(exc).__name__}: {exc}"
        return replica.slow_probes > 0 and hung(replica, timeout)  # late before, failing now: still hung
    return False


def hung(replica: Replica, timeout: float) -> bool:
    """A replica whose health probe timed out is *hung*, not busy, when this process is waiting on it and none
    of its answers made progress (sent a byte) within the probe's timeout either: a saturated engine answers
    /health late but still streams. A process with nothing in flight there has no evidence either way (an idle
    gateway worker): its late probes count towards ``SLOW_PROBES_TO_UNREADY`` instead. A held replica is being
    paused and reloaded by shipyard: a stream that slipped in before the hold stalls through the reload, and
    cutting it would fail a request the update promised to finish."""
    if replica.hold is not None:  # paused by shipyard itself (an in-place reload): silent, not hung
        return False
    return replica.in_flight > 0 and time.monotonic() - replica.last_byte_at > timeout


def tokenizer_roots(cards: list[dict[str, Any]]) -> dict[str, str]:
    """Model id -> the folder of its tokenizer, from vLLM's model cards (``root``; a LoRA card names its base in
    ``parent``). Servers that list no ``root`` give none."""
    roots = {str(card["id"]): str(card["root"]) for card in cards if card.get("root") and not card.get("parent")}
    for card in cards:
        if card.get("parent") and str(card["parent"]) in roots:
            roots[str(card["id"])] = roots[str(card["parent"])]
    return roots


class HealthMonitor(BackgroundLoop):
    """Probes every replica of a pool every ``interval_s`` seconds in a background task."""

    task_name = "shipyard-health"

    def __init__(
        self, pool: ReplicaPool | Fleet, client: httpx.AsyncClient, interval_s: float = 1.0, timeout_s: float = 2.0
    ) -> None:
        super().__init__()
        self.pool = pool
        self.client = client
        self.interval_s = interval_s
        self.timeout_s = timeout_s

    async def check_all(self) -> None:
        await asyncio.gather(*(probe(self.client, r, self.timeout_s, self.pool) for r in self.pool.replicas))

    async def _run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval_s)
