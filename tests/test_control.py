"""The control plane in milliseconds: a fake launcher, httpx.MockTransport engines, in-memory stores."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from shipyard.control.audit import AuditLog
from shipyard.control.commands import RolloutCommand, RolloutRejected
from shipyard.control.plane import ControlConfig, ControlPlane
from shipyard.control.rollout import Action, Gate, Observation, Phase, Rollout, RolloutPlan, next_action
from shipyard.control.state import DeploymentState, ReplicaRecord
from shipyard.control.store import Fence, MemoryStateStore
from shipyard.router.replica import Replica, ReplicaPool


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

    async def save(self, state: DeploymentState, fence: Fence | None = None) -> None:
        await super().save(state, fence)
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
            await until(lambda: current.phase is Phase.DONE and not control.running_here())
            survivor = "green-v2"
        elif phase in (Phase.SWITCHING, Phase.DRAINING):
            await until(lambda: current.phase is Phase.DONE and not control.running_here())
            survivor = "green-v2"
        else:
            await until(lambda: current.phase is Phase.FAILED and not control.running_here())
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
        await until(lambda: two.current is not None and two.running_here())
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


class EngineLog:
    """A MockTransport engine that records the dev routes it is called on (and can fail or hang a reload)."""

    def __init__(self, fail_reload_of: str | None = None, hang_reload_of: str | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_reload_of = fail_reload_of
        self.hang_reload_of = hang_reload_of
        self.paused: set[str] = set()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        if path == "/collective_rpc":
            folder = json.loads(request.content)["kwargs"]["weights_path"]
            self.calls.append((host, f"reload {Path(folder).name}"))
            await asyncio.sleep(30 if folder == self.hang_reload_of else 0.05)
            if folder == self.fail_reload_of:
                return httpx.Response(500, json={"error": {"message": "Error while deserializing header"}})
            return httpx.Response(200, json={"results": [None]})
        if path in ("/pause", "/resume", "/reset_prefix_cache"):
            self.calls.append((host, path[1:]))
            (self.paused.add if path == "/pause" else self.paused.discard)(host)
            return httpx.Response(200, json={})
        return engines(request)


def checkpoint_folder(root: Path, name: str, shape: tuple[int, ...] = (4, 4), layers: int = 2) -> str:
    from safetensors.numpy import save_file

    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": layers})
    )
    (folder / "tokenizer.json").write_text("{}")
    save_file(
        {f"layer.{i}.weight": np.zeros(shape, dtype=np.float32) for i in range(layers)},
        str(folder / "model.safetensors"),
    )
    return str(folder)


def in_place_plane(
    store: MemoryStateStore, engine: EngineLog, names: list[str], v1: str, **config: Any
) -> ControlPlane:
    client = httpx.AsyncClient(transport=httpx.MockTransport(engine))
    records = [
        ReplicaRecord(n, f"http://{n}.test", "blue", "v1", v1, engine={"model": v1, "served_model_name": "m"})
        for n in names
    ]
    paused: list[tuple[float, str]] = []
    control = ControlPlane(
        ReplicaPool([]),
        client,
        store,
        FakeLauncher(),
        audit=AuditLog(None),
        config=ControlConfig(watch_interval_s=0.01, drain_timeout_s=1, **config),
        on_pause=lambda seconds, strategy: paused.append((seconds, strategy)),
    )
    control.paused_seen = paused  # type: ignore[attr-defined]
    control._seed = DeploymentState().evolve(by="t", replicas=records, weights={"blue": 1.0})  # type: ignore[attr-defined]
    return control


def test_in_place_updates_replicas_one_at_a_time_while_the_others_serve(tmp_path: Path) -> None:
    v1, v2 = checkpoint_folder(tmp_path, "v1"), checkpoint_folder(tmp_path, "v2")

    async def body() -> None:
        store, engine = MemoryStateStore(), EngineLog()
        control = in_place_plane(store, engine, ["blue-a", "blue-b"], v1)
        await store.save(control._seed)  # type: ignore[attr-defined]
        await control.start()
        await until(lambda: all(r.ready for r in control.pool.replicas))
        seen_free: list[str] = []

        async def watch() -> None:  # while one replica is held, requests go to the other one
            while True:
                held = [r.name for r in control.pool.replicas if r.hold is not None]
                assert len(held) <= 1, held
                if held:
                    seen_free.append(control.pool.choose("m").name)
                await asyncio.sleep(0.001)

        watcher = asyncio.get_running_loop().create_task(watch())
        rollout = await control.request(RolloutCommand(v2, version="v2"))
        assert rollout.plan.strategy.value == "inplace"
        await until(lambda: rollout.phase is Phase.DONE)
        watcher.cancel()
        assert engine.calls == [
            (host, step)
            for host in ("blue-a.test", "blue-b.test")
            for step in ("pause", "reload v2", "reset_prefix_cache", "resume")
        ]
        assert set(seen_free) == {"blue-a", "blue-b"}  # each served while the other was held
        state = await store.load()
        assert state is not None and {r.version for r in state.replicas} == {"v2"}
        assert {r.engine["model"] for r in state.replicas if r.engine} == {v2}  # a restart loads v2
        assert [strategy for _, strategy in control.paused_seen] == ["inplace", "inplace"]  # type: ignore[attr-defined]
        assert set(rollout.facts["pause_s"]) == {"blue-a", "blue-b"}
        await control.stop()

    run(body)


def test_a_failed_reload_puts_the_previous_weights_back(tmp_path: Path) -> None:
    """An engine that refuses the reload still answers: the previous weights go back in and it serves on.
    (A reload that never returns is a fault: tests/faults/test_inplace_faults.py.)"""
    v1, v2 = checkpoint_folder(tmp_path, "v1"), checkpoint_folder(tmp_path, "v2")
    failure = "reload error"

    async def body() -> None:
        engine = EngineLog(fail_reload_of=v2)
        store = MemoryStateStore()
        control = in_place_plane(store, engine, ["blue-a"], v1, reload_timeout_s=0.2)
        await store.save(control._seed)  # type: ignore[attr-defined]
        await control.start()
        await until(lambda: all(r.ready for r in control.pool.replicas))
        rollout = await control.request(RolloutCommand(v2, version="v2", strategy="inplace"))
        await until(lambda: rollout.phase is Phase.FAILED, timeout=10)
        assert [step for _, step in engine.calls][-4:] == ["pause", "reload v1", "reset_prefix_cache", "resume"]
        assert not engine.paused  # never left paused
        replica = control.pool.replicas[0]
        assert replica.version == "v1" and replica.hold is None
        assert ("Error while deserializing" if failure == "reload error" else "Timeout") in (rollout.error or "")
        await control.stop()

    run(body)


def test_in_place_only_when_the_weights_fit(tmp_path: Path) -> None:
    from shipyard.engine.checkpoint import first_difference

    v1 = checkpoint_folder(tmp_path, "v1")
    wider = checkpoint_folder(tmp_path, "wider", shape=(4, 8))
    deeper = checkpoint_folder(tmp_path, "deeper", layers=3)
    other_tokenizer = checkpoint_folder(tmp_path, "tok")
    (Path(other_tokenizer) / "tokenizer.json").write_text('{"added": 1}')
    assert first_difference(Path(v1), Path(checkpoint_folder(tmp_path, "same"))) is None
    assert "tensor layer.0.weight: F32 [4, 4] in the running version, F32 [4, 8]" in str(
        first_difference(Path(v1), Path(wider))
    )
    assert "config num_hidden_layers: 2 in the running version, 3" in str(first_difference(Path(v1), Path(deeper)))
    assert "tokenizer file tokenizer.json differs" in str(first_difference(Path(v1), Path(other_tokenizer)))
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (bare / name).write_text((Path(v1) / name).read_text())
    assert "has no *.safetensors files" in str(first_difference(Path(v1), bare))

    async def body() -> None:
        store = MemoryStateStore()
        control = in_place_plane(store, EngineLog(), ["blue-a"], v1)
        await store.save(control._seed)  # type: ignore[attr-defined]
        await control.start()
        await until(lambda: all(r.ready for r in control.pool.replicas))
        with pytest.raises(RolloutRejected, match="cannot update in place: tensor layer.0.weight") as caught:
            await control.request(RolloutCommand(wider, version="v2", strategy="inplace"))
        assert caught.value.status == 400
        with pytest.raises(RolloutRejected, match="no canary"):
            await control.request(RolloutCommand(v1, version="v2", strategy="inplace", canary_percent=10))
        auto = await control.request(RolloutCommand(wider, version="v2"))  # auto: blue-green, and says why
        assert auto.plan.strategy.value == "blue-green" and "not in place: tensor layer.0.weight" in auto.plan.reason
        await control.stop()

    run(body)


def test_a_follower_applies_the_state_reports_its_load_and_never_runs_a_rollout() -> None:
    """A serving worker (``workers`` > 1): an interrupted rollout stays with the primary, however long its lease
    is gone; the follower applies every revision the primary saves and counts in its drains."""

    async def body() -> None:
        store = RecordingStore()
        await store.save(interrupted_state(Phase.CANARY, canary=True))
        follower = plane(store, [], lease_ttl_s=0.05, follower=True, gateway_id="w1")
        await follower.start()
        assert {r.name for r in follower.pool.replicas} == {"blue-v1", "green-v2"}
        assert follower.pool.weights == {"green": 0.1, "blue": 0.9}
        await asyncio.sleep(0.2)  # several follow ticks with no lease held by anyone
        assert follower.current is None and not follower.running_here()
        assert await store.lease_owner() is None and len(store.saved) == 1

        green = follower.pool.replicas[[r.name for r in follower.pool.replicas].index("green-v2")]
        ticket = follower.pool.acquire(green, "m")  # one request in flight on the follower
        primary = plane(store, [], gateway_id="primary")
        for _ in range(100):  # the follower reports on its next tick
            if await primary.in_flight({"green-v2"}) == 1:
                break
            await asyncio.sleep(0.01)
        assert await primary.in_flight({"green-v2"}) == 1
        ticket.release()

        state = await store.load()
        assert state is not None
        await store.save(state.evolve(by="primary", weights={"green": 1.0, "blue": 0.0}))
        await until(lambda: follower.pool.weights == {"green": 1.0, "blue": 0.0})
        assert len(store.saved) == 2  # the follower saved nothing
        await follower.stop()

    run(body)
