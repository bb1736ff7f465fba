"""Redis partitioned from the gateway running a rollout (only that one): a real redis-server, two gateways'
control planes, and a TCP proxy that cuts the owner's link.

Promises: the owner stops acting before its lease can be taken (renew deadline shorter than the TTL, as
client-go's leader election does); every save is fenced by the lease's token, so a stale owner's write is
refused; the other gateway finishes the rollout; both keep serving the state they last applied.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shipyard.control.audit import AuditLog
from shipyard.control.commands import RolloutCommand
from shipyard.control.plane import ControlConfig, ControlPlane
from shipyard.control.rollout import Phase
from shipyard.control.state import DeploymentState, ReplicaRecord
from shipyard.control.store import Fence, LeaseLost, RedisStateStore
from shipyard.router.replica import ReplicaPool
from tests.faults.report import record
from tests.faults.tcp import PartitionableProxy
from tests.services import RedisServer, start_redis
from tests.test_control import FakeLauncher, checkpoint_folder, engines, until

TTL_S = 1.5
RELOAD_S = 0.6


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with start_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


class Engines:
    """MockTransport engines shared by both gateways; every dev-route call is logged with its time and caller."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str, str, str]] = []

    def transport(self, gateway: str) -> httpx.MockTransport:
        async def handle(request: httpx.Request) -> httpx.Response:
            path = request.url.path
            if path in ("/pause", "/resume", "/reset_prefix_cache", "/collective_rpc"):
                step = path[1:]
                if path == "/collective_rpc":
                    step = "reload " + Path(json.loads(request.content)["kwargs"]["weights_path"]).name
                self.calls.append((time.monotonic(), gateway, request.url.host, step))
                if path == "/collective_rpc":
                    await asyncio.sleep(RELOAD_S)
                return httpx.Response(200, json={})
            return engines(request)

        return httpx.MockTransport(handle)


def gateway(name: str, url: str, prefix: str, engines_: Engines) -> ControlPlane:
    return ControlPlane(
        ReplicaPool([]),
        httpx.AsyncClient(transport=engines_.transport(name)),
        RedisStateStore(url, prefix=prefix),
        FakeLauncher(),
        audit=AuditLog(None),
        config=ControlConfig(watch_interval_s=0.05, drain_timeout_s=1, lease_ttl_s=TTL_S, gateway_id=name),
    )


def _when(control: ControlPlane, action: str) -> float | None:
    """Monotonic time of the first audit entry ``action`` (entries carry wall time; convert)."""
    for entry in control.audit.entries:
        if entry["action"] == action:
            return entry["_mono"]  # type: ignore[no-any-return]
    return None


def _stamp(control: ControlPlane) -> None:
    record = control.audit.record

    def stamped(who: str, action: str, **details: object) -> None:
        record(who, action, **details)
        control.audit.entries[-1]["_mono"] = time.monotonic()

    control.audit.record = stamped  # type: ignore[method-assign]


def test_a_partitioned_owner_stops_before_its_lease_passes_and_its_stale_saves_are_refused(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async def body() -> None:
        v1, v2 = checkpoint_folder(tmp_path, "v1"), checkpoint_folder(tmp_path, "v2")
        names = ["blue-a", "blue-b", "blue-c", "blue-d"]
        records = [
            ReplicaRecord(n, f"http://{n}.test", "blue", "v1", v1, engine={"model": v1, "served_model_name": "m"})
            for n in names
        ]
        prefix = f"partition-{time.monotonic_ns()}"
        seed = RedisStateStore(redis_server.url, prefix=prefix)
        await seed.save(DeploymentState().evolve(by="t", replicas=records, weights={"blue": 1.0}))
        await seed.close()
        proxy = await PartitionableProxy(redis_server.port).start()
        shared = Engines()
        owner = gateway("owner", proxy.url, prefix, shared)
        other = gateway("other", redis_server.url, prefix, shared)
        for control in (owner, other):
            _stamp(control)
            await control.start()
        await until(lambda: all(r.ready for c in (owner, other) for r in c.pool.replicas))

        rollout = await owner.request(RolloutCommand(v2, version="v2", strategy="inplace"))
        await until(lambda: any(step == "reload v2" for _, _, _, step in shared.calls), timeout=5)
        token = owner._lease_token
        assert token is not None
        proxy.partition()
        cut = time.monotonic()
        stopped: list[float] = []

        async def watch_owner() -> None:
            while owner.running_here():
                await asyncio.sleep(0.005)
            stopped.append(time.monotonic())

        watcher = asyncio.get_running_loop().create_task(watch_owner())

        await until(lambda: _when(other, "rollout_taken_over") is not None, timeout=TTL_S * 6)
        taken = _when(other, "rollout_taken_over")
        lost = _when(owner, "lease_lost")
        await watcher
        assert taken is not None and lost is not None, "the owner never noticed it lost the lease"
        assert lost < taken and stopped[0] < taken, "the owner still acted when the other gateway took over"
        assert lost - cut <= TTL_S, f"the owner acted {lost - cut:.2f} s into the partition (TTL {TTL_S} s)"
        late = [c for c in shared.calls if c[1] == "owner" and c[0] >= taken]
        assert not late, f"the stale owner still drove engines after the takeover: {late}"
        assert owner.pool.replicas and owner.pool.ready(), "the cut-off gateway stopped serving its last state"
        record(
            f"Redis partitioned from the rollout owner only (TTL {TTL_S} s, renew deadline {TTL_S * 2 / 3:g} s)",
            "the owner stops before the lease passes; its stale saves are refused; the other gateway finishes",
            owner_stopped_after_s=round(lost - cut, 2),
            taken_over_after_s=round(taken - cut, 2),
            owner_engine_calls_after_takeover=len(late),
        )

        current = other.current
        assert current is not None
        await until(lambda: current.phase in (Phase.DONE, Phase.FAILED) and not other.running_here(), timeout=20)
        proxy.heal()
        stale = owner.state.evolve(by="owner", replicas=[])
        with pytest.raises(LeaseLost):  # what the stale owner may still try, once it reaches Redis again
            await owner.store.save(stale, fence=Fence("owner", token))
        reader = RedisStateStore(redis_server.url, prefix=prefix)
        final = await reader.load()
        assert final is not None and len(final.replicas) == len(names)
        assert not any(r.held for r in final.replicas), "a hold outlived the rollout"
        assert len({r.version for r in final.replicas}) == 1, "replicas left on different versions"
        assert rollout.id == current.id
        for control in (owner, other):
            await control.stop()
            await control.store.close()
            await control.client.aclose()
        await reader.close()
        await proxy.close()

    asyncio.run(body())


def test_a_save_fenced_by_an_older_token_is_refused_by_redis(redis_server: RedisServer) -> None:
    async def body() -> None:
        store = RedisStateStore(redis_server.url, prefix=f"fence-{time.monotonic_ns()}")
        first = await store.acquire_lease("a", 0.1)
        assert first is not None
        await store.save(DeploymentState().evolve(by="a"), fence=Fence("a", first))
        await asyncio.sleep(0.15)  # a's lease runs out; b takes it
        second = await store.acquire_lease("b", 5)
        assert second is not None and second > first
        state = await store.load()
        assert state is not None
        with pytest.raises(LeaseLost):
            await store.save(state.evolve(by="a"), fence=Fence("a", first))
        await store.save(state.evolve(by="b"), fence=Fence("b", second))
        assert await store.acquire_lease("b", 5) == second  # renewing keeps the token
        await store.close()

    asyncio.run(body())
