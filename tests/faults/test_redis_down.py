"""Redis stopped: gateways keep serving; a gateway starting while it is down serves the last state it knew.

Promises: a gateway never crash-loops because the shared state store is down when it has a local copy of the
last state it read; it says so (/ready, rollout status, its log); rollouts are refused until Redis answers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from shipyard.control.audit import AuditLog
from shipyard.control.commands import RolloutCommand, RolloutRejected
from shipyard.control.plane import ControlConfig, ControlPlane
from shipyard.control.store import RedisStateStore, open_store
from shipyard.router.replica import Replica, ReplicaPool
from tests.services import start_redis
from tests.test_control import FakeLauncher, engines


def plane(store: RedisStateStore, replicas: list[Replica]) -> ControlPlane:
    return ControlPlane(
        ReplicaPool(replicas),
        httpx.AsyncClient(transport=httpx.MockTransport(engines)),
        store,
        FakeLauncher(),
        audit=AuditLog(None),
        config=ControlConfig(watch_interval_s=0.05, lease_ttl_s=1.0),
    )


def test_a_gateway_starting_while_redis_is_down_serves_its_last_state_and_says_so(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"

    async def body(url: str) -> None:
        store = open_store(f"{url}?prefix=down", data_dir)
        assert isinstance(store, RedisStateStore) and store.local_copy is not None
        first = plane(store, [Replica("http://blue.test", name="blue-0", deployment="blue", version="v1")])
        await first.start()
        assert first.state.revision == 1 and store.local_copy.exists()
        await first.stop()
        await store.close()
        await first.client.aclose()

    async def after(url: str) -> None:
        store = open_store(f"{url}?prefix=down", data_dir)
        assert isinstance(store, RedisStateStore)
        second = plane(store, [])  # what the state says is served, not what the command line seeds
        await asyncio.wait_for(second.start(), 30)
        assert [r.name for r in second.pool.replicas] == ["blue-0"]
        degraded = second.describe()["state"]["degraded"]
        assert degraded and "unreachable" in degraded and "revision 1" in degraded
        with pytest.raises(RolloutRejected):
            await second.request(RolloutCommand("http://green.test:8000", version="v2"))
        await second.stop()
        await store.close()
        await second.client.aclose()

    with start_redis(tmp_path / "redis") as server:
        url = server.url
        asyncio.run(body(url))
    asyncio.run(after(url))  # Redis is stopped now


def test_without_a_local_copy_an_unreachable_redis_is_a_clear_error(tmp_path: Path) -> None:
    async def body(url: str) -> None:
        store = open_store(f"{url}?prefix=never", tmp_path / "data")
        import redis

        with pytest.raises(redis.ConnectionError):
            await store.load()
        await store.close()

    with start_redis(tmp_path / "redis") as server:
        url = server.url
    asyncio.run(body(url))
