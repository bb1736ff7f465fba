"""The rollout executor: turns a command into a plan, then performs what ``next_action`` decides, step by step,
saving each step through the control plane before it takes effect."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Protocol

from shipyard.control.audit import AuditLog
from shipyard.control.checks import GateFailed
from shipyard.control.commands import RolloutCommand, RolloutRejected, plan_rollout
from shipyard.control.rollout import Action, Observation, Phase, Rollout, Strategy, next_action
from shipyard.control.store import StateStore
from shipyard.control.strategies import Deployer, RolloutStrategy

log = logging.getLogger("shipyard.control")


class RolloutHost(Deployer, Protocol):
    """What the executor uses of the control plane: the state and its saves, the lease, the audit log, and
    the strategies (each given the host as their :class:`Deployer`). The plane builds the executor; the executor
    knows only this."""

    current: Rollout | None
    lease_user: str | None
    store: StateStore
    audit: AuditLog
    gateway_id: str
    lease_error: str
    strategies: dict[Strategy, RolloutStrategy]
    clock: Callable[[], float]

    @property
    def model_name(self) -> str: ...

    async def acquire_lease(self) -> bool: ...

    async def release_lease(self, lost: bool = False) -> None: ...

    async def keep_lease(self, on_lost: Callable[[str], object]) -> None: ...

    def running_here(self) -> bool: ...

    def scaling_here(self) -> str | None:
        """What the scaler is doing to the model's replicas on this gateway right now, or None."""

    def spawn(self, coro: Any, name: str | None = None) -> None: ...


