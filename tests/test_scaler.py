"""The scaler carrying decisions out (issue 35): fake engines (httpx.MockTransport) and launcher, an in-memory
store, a control plane per gateway. Each test says which promise it checks."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import httpx
import pytest

from shipyard.control.audit import AuditLog
from shipyard.control.autoscale import AutoscalePolicy
from shipyard.control.commands import RolloutCommand, RolloutRejected
from shipyard.control.plane import ControlConfig, ControlPlane
from shipyard.control.rollout import Rollout, RolloutPlan
from shipyard.control.scaler import (
    EngineLoad,
    HistogramWindow,
    ScaleRejected,
    histogram_quantile,
    parse_engine_metrics,
)
from shipyard.control.state import DeploymentState, ReplicaRecord
from shipyard.router.replica import Replica, ReplicaPool
from tests.test_control import FakeHandle, RecordingStore, engines, until


class GatedHandle(FakeHandle):
    """An engine whose start finishes when the test says so."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.go = asyncio.Event()

    async def wait_ready(self) -> None:
        await self.go.wait()


class RoomyLauncher:
    def __init__(self, room: str | None = None) -> None:
        self.launched: dict[str, GatedHandle] = {}
        self.refusal = room

    def check(self, target: str) -> None:
        return None

    def prepare(self, target: str, name: str, **_: Any) -> GatedHandle:
        handle = self.launched[name] = GatedHandle(f"http://{name}.test")
        return handle

    def adopt(self, identity: Any, url_port: int, name: str) -> GatedHandle:
        raise ProcessLookupError(name)

    def room(self, busy: Any) -> str | None:
        return self.refusal


def seeded(store: RecordingStore, names: list[str]) -> None:
    records = tuple(ReplicaRecord(n, f"http://{n}.test", "blue", "v1", target="/m/v1") for n in names)
    store._state = DeploymentState(revision=1, replicas=records, weights={"blue": 1.0})


def records_of(store: RecordingStore) -> tuple[ReplicaRecord, ...]:
    return store._state.replicas if store._state is not None else ()


def gateway(
    store: RecordingStore,
    launcher: RoomyLauncher,
    policy: AutoscalePolicy | None = None,
    load: EngineLoad | None = None,
    gateway_id: str = "gw-a",
    idle: str = "stop",
) -> ControlPlane:
    replicas = [
        Replica(r.url, name=r.name, deployment="blue", version="v1", ready=True, models={"m": 512})
        for r in records_of(store)
    ]
    client = httpx.AsyncClient(transport=httpx.MockTransport(engines))

    async def engine_load(replica: Replica) -> EngineLoad | None:
        return load

    control = ControlPlane(
        ReplicaPool(replicas),
        client,
        store,
        launcher,  # type: ignore[arg-type]
        audit=AuditLog(None),
        config=ControlConfig(
            watch_interval_s=0.01,
            drain_timeout_s=1,
            autoscale=policy,
            autoscale_interval_s=0.02,
            shutdown_grace_s=5,
            gateway_id=gateway_id,
            warmup_requests=1,
            autoscale_idle=idle,
        ),
    )
    control.scaler.engine_load = engine_load
    return control


def test_a_replica_added_is_listed_but_never_routed_to_until_it_is_warm() -> None:
    """Promise: scale-out puts a replica in rotation only after start and warm-up, saved as ``starting`` first."""

    async def body() -> None:
        store, launcher = RecordingStore(), RoomyLauncher()
        seeded(store, ["blue-v1"])
        control = gateway(store, launcher)
        await control.start()
        status = await control.scale(2, "admin:test")
        assert status["mode"] in ("fixed", "manual")
        await until(lambda: "blue-v1-2" in launcher.launched)
        await until(lambda: any(r.name == "blue-v1-2" for r in control.pool.replicas))
        new = next(r for r in control.pool.replicas if r.name == "blue-v1-2")
        assert new.rotation == "starting" and control.state.replica("blue-v1-2").rotation == "starting"  # type: ignore[union-attr]
        for _ in range(20):  # however often it is asked, the pool never picks the starting one
            assert control.pool.choose("m").name == "blue-v1"
        assert control.scale_status()["replicas"] == {"serving": 1, "starting": 1, "draining": 0, "sleeping": 0}
        launcher.launched["blue-v1-2"].go.set()
        await until(lambda: getattr(control.state.replica("blue-v1-2"), "rotation", None) == "")
        await until(lambda: new.routable)
        ticket = control.pool.acquire(control.pool.replicas[0], "m")
        assert control.pool.choose("m") is new  # in rotation: the least busy one now
        ticket.release()
        assert control.scaler.status.changes == {"out": 1, "in": 0}
        actions = [e["action"] for e in control.audit.entries]
        assert "scale_set" in actions and "scale_out" in actions and "replica_added" in actions
        await control.stop()

    asyncio.run(body())


