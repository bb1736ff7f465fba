"""Faults during an in-place update: a reload that never returns, a revert that fails, a resume that fails.

Promises: no replica is ever released with unknown weights (it is quarantined: out of rotation at every gateway,
and restarted from the last known-good weights when shipyard started it); no hold outlives its rollout.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from shipyard.control.commands import RolloutCommand
from shipyard.control.inplace import reload_weights
from shipyard.control.rollout import Phase
from shipyard.control.store import MemoryStateStore
from shipyard.router import NoReplicaError
from tests.faults.report import record as report_figures
from tests.test_control import EngineLog, checkpoint_folder, in_place_plane, until


class Engine(EngineLog):
    """EngineLog, plus: reloads of the checkpoints named in ``fail`` refused, of ``hang`` never answered (until
    set to None), and a /resume that fails."""

    def __init__(self, fail: set[str] | None = None, hang: str | None = None, resume_fails: bool = False) -> None:
        super().__init__()
        self.fail = fail or set()
        self.hang = hang
        self.resume_fails = resume_fails

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/collective_rpc":
            name = Path(json.loads(request.content)["kwargs"]["weights_path"]).name
            if name in self.fail:
                self.calls.append((request.url.host, f"reload {name}"))
                return httpx.Response(500, json={"error": {"message": "Error while deserializing header"}})
            if name == self.hang:
                self.calls.append((request.url.host, f"reload {name}"))
                await asyncio.sleep(30)
        if request.url.path == "/resume" and self.resume_fails:
            self.calls.append((request.url.host, "resume"))
            return httpx.Response(500, json={"error": {"message": "engine core is busy"}})
        return await super().__call__(request)


class Handle:
    """The process behind a replica: records the folder it would start from and its restarts."""

    def __init__(self, url: str, folder: str) -> None:
        self.url = url
        self.folder = folder
        self.restarted_from: list[str] = []
        self.restarting = asyncio.Event()

    def alive(self) -> bool:
        return True

    def identity(self) -> dict[str, Any]:
        return {}

    def serve_from(self, folder: str) -> None:
        self.folder = folder

    async def restart(self) -> None:
        self.restarting.set()
        await asyncio.sleep(0.2)  # a real engine takes ~40 s; long enough to see it out of rotation meanwhile
        self.restarted_from.append(self.folder)

    async def stop(self) -> None:
        return None


async def _update(tmp_path: Path, engine: Engine, managed: bool) -> tuple[Any, Any, Handle, MemoryStateStore]:
    v1, v2 = checkpoint_folder(tmp_path, "v1"), checkpoint_folder(tmp_path, "v2")
    store = MemoryStateStore()
    control = in_place_plane(store, engine, ["blue-a"], v1, reload_timeout_s=0.2)
    control.config.restart_backoff_s = 0.01
    control.supervisor.backoff_s = 0.01
    handle = Handle("http://blue-a.test", v1)
    if managed:
        control.supervisor.manage("blue-a", handle)  # type: ignore[arg-type]
    await store.save(control._seed)  # type: ignore[attr-defined]
    await control.start()
    await until(lambda: all(r.ready for r in control.pool.replicas))
    rollout = await control.request(RolloutCommand(v2, version="v2", strategy="inplace"))
    return control, rollout, handle, store


def test_a_reload_that_never_returns_quarantines_the_replica_and_restarts_it_from_known_good(tmp_path: Path) -> None:
    async def body() -> None:
        engine = Engine(hang="v2")
        control, rollout, handle, store = await _update(tmp_path, engine, managed=True)
        await until(lambda: handle.restarting.is_set(), timeout=10)
        replica = control.pool.replicas[0]
        # while it restarts: out of rotation, never released under the old version's name with unknown weights
        assert replica.quarantined and "EngineWedged" in replica.quarantined
        with pytest.raises(NoReplicaError):
            control.pool.choose("m")
        await until(lambda: rollout.phase is Phase.FAILED and not control.running_here(), timeout=10)
        await until(lambda: bool(handle.restarted_from), timeout=10)
        assert handle.restarted_from == [str(tmp_path / "v1")]  # the last known-good weights
        await until(lambda: not control.pool.replicas[0].quarantined, timeout=10)
        state = await store.load()
        assert state is not None
        (record,) = state.replicas
        assert (record.version, record.held, record.quarantined) == ("v1", False, "")
        assert record.engine is not None and record.engine["model"] == str(tmp_path / "v1")
        assert "reload v1" not in [step for _, step in engine.calls]  # no revert attempted on a wedged engine
        assert control.pool.choose("m").name == "blue-a"  # it serves again
        report_figures(
            "reload_weights never returns (reload_timeout_s 0.2 s here)",
            "quarantined, never released with unknown weights; restarted from the known-good folder; no hold left",
            restarted_from=Path(handle.restarted_from[0]).name,
            hold_left=record.held,
        )
        await control.stop()

    asyncio.run(body())


def test_a_failed_revert_never_releases_the_replica_and_leaves_no_hold(tmp_path: Path) -> None:
    async def body() -> None:
        engine = Engine(fail={"v1", "v2"})
        control, rollout, handle, store = await _update(tmp_path, engine, managed=True)
        await until(lambda: rollout.phase is Phase.FAILED and not control.running_here(), timeout=10)
        assert [step for _, step in engine.calls if step.startswith("reload")] == ["reload v2", "reload v1"]
        await until(lambda: bool(handle.restarted_from), timeout=10)
        assert handle.restarted_from == [str(tmp_path / "v1")]
        state = await store.load()
        assert state is not None and not any(r.held for r in state.replicas), "a hold outlived its rollout"
        await control.stop()

    asyncio.run(body())


def test_a_resume_that_fails_quarantines_an_engine_shipyard_does_not_run(tmp_path: Path) -> None:
    """A server someone else runs cannot be restarted: it stays out of rotation, and the hold still ends."""

    async def body() -> None:
        engine = Engine(resume_fails=True)
        control, rollout, _, store = await _update(tmp_path, engine, managed=False)
        await until(lambda: rollout.phase is Phase.FAILED and not control.running_here(), timeout=10)
        assert "EngineWedged" in (rollout.error or "") and "/resume failed" in (rollout.error or "")
        state = await store.load()
        assert state is not None
        (record,) = state.replicas
        assert record.quarantined and not record.held and record.version == "v1"
        await asyncio.sleep(0.1)  # health probes keep running: a quarantined replica stays out
        with pytest.raises(NoReplicaError):
            control.pool.choose("m")
        await control.stop()

    asyncio.run(body())


def test_a_gateway_restarted_during_an_update_releases_no_hold_and_trusts_no_weights(tmp_path: Path) -> None:
    """The gateway running the update stops while a replica is held (mid-reload): the next one resolves the
    rollout, puts the known-good weights back, and the hold ends with it."""

    async def body() -> None:
        engine = Engine(hang="v2")
        control, rollout, _, store = await _update(tmp_path, engine, managed=False)
        await until(lambda: any(step == "reload v2" for _, step in engine.calls), timeout=10)
        await control.stop()  # the gateway dies mid-reload (its lease goes with it)
        state = await store.load()
        assert state is not None and state.replicas[0].held
        engine.hang = None
        again = in_place_plane(store, engine, ["blue-a"], str(tmp_path / "v1"))
        await again.start()
        current = again.current
        assert current is not None
        await until(lambda: current.phase is Phase.FAILED and not again.running_here(), timeout=10)
        state = await store.load()
        assert state is not None
        (record,) = state.replicas
        assert not record.held and record.version == "v1" and not record.quarantined
        assert [step for _, step in engine.calls][-4:] == ["pause", "reload v1", "reset_prefix_cache", "resume"]
        await again.stop()

    asyncio.run(body())


class PerHostEngine(Engine):
    """Engine, with reloads refused per replica: ``fail`` holds ``host:checkpoint`` pairs."""

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/collective_rpc":
            name = Path(json.loads(request.content)["kwargs"]["weights_path"]).name
            if f"{request.url.host}:{name}" in self.fail:
                self.calls.append((request.url.host, f"reload {name}"))
                return httpx.Response(500, json={"error": {"message": "Error while deserializing header"}})
        return await super().__call__(request)


def test_a_revert_that_fails_on_one_replica_still_reverts_the_others_and_ends_the_rollout(tmp_path: Path) -> None:
    """Issue 34 item 7: the update fails on the third replica; putting v1 back fails on the first (quarantined,
    restarted from v1) — the second is still reverted, no replica keeps v2, and the rollout ends FAILED with its
    history entry (the revert's error used to end the rollout's task before any of that)."""

    async def body() -> None:
        v1, v2 = checkpoint_folder(tmp_path, "v1"), checkpoint_folder(tmp_path, "v2")
        engine = PerHostEngine(fail={"blue-c.test:v2", "blue-a.test:v1"})
        store = MemoryStateStore()
        control = in_place_plane(store, engine, ["blue-a", "blue-b", "blue-c"], v1, reload_timeout_s=0.5)
        control.supervisor.backoff_s = 0.01
        handle = Handle("http://blue-a.test", v1)
        control.supervisor.manage("blue-a", handle)  # type: ignore[arg-type]
        await store.save(control._seed)  # type: ignore[attr-defined]
        await control.start()
        await until(lambda: all(r.ready for r in control.pool.replicas))
        rollout = await control.request(RolloutCommand(v2, version="v2", strategy="inplace"))
        await until(lambda: rollout.phase is Phase.FAILED and not control.running_here(), timeout=10)
        await until(lambda: bool(handle.restarted_from), timeout=10)
        state = await store.load()
        assert state is not None
        versions = {r.name: r.version for r in state.replicas}
        assert versions == {"blue-a": "v1", "blue-b": "v1", "blue-c": "v1"}, versions
        assert not any(r.held for r in state.replicas), "a hold outlived its rollout"
        assert handle.restarted_from == [v1]
        assert [h["phase"] for h in state.history if h.get("id") == rollout.id] == [Phase.FAILED.value]
        assert "blue-a" in str(rollout.facts.get("retire_error")), rollout.facts
        await control.stop()

    asyncio.run(body())


def test_a_reload_cancelled_mid_step_still_resumes_the_engine() -> None:
    """Issue 34 item 7: the task running a reload is cancelled (its lease was lost) while the engine is paused
    and reloading: /resume is still sent, so the engine is not left paused for whoever takes over."""

    async def body() -> None:
        engine = Engine(hang="v2")
        async with httpx.AsyncClient(transport=httpx.MockTransport(engine)) as client:
            task = asyncio.create_task(reload_weights(client, "http://blue-a.test", "/models/v2", 5.0))
            await until(lambda: any(step == "reload v2" for _, step in engine.calls), timeout=5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: any(step == "resume" for _, step in engine.calls), timeout=5)

    asyncio.run(body())