class RolloutExecutor:
    """Runs one rollout at a time for a :class:`ControlPlane` (which owns the state and the lease)."""

    def __init__(self, control: RolloutHost) -> None:
        self.control = control
        self.promoted = asyncio.Event()
        """Set by ``promote`` (and by a rollback, to end the wait) while a canary waits."""

    async def request(self, command: RolloutCommand) -> Rollout:
        """Validate and start a rollout in the background; RolloutRejected with nothing changed."""
        plan = plan_rollout(
            command,
            current=self.control.current,
            pool=self.control.pool,
            adapters=set(self.control.state.adapters),
            launcher=self.control.launcher,
            gate=self.control.gate,
            records=list(self.control.state.replicas),
        )
        scaling = self.control.scaling_here() or (
            "its lease is in use by the scaler" if self.control.lease_user == "scaler" else None
        )
        if scaling is not None:
            raise RolloutRejected(
                409,
                f"{self.control.model_name or 'the model'} is being scaled ({scaling}); a rollout starts once that "
                "step ends: try again in a moment",
            )
        self.control.lease_user = "rollout"  # before the first await: the scaler leaves the lease alone
        if not await self.control.acquire_lease():
            self.control.lease_user = None
            if self.control.lease_error:
                raise RolloutRejected(
                    503,
                    f"the state store cannot be reached ({self.control.lease_error}); nothing was changed: "
                    "rollouts wait until it answers",
                )
            owner = await self.control.store.lease_owner()
            of = f" of {self.control.model_name}" if self.control.model_name else ""
            raise RolloutRejected(
                409, f"gateway {owner} is running a rollout{of}; one at a time per model across all gateways"
            )
        rollout = Rollout(plan, clock=self.control.clock)
        before, self.control.current = self.control.current, rollout
        try:
            await self.control.commit()
        except Exception as exc:  # nothing was saved: nothing changes, the lease goes back
            self.control.current = before
            await self.control.release_lease()
            self.control.lease_user = None
            raise RolloutRejected(503, f"the rollout was not started: {exc}") from exc
        self.promoted = asyncio.Event()
        self.control.audit.record(
            command.who,
            "rollout_requested",
            rollout=rollout.id,
            target=command.target,
            version=plan.version,
            canary_percent=command.canary_percent,
            gate=command.gate,
            lora=command.lora,
            strategy=plan.strategy.value,
        )
        self.control.spawn(self._drive(rollout, Observation()), name="shipyard-rollout")
        return rollout

    def _owned(self, verb: str) -> Rollout:
        rollout = self.control.current
        if rollout is not None and rollout.active and not self.control.running_here():
            raise RolloutRejected(409, f"rollout {rollout.id} runs on another gateway; {verb} it there")
        if rollout is None:
            raise RolloutRejected(409, f"no rollout to {verb}")
        return rollout

    async def promote(self, who: str) -> Rollout:
        rollout = self.control.current
        if rollout is None or rollout.phase is not Phase.CANARY:
            raise RolloutRejected(409, "no canary to promote (promote applies to a rollout in its canary phase)")
        self._owned("promote")
        self.control.audit.record(who, "promote", rollout=rollout.id)
        self.promoted.set()
        return rollout

    async def rollback(self, who: str) -> Rollout:
        rollout = self.control.current
        if rollout is None or not rollout.active:
            update = self._last_in_place_update()
            if update is not None:
                previous = next(iter(update.facts["previous"].values()))
                self.control.audit.record(
                    who, "rollback", rollout=update.id, phase=update.phase.value, strategy="inplace"
                )
                return await self.request(
                    RolloutCommand(previous["target"], version=previous["version"], who=who, strategy="inplace")
                )
        if rollout is None or rollout.phase not in (Phase.CANARY, Phase.DRAINING):
            raise RolloutRejected(
                409,
                "nothing to roll back: the previous version is no longer running (roll back while the "
                "rollout is in its canary or draining phase, after an in-place update, or deploy the old "
                "version again)",
            )
        self._owned("roll back")
        strategy = self.control.strategies[rollout.plan.strategy]
        rollout.advance(Phase.ROLLED_BACK, f"by {who}")
        await self.control.commit(**strategy.restore(self.control, rollout))
        self.control.audit.record(who, "rollback", rollout=rollout.id, phase=rollout.phase.value)
        self.promoted.set()
        return rollout

    def _last_in_place_update(self) -> Rollout | None:
        """The last rollout that completed, if it was an in-place update whose version is still served."""
        done = [h for h in self.control.state.history if h.get("phase") == Phase.DONE.value]
        if not done:
            return None
        last = Rollout.from_record(done[-1], clock=self.control.clock)
        served = {r.version for r in self.control.state.replicas}
        if last.plan.strategy is not Strategy.IN_PLACE or served != {last.plan.version}:
            return None
        return last if last.facts.get("previous") else None

    def resume(self, rollout: Rollout) -> None:
        if self.control.running_here():
            return
        self.control.audit.record(
            self.control.gateway_id, "rollout_resumed", rollout=rollout.id, phase=rollout.phase.value
        )
        self.promoted = asyncio.Event()
        self.control.lease_user = "rollout"
        self.control.spawn(self._drive(rollout, Observation(interrupted=True)), name="shipyard-rollout")

    async def _enter(self, rollout: Rollout, phase: Phase, note: str = "", **changes: Any) -> None:
        if rollout.phase is not phase:
            rollout.advance(phase, note)
        await self.control.commit(**changes)
        self.control.audit.record("rollout", "phase", rollout=rollout.id, phase=phase.value)

    async def _drive(self, rollout: Rollout, seen: Observation) -> None:
        strategy = self.control.strategies[rollout.plan.strategy]
        driving = asyncio.current_task()
        assert driving is not None
        keeper = asyncio.get_running_loop().create_task(self.control.keep_lease(lambda why: driving.cancel(why)))
        try:
            while (action := next_action(rollout, seen)) is not Action.NOTHING:
                seen = await self._perform(action, strategy, rollout, seen)
        finally:
            lost = keeper.done()  # it returns only when the lease was lost
            keeper.cancel()
            try:
                await self.control.release_lease(lost=lost)  # the fence goes with it
            finally:
                self.control.lease_user = None

    async def _perform(
        self, action: Action, strategy: RolloutStrategy, rollout: Rollout, seen: Observation
    ) -> Observation:
        try:
            return await self._step(action, strategy, rollout, seen)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # before the switch: the old version keeps serving; after: note it and go on
            in_place_switch = rollout.plan.strategy is Strategy.IN_PLACE and rollout.phase is Phase.SWITCHING
            if in_place_switch or rollout.phase in (Phase.PENDING, Phase.STARTING, Phase.WARMING, Phase.GATING):
                rollout.facts.update(getattr(exc, "facts", {}))
                return Observation(error=str(exc) if isinstance(exc, GateFailed) else f"{type(exc).__name__}: {exc}")
            log.exception("rollout %s: %s failed in %s", rollout.id, action.value, rollout.phase.value)
            rollout.error = f"{type(exc).__name__}: {exc}"
            return dataclasses.replace(seen, done=True, retired=True)

    async def _step(
        self, action: Action, strategy: RolloutStrategy, rollout: Rollout, seen: Observation
    ) -> Observation:
        if action is Action.PREPARE:
            await self._enter(rollout, Phase.STARTING)
            await strategy.prepare(self.control, rollout)
        elif action is Action.WARM_UP:
            await self._enter(rollout, Phase.WARMING)
            await strategy.warm_up(self.control, rollout)
        elif action is Action.GATE:
            await self._enter(rollout, Phase.GATING)
            replica = strategy.new_replicas(self.control, rollout)[0]
            assert rollout.plan.gate is not None
            rollout.facts.update(
                await self.control.gate.check(
                    self.control.client, replica.url, strategy.model(self.control, rollout), rollout.plan.gate
                )
            )
        elif action is Action.OPEN_CANARY:
            await self._enter(rollout, Phase.CANARY, **strategy.canary(self.control, rollout))
            return Observation()
        elif action is Action.AWAIT_PROMOTE:
            await self.promoted.wait()
            return Observation(promoted=rollout.phase is Phase.CANARY)
        elif action is Action.SWITCH:
            ready_at = self.control.clock()
            await self._enter(rollout, Phase.SWITCHING, **strategy.switch(self.control, rollout))
            await strategy.after_switch(self.control, rollout)
            rollout.facts["switch_s"] = round(self.control.clock() - ready_at, 6)
        elif action is Action.DRAIN:
            await self._enter(rollout, Phase.DRAINING)
            await strategy.drain(self.control, rollout)
        elif action is Action.FINISH:
            await self._finish(rollout, Phase.DONE)
            return Observation()
        elif action is Action.ABORT:
            reason = seen.error or f"interrupted in phase {rollout.phase.value} (the gateway running it stopped)"
            rollout.error = reason
            rollout.advance(Phase.FAILED, reason)
            self.control.audit.record("rollout", "rollout_failed", rollout=rollout.id, error=reason)
            await self.control.commit(**strategy.restore(self.control, rollout))
            await self._retire(strategy, rollout)
            await self._finish(rollout, Phase.FAILED)
            return Observation(retired=True)
        elif action is Action.RETIRE_NEW:
            await self._retire(strategy, rollout)
            await self._finish(rollout, Phase.ROLLED_BACK)
            return Observation(retired=True)
        return Observation(done=True)

    async def _retire(self, strategy: RolloutStrategy, rollout: Rollout) -> None:
        """Take the new version out. A failure (the strategy has put what it could back, and quarantined what it
        could not) is recorded on the rollout, which still ends with its history entry."""
        try:
            await strategy.retire_new(self.control, rollout)
        except Exception as exc:
            rollout.facts["retire_error"] = f"{type(exc).__name__}: {exc}"
            self.control.audit.record(
                "rollout", "retire_failed", rollout=rollout.id, error=rollout.facts["retire_error"]
            )

    async def _finish(self, rollout: Rollout, phase: Phase) -> None:
        if rollout.phase is not phase:
            rollout.advance(phase)
        history = [*(h for h in self.control.state.history if h.get("id") != rollout.id), rollout.to_record()]
        await self.control.commit(history=history)
        self.control.audit.record("rollout", "phase", rollout=rollout.id, phase=phase.value)