def test_scale_in_drains_the_least_busy_replica_and_stops_it_only_once_its_requests_ended() -> None:
    """Promise: scale-in cuts nothing: the replica leaves rotation, its requests finish, then it stops."""

    async def body() -> None:
        store, launcher = RecordingStore(), RoomyLauncher()
        seeded(store, ["blue-v1", "blue-v1-2"])
        control = gateway(store, launcher)
        handles = {n: FakeHandle(f"http://{n}.test") for n in ("blue-v1", "blue-v1-2")}
        for name, handle in handles.items():
            handle.spawn()
            control.supervisor.manage(name, handle)
        await control.start()
        await until(lambda: all(r.routable for r in control.pool.replicas))
        busy, idle = control.pool.replicas
        ticket = control.pool.acquire(idle, "m")  # the least busy one gets busy: the other goes
        ticket_busy_1 = control.pool.acquire(busy, "m")
        ticket_busy_2 = control.pool.acquire(busy, "m")
        await control.scale(1, "admin:test")
        await until(lambda: idle.rotation == "draining")
        assert control.pool.choose("m") is busy  # out of rotation at once
        await asyncio.sleep(0.2)
        assert not handles[idle.name].stopped  # its request is still running: its engine keeps running
        ticket.release()
        await until(lambda: handles[idle.name].stopped)
        await until(lambda: control.state.replica(idle.name) is None)
        assert not handles[busy.name].stopped and [r.name for r in control.pool.replicas] == [busy.name]
        removed = next(e for e in control.audit.entries if e["action"] == "replica_removed")
        assert removed["cut_in_flight"] == 0
        ticket_busy_1.release(), ticket_busy_2.release()
        await control.stop()

    asyncio.run(body())


def test_the_autoscaler_scales_out_on_a_queue_past_its_target() -> None:
    """Promise: an engine queue at 5x the target (panic) starts a replica on the first observation."""

    async def body() -> None:
        store, launcher = RecordingStore(), RoomyLauncher()
        seeded(store, ["blue-v1"])
        policy = AutoscalePolicy(min_replicas=1, max_replicas=2, target_waiting=2, target_kv_cache=None)
        control = gateway(store, launcher, policy, load=EngineLoad(waiting=10, running=4, kv_cache=0.5))
        await control.start()
        await until(lambda: "blue-v1-2" in launcher.launched)
        assert control.scaler.status.desired == 2 and "waiting" in control.scaler.status.reason
        launcher.launched["blue-v1-2"].go.set()
        await until(lambda: control.scaler.status.changes["out"] == 1)
        await asyncio.sleep(0.1)
        assert len(launcher.launched) == 1  # max_replicas holds
        await control.stop()

    asyncio.run(body())


def test_no_room_leaves_the_change_pending_with_its_reason() -> None:
    """Promise: with no free CPU set or GPU slot nothing is started, and status says why."""

    async def body() -> None:
        store, launcher = RecordingStore(), RoomyLauncher(room="every CPU set of this host is taken (0, 1)")
        seeded(store, ["blue-v1"])
        control = gateway(store, launcher)
        await control.start()
        await control.scale(2, "admin:test")
        await until(lambda: bool(control.scaler.status.pending))
        assert "every CPU set" in control.scale_status()["pending"] and not launcher.launched
        await control.stop()

    asyncio.run(body())


