"""The in-place strategy: new weights reloaded into the running engines, one replica at a time.

For each replica: hold it (new requests wait at every gateway, or go to the other replicas), wait for its
running requests to finish on the old weights, then vLLM's ``/pause?mode=wait`` → ``/collective_rpc
reload_weights`` → ``/reset_prefix_cache`` → ``/resume``; one request proves it answers and the quality gate
runs straight at the engine, before any user request sees the new weights; then the replica is released with its
new version. A failure puts the previous weights back and the old version keeps serving. Seconds instead of a
cold start, and one copy of the model in memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

import httpx

from shipyard.control.fingerprint import Fingerprint, WeightsMismatch, checkpoint_digest, take_fingerprint
from shipyard.control.rollout import Gate, Rollout, Strategy
from shipyard.control.state import ReplicaRecord
from shipyard.control.strategies import Deployer, RolloutStrategy, wait_idle
from shipyard.router.replica import Replica


class EngineRefused(RuntimeError):
    """An engine's dev route answered with an error (the message carries its answer)."""


class EngineWedged(RuntimeError):
    """An engine did not answer a step of a reload in time (or could not be resumed): its weights are unknown."""


RESUME_TIMEOUT_S = 10.0
"""Longest ``/resume`` (and ``/reset_prefix_cache``) may take: both return at once on a working engine."""


async def _engine_call(client: httpx.AsyncClient, url: str, path: str, timeout: float, body: Any = None) -> None:
    response = await client.post(f"{url}{path}", json=body, timeout=timeout)
    if response.status_code != 200:
        raise EngineRefused(f"{path} answered {response.status_code}: {response.text[:300]}")


async def reload_weights(client: httpx.AsyncClient, url: str, folder: str, timeout_s: float) -> dict[str, float]:
    """pause (running requests finish) → reload from ``folder`` → reset the prefix cache → resume; step times.

    The engine is resumed whatever happens after the pause was asked for. A step that does not answer in time,
    or a resume that fails, raises :class:`EngineWedged` (the weights are unknown: restart the engine); an engine
    that refuses a step raises :class:`EngineRefused` (it still answers: the previous weights can be put back)."""
    times: dict[str, float] = {}
    clock = _Stopwatch()
    failure: Exception | None = None
    rpc_timeout = timeout_s + min(5.0, timeout_s)  # the engine gives up after timeout_s; this side a little later
    step = "/pause"
    cancelled: asyncio.CancelledError | None = None
    try:
        await _engine_call(client, url, "/pause?mode=wait", timeout_s)
        times["pause_s"] = clock.lap()
        step = "/collective_rpc reload_weights"
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": folder}, "timeout": timeout_s}
        await asyncio.wait_for(_engine_call(client, url, "/collective_rpc", rpc_timeout, rpc), rpc_timeout)
        times["reload_s"] = clock.lap()
        step = "/reset_prefix_cache"
        await _engine_call(client, url, "/reset_prefix_cache", RESUME_TIMEOUT_S)
        times["reset_prefix_cache_s"] = clock.lap()
    except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
        failure = EngineWedged(f"{step} did not answer in time ({type(exc).__name__}) at {url}")
    except asyncio.CancelledError as exc:  # the lease was lost mid-reload: resume first, then stop acting
        cancelled = exc
        failure = EngineWedged(f"{step} was cancelled at {url}")
    except Exception as exc:
        failure = exc
    try:  # shielded: a cancellation must not leave the engine paused
        await asyncio.shield(_engine_call(client, url, "/resume", RESUME_TIMEOUT_S))
        times["resume_s"] = clock.lap()
    except Exception as exc:
        if not isinstance(failure, EngineWedged):
            failure = EngineWedged(f"/resume failed at {url} ({type(exc).__name__}: {exc}) after: {failure}")
    if cancelled is not None:
        raise cancelled
    if failure is not None:
        raise failure
    return times


class _Stopwatch:
    def __init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        lap, self._last = round(now - self._last, 4), now
        return lap


