"""Replicas found by DNS: every address a name resolves to is one replica (a Kubernetes headless Service
resolves to its ready pods), re-resolved every few seconds.

An upstream written ``dns+http://NAME:PORT`` (or ``dns+https://``) is such a target; ``#DEPLOYMENT`` at the end
names the deployment its replicas join (default ``blue``), e.g. ``dns+http://shipyard-engine-green:8000#green``.
A replica whose address disappears leaves the pool (requests it is answering finish; new ones go elsewhere); a
failed lookup changes nothing (a DNS blip must not empty the pool).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence

from shipyard.router.loop import BackgroundLoop
from shipyard.router.replica import Replica, ReplicaPool
from shipyard.upstreams import DiscoveryTarget

log = logging.getLogger("shipyard.router")

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (IPv4 and IPv6), sorted, without duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class UpstreamDiscovery(BackgroundLoop):
    """Keeps the pool's replicas of each target equal to what its name resolves to."""

    task_name = "shipyard-discovery"

    def __init__(
        self,
        pool: ReplicaPool,
        targets: Sequence[DiscoveryTarget],
        interval_s: float = 10.0,
        resolver: Resolver = resolve,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.targets = list(targets)
        self.interval_s = interval_s
        self.resolver = resolver
        self._found: dict[DiscoveryTarget, dict[str, Replica]] = {t: {} for t in self.targets}

    async def refresh(self) -> None:
        for target in self.targets:
            try:
                addresses = set(await self.resolver(target.host, target.port))
            except (OSError, UnicodeError) as exc:
                log.warning(
                    "could not resolve %s (keeping %d replicas): %s", target.label, len(self._found[target]), exc
                )
                continue
            known = self._found[target]
            for address in sorted(addresses - set(known)):
                replica = Replica(
                    target.url(address), name=f"{target.deployment}@{target.url(address)}", deployment=target.deployment
                )
                self.pool.add(replica)
                known[address] = replica
                log.info("discovered replica %s for %s", replica.url, target.label)
            for address in sorted(set(known) - addresses):
                replica = known.pop(address)
                self.pool.remove(replica)
                log.info(
                    "replica %s left %s (%d requests in flight finish there)",
                    replica.url,
                    target.label,
                    replica.in_flight,
                )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()

    def start(self) -> None:
        if self.targets:
            super().start()