def test_a_rollout_and_the_scaler_never_both_change_the_replicas() -> None:
    """Promise (fencing, one writer): no scaling while a rollout runs; no rollout while a scaling step runs
    here; and a gateway whose lease another gateway holds does not scale."""

    async def body() -> None:
        store, launcher = RecordingStore(), RoomyLauncher()
        seeded(store, ["blue-v1"])
        control = gateway(store, launcher)
        await control.start()
        assert await store.acquire_lease("gw-b", 60) is not None  # gateway b runs a rollout of the model
        control.current = Rollout(RolloutPlan("/m/v2", "v2", "green", "blue"))
        await control.scale(2, "admin:test")
        await until(lambda: "rollout" in control.scaler.status.pending)
        assert not launcher.launched
        control.current = None  # it ended
        await store.release_lease("gw-b")
        await until(lambda: "blue-v1-2" in launcher.launched)  # the rollout ended: the change goes on
        with pytest.raises(RolloutRejected) as refused:  # and while it runs, no rollout starts here
            await control.request(RolloutCommand("/m/v2", version="v2"))
        assert refused.value.status == 409 and "being scaled" in str(refused.value)
        launcher.launched["blue-v1-2"].go.set()
        await until(lambda: control.scaler.status.changes["out"] == 1)
        await control.stop()

        other = RecordingStore()
        seeded(other, ["blue-v1"])
        b = gateway(other, RoomyLauncher(), gateway_id="gw-b")
        assert await b.acquire_lease()  # gateway b holds the model's lease (its rollout, say)
        a_launcher = RoomyLauncher()
        a = gateway(other, a_launcher, gateway_id="gw-a")
        await a.start()
        await a.scale(2, "admin:test")
        await until(lambda: "gw-b" in a.scaler.status.pending)
        assert not a_launcher.launched and len(records_of(other)) == 1
        await a.stop()

    asyncio.run(body())


def test_scale_commands_are_checked_before_anything_changes() -> None:
    """Promise: bad input is refused with a reason, and the state is not touched."""

    async def body() -> None:
        store, launcher = RecordingStore(), RoomyLauncher()
        seeded(store, ["blue-v1"])
        control = gateway(store, launcher)
        await control.start()
        revision = control.state.revision
        for replicas, words in ((0, "min_replicas: 0"), (17, "0..16"), (None, "no autoscale")):
            with pytest.raises(ScaleRejected) as refused:
                await control.scale(replicas, "admin:test")
            assert refused.value.status == 400 and words in str(refused.value)
        assert control.state.revision == revision
        await control.stop()

    asyncio.run(body())