class InPlace(RolloutStrategy):
    kind = Strategy.IN_PLACE

    def _records(self, d: Deployer, rollout: Rollout) -> list[ReplicaRecord]:
        return [r for r in d.state.replicas if r.deployment == rollout.plan.new_deployment]

    async def prepare(self, d: Deployer, rollout: Rollout) -> None:
        records = self._records(d, rollout)
        if not records:
            raise RuntimeError(f"deployment {rollout.plan.new_deployment} has no replicas to update")
        rollout.facts["previous"] = {r.name: {"target": _served_folder(r), "version": r.version} for r in records}
        rollout.facts["pause_s"] = {}

    async def warm_up(self, d: Deployer, rollout: Rollout) -> None:
        return None  # the kernels and grammars stay warm; each replica is checked right after its reload

    def switch(self, d: Deployer, rollout: Rollout) -> dict[str, Any]:
        return {}

    async def after_switch(self, d: Deployer, rollout: Rollout) -> None:
        target = os.path.abspath(rollout.plan.target)
        for name in list(rollout.facts["previous"]):
            await self._update(d, rollout, name, target, rollout.plan.version, rollout.plan.gate)

    def restore(self, d: Deployer, rollout: Rollout) -> dict[str, Any]:
        return {}

    async def drain(self, d: Deployer, rollout: Rollout) -> None:
        rollout.facts.setdefault("drain_timed_out", False)

    async def retire_new(self, d: Deployer, rollout: Rollout) -> None:
        """Put the previous weights back on every replica that has the new ones (or was caught holding). One that
        cannot take them back is quarantined and restarted from them (``_update``); the others are still
        reverted, and the failures are raised together at the end."""
        failed = []
        for name, previous in (rollout.facts.get("previous") or {}).items():
            record = d.state.replica(name)
            if record is None or (record.version != rollout.plan.version and not record.held):
                continue
            try:
                await self._update(d, rollout, name, previous["target"], previous["version"], None, reverting=True)
            except Exception as exc:
                failed.append(f"{name}: {type(exc).__name__}: {exc}")
        if failed:
            raise RuntimeError(f"the previous weights could not be put back on {'; '.join(failed)}")

    async def _update(
        self,
        d: Deployer,
        rollout: Rollout,
        name: str,
        folder: str,
        version: str,
        gate: Gate | None,
        reverting: bool = False,
    ) -> None:
        """Hold the replica, put ``folder`` in, check it, release it as ``version``. On failure the previous
        weights go back in and it is released as before; when they cannot be put back (or the engine stopped
        answering) its weights are unknown: it is quarantined and restarted from the known-good folder. The hold
        ends on every path but a cancellation (the lease was lost; whoever resolves the rollout releases it)."""
        record = d.state.replica(name)
        replica = next((r for r in d.pool.replicas if r.name == name), None)
        if record is None or replica is None:
            raise RuntimeError(f"replica {name} left the deployment during the update")
        known_good = (folder, version) if reverting else (_served_folder(record), record.version)
        before = await self._before(folder, known_good[0])  # files only: read before users are held
        held_at, hold = d.monotonic(), _Stopwatch()
        await d.commit(replicas=d.state.with_replica(dataclasses.replace(record, held=True)))
        parts = {"hold_saved_s": hold.lap()}  # what the hold is made of, for the rollout's facts
        try:
            await d.settle()
            parts["every_gateway_holds_s"] = hold.lap()
            if not await wait_idle(d, rollout, replicas={name}):
                rollout.facts["drain_timed_out"] = True  # vLLM's pause?mode=wait still lets them finish
            parts["requests_in_flight_finish_s"] = hold.lap()
            steps, fingerprint = await self._swap(d, rollout, replica, folder, gate, before)
            parts["reload_and_checks_s"] = hold.lap()
        except asyncio.CancelledError:
            raise
        except Exception as failure:
            restorable = not reverting and not isinstance(failure, EngineWedged)
            if restorable and await self._put_back(d, rollout, replica, known_good[0]):
                current = d.state.replica(name) or record
                await d.commit(replicas=d.state.with_replica(dataclasses.replace(current, held=False)))
            else:
                await self._quarantine(d, name, *known_good, why=f"{type(failure).__name__}: {failure}")
            raise
        updated = _serving(d.state.replica(name) or record, folder, version)
        await d.commit(replicas=d.state.with_replica(updated), fingerprints={**d.state.fingerprints, **fingerprint})
        handle = d.supervisor.handles.get(name)
        if handle is not None:
            handle.serve_from(folder)
        parts["release_saved_s"] = hold.lap()
        paused = round(d.monotonic() - held_at, 4)
        rollout.facts.setdefault("pause_s", {})[name] = paused
        rollout.facts.setdefault("steps_s", {})[name] = steps
        rollout.facts.setdefault("hold_s", {})[name] = parts
        d.paused(paused, rollout.plan.strategy.value)

    async def _before(self, folder: str, previous: str | None) -> _Before:
        """The digests of the new checkpoint and of ``previous`` (files only: read before the hold). The engine's
        fingerprint on the old weights is taken inside the hold, once the replica is idle: batch composition moves
        log-probabilities, and a loaded "before" next to an idle "after" would hide a reload that kept the old
        weights."""
        digest = await asyncio.to_thread(checkpoint_digest, folder)
        previous_digest = None
        if previous is not None and previous != folder:
            previous_digest = await asyncio.to_thread(checkpoint_digest, previous)
        return _Before(digest, previous_digest if previous_digest != digest else None)

    async def _swap(
        self,
        d: Deployer,
        rollout: Rollout,
        replica: Replica,
        folder: str,
        gate: Gate | None,
        before: _Before | None = None,
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Reload ``folder``, prove the engine now serves it (it answers; its fingerprint matches the one recorded
        for that checkpoint, and differs from ``before`` when the checkpoints differ), run the gate; the step
        times and the fingerprints to record."""
        model = self.model(d, rollout)
        if before is None:
            before = await self._before(folder, None)
        digest, seen, old = before.digest, {}, None
        if before.previous_digest is not None:
            old = await take_fingerprint(d.client, replica.url, model)
            if old is not None and before.previous_digest not in d.state.fingerprints:
                seen[before.previous_digest] = old.to_record()
        steps = await reload_weights(d.client, replica.url, folder, d.reload_timeout_s)
        checks = _Stopwatch()
        await d.warm([replica], model, light=True)
        steps["warm_s"] = checks.lap()
        after = await take_fingerprint(d.client, replica.url, model)
        steps["fingerprint_s"] = checks.lap()
        recorded = Fingerprint.from_record(d.state.fingerprints.get(digest))
        if after is not None and recorded is not None and not after.answers_like(recorded):
            raise WeightsMismatch(
                f"after reloading {folder}, {replica.name} answers the probe prompts unlike when it last served that "
                f"checkpoint ({after.texts!r} vs {recorded.texts!r}): its weights are not the ones given"
            )
        if after is not None and old is not None and after.identical_to(old):
            raise WeightsMismatch(
                f"after reloading {folder}, {replica.name} answers exactly as before although the checkpoints differ: "
                "the reload kept the old weights (vLLM #32718, #48312)"
            )
        if gate is not None:
            rollout.facts.update(await d.gate.check(d.client, replica.url, model, gate))
        if after is not None:
            seen[digest] = after.to_record()
        return steps, seen

    async def _put_back(self, d: Deployer, rollout: Rollout, replica: Replica, folder: str) -> bool:
        """The previous weights reloaded and answering as recorded (True), or not (their state is unknown)."""
        try:
            await self._swap(d, rollout, replica, folder, None)
        except Exception:
            return False
        return True

    async def _quarantine(self, d: Deployer, name: str, folder: str, version: str, why: str) -> None:
        """Weights unknown: out of rotation at every gateway, recorded as the known-good version it will serve
        again once restarted from ``folder`` (by the supervisor, when shipyard started the engine)."""
        record = d.state.replica(name)
        if record is None:
            return
        quarantined = dataclasses.replace(_serving(record, folder, version), quarantined=why)
        await d.commit(replicas=d.state.with_replica(quarantined))
        handle = d.supervisor.handles.get(name)
        if handle is not None:
            handle.serve_from(folder)
            d.supervisor.restart_now(name, f"weights unknown after a failed in-place update: {why}")


@dataclass(frozen=True)
class _Before:
    digest: str
    previous_digest: str | None = None
    """The checkpoint served before, when it differs from the new one (then the fingerprints must differ)."""


def _serving(record: ReplicaRecord, folder: str, version: str) -> ReplicaRecord:
    """``record``, released, as the engine serving ``folder`` as ``version`` (what a restart loads)."""
    engine = {**record.engine, "model": folder} if record.engine is not None else None
    return dataclasses.replace(record, held=False, version=version, target=folder, engine=engine)


def _served_folder(record: ReplicaRecord) -> str:
    return str((record.engine or {}).get("model") or record.target)
