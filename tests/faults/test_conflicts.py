"""Two writers of one state, and a drain that cannot read the other gateways' load.

Promises: a save that lost a race is re-applied as the change it was (per replica, per key) over the newer
state, never as lists read from the older one, so a supervisor's record of a restarted engine is not overwritten
by a stale copy; a drain that cannot read the other gateways' in-flight counts waits (fails closed) instead of
stopping an engine under their streams.
"""

from __future__ import annotations

import asyncio
import dataclasses

import httpx

from shipyard.control.audit import AuditLog
from shipyard.control.plane import ControlConfig, ControlPlane
from shipyard.control.rollout import Phase, Rollout, RolloutPlan
from shipyard.control.state import DeploymentState, ReplicaRecord
from shipyard.control.store import LoadReport, MemoryStateStore
from shipyard.control.strategies import wait_idle
from shipyard.router.replica import ReplicaPool
from tests.test_control import FakeLauncher, engines


def _plane(store: MemoryStateStore, watch_interval_s: float = 60, **config: object) -> ControlPlane:
    return ControlPlane(
        ReplicaPool([]),
        httpx.AsyncClient(transport=httpx.MockTransport(engines)),
        store,
        FakeLauncher(),
        audit=AuditLog(None),
        config=ControlConfig(watch_interval_s=watch_interval_s, **config),  # type: ignore[arg-type]
    )


def test_a_change_that_lost_a_race_is_rebased_not_replayed_from_the_older_state() -> None:
    async def body() -> None:
        store = MemoryStateStore()
        a = ReplicaRecord("a", "http://a.test", pid=100, started_at=1.0)
        b = ReplicaRecord("b", "http://b.test", pid=200, started_at=1.0)
        await store.save(DeploymentState().evolve(by="seed", replicas=[a, b], weights={"blue": 1.0}))
        control = _plane(store)
        await control.start()
        # another writer (a supervisor's restart of "a", saved by another process) wins the race
        stored = await store.load()
        assert stored is not None
        restarted = dataclasses.replace(a, pid=101, started_at=2.0)
        await store.save(stored.evolve(by="other", replicas=stored.with_replica(restarted)))
        # this gateway, still on the older state, holds "b" (its lists were read before the other save)
        await control.commit(replicas=control.state.with_replica(dataclasses.replace(b, held=True)))
        final = await store.load()
        assert final is not None
        assert final.replica("a") == restarted, "the other writer's record was overwritten by a stale copy"
        assert final.replica("b") is not None and final.replica("b").held  # type: ignore[union-attr]
        await control.stop()

    asyncio.run(body())


class Unreadable(MemoryStateStore):
    async def load_reports(self) -> list[LoadReport]:
        raise ConnectionError("redis went away")


def test_a_drain_that_cannot_read_the_other_gateways_load_waits_instead_of_stopping_early() -> None:
    async def body() -> None:
        control = _plane(Unreadable(), drain_timeout_s=0.3)
        rollout = Rollout(RolloutPlan("/m/v2", "v2", "green", "blue"))
        started = asyncio.get_running_loop().time()
        assert await wait_idle(control, rollout, replicas={"blue-0"}) is False  # timed out, never "idle"
        assert asyncio.get_running_loop().time() - started >= 0.3

    asyncio.run(body())


def test_a_gateway_without_the_rollout_lease_never_puts_the_owners_rollout_back_a_phase() -> None:
    """Issue 34 item 6: a non-owner whose copy of the rollout is older (canary) commits a change of its own after
    the owner saved the switch: the saved rollout stays the owner's (it was retried with the stale copy)."""

    async def body() -> None:
        store = MemoryStateStore()
        a = ReplicaRecord("a", "http://a.test")
        canary = Rollout(RolloutPlan("/m/v2", "v2", "green", "blue", canary_percent=10))
        for phase in (Phase.STARTING, Phase.WARMING, Phase.CANARY):
            canary.advance(phase)
        seed = DeploymentState().evolve(by="seed", replicas=[a], weights={"blue": 1.0}, rollout=canary.to_record())
        await store.save(seed)
        assert await store.acquire_lease("owner", 60) is not None  # the owner runs the rollout
        other = _plane(store)
        await other.start()  # the follower's copy: canary
        assert other.current is not None and other.current.phase is Phase.CANARY and not other.running_here()
        canary.advance(Phase.SWITCHING)  # the owner moves on and saves; the follower has not read it yet
        await store.save(seed.evolve(by="owner", rollout=canary.to_record()))
        await other.commit(replicas=other.state.with_replica(dataclasses.replace(a, held=True)))
        final = await store.load()
        assert final is not None and final.rollout is not None
        assert final.rollout["phase"] == Phase.SWITCHING.value, "a non-owner wrote its stale copy of the rollout"
        assert final.replica("a").held  # type: ignore[union-attr]
        await other.stop()

    asyncio.run(body())


def test_each_replica_carries_the_load_the_other_gateways_report_on_it() -> None:
    """Issue 34 item 8: the routing guard sees a replica's whole load, not this process's share of it."""

    async def body() -> None:
        store = MemoryStateStore()
        a = ReplicaRecord("a", "http://a.test")
        await store.save(DeploymentState().evolve(by="seed", replicas=[a], weights={"blue": 1.0}))
        control = _plane(store, watch_interval_s=0.02)
        await control.start()
        await store.report_load(LoadReport("other-gateway", 1, {"replica:a": 5, "model:m": 5}, 0.0), ttl_s=60)
        for _ in range(100):
            if control.pool.replicas[0].elsewhere_in_flight == 5:
                break
            await asyncio.sleep(0.02)
        assert control.pool.replicas[0].elsewhere_in_flight == 5
        await control.stop()

    asyncio.run(body())