def test_engine_metrics_and_histogram_quantiles_are_read_as_prometheus_does() -> None:
    page = (
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n'
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 5.0\n'
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
    )
    assert parse_engine_metrics(page) == EngineLoad(waiting=3, running=5, kv_cache=0.25)
    assert parse_engine_metrics("") == EngineLoad()
    buckets = [(0.1, 0.0), (0.5, 50.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.9, buckets) == pytest.approx(0.9)  # 90th of 100 falls 80% into (0.5, 1]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.5)
    assert histogram_quantile(0.9, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def test_a_model_idles_to_zero_and_its_first_waiting_request_starts_it_again() -> None:
    """Promise (from and to zero): idle past the window, the last replica drains and stops, what it served is
    kept; a request waiting at a gateway starts one replica at once."""

    async def body() -> None:
        store, launcher = RecordingStore(), RoomyLauncher()
        seeded(store, ["blue-v1"])
        policy = AutoscalePolicy(min_replicas=0, max_replicas=2, target_waiting=2, scale_in_after_s=0.1)
        control = gateway(store, launcher, policy, load=EngineLoad())
        handle = FakeHandle("http://blue-v1.test")
        handle.spawn()
        control.supervisor.manage("blue-v1", handle)
        await control.start()
        await until(lambda: not control.state.replicas)
        assert handle.stopped and not control.pool.replicas
        assert control.state.scale["template"] == {"deployment": "blue", "version": "v1", "target": "/m/v1"}
        await asyncio.sleep(0.2)
        assert not launcher.launched  # nobody asks: it stays at zero
        control.pool.waiting_for_replicas = 1  # a request waits at the gateway
        await until(lambda: "blue-v1" in launcher.launched)
        launcher.launched["blue-v1"].go.set()
        await until(lambda: any(r.routable for r in control.pool.replicas) or not control.state.replicas)
        assert control.state.replica("blue-v1") is not None
        added = next(e for e in control.audit.entries if e["action"] == "replica_added")
        assert added["cold_start_s"] >= 0
        control.pool.waiting_for_replicas = 0
        await control.stop()

    asyncio.run(body())


def test_with_idle_sleep_a_replica_scaled_in_sleeps_and_a_scale_out_wakes_it_instead_of_starting_one() -> None:
    """Promise (GPU sleep mode): scale-in drains then sleeps the engine (kept, never routed to); scale-out wakes
    it with ``POST /wake_up`` and starts no new engine."""

    calls: list[str] = []

    def engines_with_sleep(request: httpx.Request) -> httpx.Response:
        if request.url.path in ("/sleep", "/wake_up"):
            calls.append(f"{request.url.host}{request.url.path}")
            return httpx.Response(200)
        return engines(request)

    async def body() -> None:
        store, launcher = RecordingStore(), RoomyLauncher()
        seeded(store, ["blue-v1", "blue-v1-2"])
        policy = AutoscalePolicy(min_replicas=1, max_replicas=2, target_waiting=2)
        control = gateway(store, launcher, policy, load=EngineLoad(), idle="sleep")
        control.client = httpx.AsyncClient(transport=httpx.MockTransport(engines_with_sleep))
        handles = {n: FakeHandle(f"http://{n}.test") for n in ("blue-v1", "blue-v1-2")}
        for name, handle in handles.items():
            handle.spawn()
            control.supervisor.manage(name, handle)
        await control.start()
        await control.scale(1, "admin:test")
        await until(lambda: any(r.rotation == "sleeping" for r in control.state.replicas))
        slept = next(r for r in control.state.replicas if r.rotation == "sleeping")
        assert calls == [f"{slept.name}.test/sleep"] and not handles[slept.name].stopped
        assert control.scale_status()["replicas"]["sleeping"] == 1
        assert all(control.pool.choose("m").name != slept.name for _ in range(10))
        await control.scale(2, "admin:test")
        await until(lambda: all(not r.rotation for r in control.state.replicas))
        assert calls[-1] == f"{slept.name}.test/wake_up" and not launcher.launched  # woken, nothing started
        assert any(e["action"] == "replica_woken" for e in control.audit.entries)
        await control.stop()

    asyncio.run(body())


def test_the_ttft_window_slides_and_keeps_a_burst_of_first_tokens_for_its_length() -> None:
    now, counts = [0.0], {0.5: 0.0, 1.0: 0.0, float("inf"): 0.0}
    window = HistogramWindow(lambda: dict(counts), window_s=10, clock=lambda: now[0])
    assert window.p90_ms() is None  # nothing observed yet
    now[0], counts[1.0], counts[float("inf")] = 1.0, 10.0, 10.0  # a burst of 10 first tokens in (0.5, 1] s
    assert window.p90_ms() == pytest.approx(950.0)
    now[0] = 6.0
    assert window.p90_ms() == pytest.approx(950.0)  # no new first token: the burst is still in the window
    now[0] = 12.0
    assert window.p90_ms() is None  # the window moved past it


def test_a_replica_left_draining_by_a_gateway_that_died_is_finished_by_the_next_owner() -> None:
    """Promise (unknown state is never trusted): a record another gateway left ``draining`` (it died mid scale-in)
    is drained, its engine stopped and its record removed once this gateway holds the lease; one left
    ``starting`` likewise, as it never served."""

    async def body() -> None:
        store, launcher = RecordingStore(), RoomyLauncher()
        seeded(store, ["blue-v1", "blue-v1-2", "blue-v1-3"])
        assert store._state is not None
        records = list(store._state.replicas)
        records[1] = dataclasses.replace(records[1], rotation="draining")
        records[2] = dataclasses.replace(records[2], rotation="starting")
        store._state = dataclasses.replace(store._state, replicas=tuple(records))
        control = gateway(store, launcher)
        handles = {n: FakeHandle(f"http://{n}.test") for n in ("blue-v1", "blue-v1-2", "blue-v1-3")}
        for name, handle in handles.items():
            handle.spawn()
            control.supervisor.manage(name, handle)
        await control.start()
        await until(lambda: [r.name for r in control.state.replicas] == ["blue-v1"])
        assert handles["blue-v1-2"].stopped and handles["blue-v1-3"].stopped and not handles["blue-v1"].stopped
        settled = [e for e in control.audit.entries if e["action"] == "replica_settled"]
        assert {(e["replica"], e["was"]) for e in settled} == {("blue-v1-2", "draining"), ("blue-v1-3", "starting")}
        await control.stop()

    asyncio.run(body())
