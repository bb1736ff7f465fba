"""The control plane in milliseconds: a fake launcher, httpx.MockTransport engines, in-memory stores."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from shipyard.router.audit import AuditLog
from shipyard.router.commands import RolloutCommand, RolloutRejected
from shipyard.router.control import ControlConfig, ControlPlane
from shipyard.router.replica import Replica, ReplicaPool
from shipyard.router.rollout import Action, Gate, Observation, Phase, Rollout, RolloutPlan, next_action
from shipyard.router.state import DeploymentState, ReplicaRecord
from shipyard.router.store import MemoryStateStore


def engines(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/health":
        return httpx.Response(200)
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 512}]})
    return httpx.Response(200, json={"choices": [{"message": {"content": "ok"}}]})


class FakeHandle:
    def __init__(self, url: str) -> None:
        self.url = url
        self.running = False
        self.stopped = False

    def alive(self) -> bool:
        return self.running

    def identity(self) -> dict[str, Any]:
        return {}

    def spawn(self) -> None:
        self.running = True

    async def wait_ready(self) -> None:
        return None

    async def restart(self) -> None:
        self.running = True

    async def stop(self) -> None:
        self.running, self.stopped = False, True


class FakeLauncher:
    def __init__(self) -> None:
        self.launched: dict[str, FakeHandle] = {}

    def check(self, target: str) -> None:
        if target == "missing":
            raise ValueError("model folder missing does not exist")

    def prepare(self, target: str, name: str, **_: Any) -> FakeHandle:
        handle = self.launched[name] = FakeHandle(f"http://{name}.test")
        return handle

    def adopt(self, identity: Any, url_port: int, name: str) -> FakeHandle:
        raise ProcessLookupError(name)


class RecordingStore(MemoryStateStore):
    def __init__(self) -> None:
        super().__init__()
        self.saved: list[DeploymentState] = []

    async def save(self, state: DeploymentState) -> None:
        await super().save(state)
        self.saved.append(state)


def plane(store: MemoryStateStore, replicas: list[Replica], **config: Any) -> ControlPlane:
    client = httpx.AsyncClient(transport=httpx.MockTransport(engines))
    return ControlPlane(
        ReplicaPool(replicas),
        client,
        store,
        FakeLauncher(),
        audit=AuditLog(None),
        config=ControlConfig(watch_interval_s=0.01, drain_timeout_s=1, **config),
    )


async def until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(wait(), timeout)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def test_next_action_walks_the_phases_and_resolves_interruptions() -> None:
    plan = RolloutPlan("/m/v2", "v2", "green", "blue", gate=Gate("intent", 0.5))
    rollout = Rollout(plan)
    assert next_action(rollout, Observation()) is Action.PREPARE
    walk = [
        (Phase.STARTING, Action.WARM_UP),
        (Phase.WARMING, Action.GATE),
        (Phase.GATING, Action.SWITCH),
        (Phase.SWITCHING, Action.DRAIN),
        (Phase.DRAINING, Action.FINISH),
    ]
    for phase, action in walk:
        rollout.advance(phase)
        assert next_action(rollout, Observation()) is not action  # not before the phase's step is done
        assert next_action(rollout, Observation(done=True)) is action
    rollout.advance(Phase.DONE)
    assert next_action(rollout, Observation(done=True)) is Action.NOTHING

    expected = {
        Phase.PENDING: Action.ABORT,
        Phase.STARTING: Action.ABORT,
        Phase.WARMING: Action.ABORT,
        Phase.GATING: Action.ABORT,
        Phase.CANARY: Action.AWAIT_PROMOTE,
        Phase.SWITCHING: Action.DRAIN,
        Phase.DRAINING: Action.DRAIN,
    }
    canary = RolloutPlan("/m/v2", "v2", "green", "blue", canary_percent=10)
    for phase, action in expected.items():
        assert next_action(Rollout(canary, phase=phase), Observation(interrupted=True)) is action, phase
    assert next_action(Rollout(canary, phase=Phase.WARMING), Observation(error="boom")) is Action.ABORT
    assert next_action(Rollout(canary, phase=Phase.ROLLED_BACK), Observation()) is Action.RETIRE_NEW


def test_blue_green_saves_every_phase_before_it_takes_effect() -> None:
    async def body() -> None:
        store = RecordingStore()
        control = plane(store, [Replica("http://blue.test", name="blue-v1", deployment="blue", version="v1")])
        await control.start()
        rollout = await control.request(RolloutCommand("/models/v2", version="v2", who="admin:ops"))
        await until(lambda: rollout.phase is Phase.DONE)
        phases = [s.rollout["phase"] for s in store.saved if s.rollout]
        assert [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]] == [
            "pending",
            "starting",
            "warming",
            "switching",
            "draining",
            "done",
        ]
        switched = next(s for s in store.saved if s.rollout and s.rollout["phase"] == "switching")
        assert switched.weights == {"green": 1.0, "blue": 0.0}
        final = await store.load()
        assert final is not None and [r.name for r in final.replicas] == ["green-v2"]
        assert final.weights == {"green": 1.0} and final.history[-1]["phase"] == "done"
        assert [r.name for r in control.pool.replicas] == ["green-v2"]
        assert await store.lease_owner() is None  # released at the end
        await control.stop()

    run(body)


def interrupted_state(phase: Phase, canary: bool = False) -> DeploymentState:
    plan = RolloutPlan("/models/v2", "v2", "green", "blue", canary_percent=10 if canary else None)
    rollout = Rollout(plan, phase=phase)
    weights = {"blue": 1.0, "green": 0.0}
    if phase in (Phase.SWITCHING, Phase.DRAINING):
        weights = {"green": 1.0, "blue": 0.0}
    elif phase is Phase.CANARY:
        weights = {"green": 0.1, "blue": 0.9}
    replicas = [
        ReplicaRecord("blue-v1", "http://blue.test", "blue", "v1"),
        ReplicaRecord("green-v2", "http://green.test", "green", "v2"),
    ]
    return DeploymentState().evolve(by="dead-gateway", replicas=replicas, weights=weights, rollout=rollout.to_record())


@pytest.mark.parametrize(
    "phase", [Phase.PENDING, Phase.STARTING, Phase.WARMING, Phase.GATING, Phase.CANARY, Phase.SWITCHING, Phase.DRAINING]
)
def test_a_restarted_gateway_resolves_a_rollout_interrupted_in_any_phase(phase: Phase) -> None:
    async def body() -> None:
        store = MemoryStateStore()
        await store.save(interrupted_state(phase, canary=phase is Phase.CANARY))
        control = plane(store, [])
        handles = {name: FakeHandle(url) for name, url in [("blue-v1", "b"), ("green-v2", "g")]}
        for name, handle in handles.items():
            handle.running = True
            control.supervisor.manage(name, handle)
        await control.start()
        current = control.current
        assert current is not None
        if phase is Phase.CANARY:
            await asyncio.sleep(0.05)
            assert current.phase is Phase.CANARY and control.pool.weights == {"green": 0.1, "blue": 0.9}
            await control.promote("admin:ops")
            await until(lambda: current.phase is Phase.DONE)
            survivor = "green-v2"
        elif phase in (Phase.SWITCHING, Phase.DRAINING):
            await until(lambda: current.phase is Phase.DONE)
            survivor = "green-v2"
        else:
            await until(lambda: current.phase is Phase.FAILED)
            assert f"interrupted in phase {phase.value}" in (current.error or "")
            survivor = "blue-v1"
        state = await store.load()
        assert state is not None and [r.name for r in state.replicas] == [survivor]
        assert state.weights.get(survivor.split("-")[0]) == 1.0
        retired = "blue-v1" if survivor == "green-v2" else "green-v2"
        assert handles[retired].stopped and not handles[survivor].stopped
        await control.stop()

    run(body)


def test_two_gateways_follow_one_state_and_a_dead_owners_rollout_is_taken_over() -> None:
    async def body() -> None:
        store = MemoryStateStore()
        blue = [Replica("http://blue.test", name="blue-v1", deployment="blue", version="v1")]
        one = plane(store, blue, lease_ttl_s=0.2, gateway_id="one")
        two = plane(store, [], lease_ttl_s=0.2, gateway_id="two")
        await one.start()
        await two.start()
        assert [r.name for r in two.pool.replicas] == ["blue-v1"]
        rollout = await one.request(RolloutCommand("/models/v2", version="v2", canary_percent=10))
        await until(lambda: rollout.phase is Phase.CANARY)
        await until(lambda: two.pool.weights == {"green": 0.1, "blue": 0.9})
        assert {r.name for r in two.pool.replicas} == {"blue-v1", "green-v2"}
        with pytest.raises(RolloutRejected, match="one at a time|still canary"):
            await two.request(RolloutCommand("/models/v3", version="v3"))
        with pytest.raises(RolloutRejected, match="runs on another gateway"):
            await two.promote("admin:ops")

        for task in list(one._tasks):  # gateway one dies: no release, no more renewals
            task.cancel()
        await asyncio.sleep(0.3)
        await until(lambda: two.current is not None and two._running_here())
        await two.promote("admin:ops")
        await until(lambda: two.current is not None and two.current.phase is Phase.DONE)
        assert [r.name for r in two.pool.replicas] == ["green-v2"] and two.pool.weights == {"green": 1.0}
        await two.stop()

    run(body)


def test_bad_commands_change_nothing() -> None:
    async def body() -> None:
        store = RecordingStore()
        control = plane(store, [Replica("http://blue.test", name="blue-v1", deployment="blue", version="v1")])
        await control.start()
        before = len(store.saved)
        for command, status in [
            (RolloutCommand("missing"), 400),
            (RolloutCommand("/m/v1", version="v1"), 409),
            (RolloutCommand("/m/v2", canary_percent=100), 400),
            (RolloutCommand("/m/v2", gate="intent:min_acc=0.5"), 400),
        ]:
            with pytest.raises(RolloutRejected) as caught:
                await control.request(command)
            assert caught.value.status == status
        assert len(store.saved) == before and await store.lease_owner() is None
        await control.stop()

    run(body)
