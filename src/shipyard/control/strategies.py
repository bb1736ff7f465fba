"""Rollout strategies: how a new version is prepared, switched to, and how the old one is retired.

Each is a small class over a :class:`Deployer` (the control plane, as the strategy needs it). A strategy never
moves traffic itself: ``canary``/``switch``/``restore`` return the state changes, which the executor saves
before they take effect, so a gateway that dies between two steps leaves a state another one can finish.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx

from shipyard.control.checks import QualityGate
from shipyard.control.launcher import ExternalReplica, Launcher, ReplicaHandle, is_url
from shipyard.control.rollout import Phase, Rollout, Strategy, traffic_weights
from shipyard.control.state import DeploymentState, ReplicaRecord
from shipyard.control.supervisor import Supervisor
from shipyard.router.health import probe
from shipyard.router.replica import Replica, ReplicaPool


class Deployer(Protocol):
    """What strategies use of the control plane."""

    pool: ReplicaPool
    client: httpx.AsyncClient
    launcher: Launcher
    supervisor: Supervisor
    drain_timeout_s: float
    ready_timeout_s: float
    reload_timeout_s: float
    gate: QualityGate

    @property
    def state(self) -> DeploymentState: ...

    async def commit(self, **changes: Any) -> DeploymentState: ...

    def record(self, name: str, handle: ReplicaHandle, **fields: Any) -> ReplicaRecord: ...

    async def wait_ready(self, replica: Replica, deadline_s: float) -> None: ...

    async def warm(self, replicas: list[Replica], model: str, light: bool) -> None: ...

    async def in_flight(self, replicas: set[str] = frozenset(), model: str | None = None) -> int:  # type: ignore[assignment]
        """Requests in flight on every gateway, to these replicas or for this upstream model."""

    async def pause(self, seconds: float) -> None: ...

    def now(self) -> float: ...

    def monotonic(self) -> float:
        """For deadlines and durations (the wall clock may jump)."""

    async def settle(self) -> None:
        """Return once every live gateway has applied the current state (e.g. holds a replica)."""

    def paused(self, seconds: float, strategy: str) -> None:
        """Report how long users of a replica waited for an update (metrics, audit)."""


class RolloutStrategy(ABC):
    """prepare → warm up → (gate) → [canary] → switch → drain; ``restore`` and ``retire_new`` undo."""

    kind: Strategy

    @abstractmethod
    async def prepare(self, d: Deployer, rollout: Rollout) -> None:
        """Make the new version serve somewhere users do not reach yet."""

    def new_replicas(self, d: Deployer, rollout: Rollout) -> list[Replica]:
        """The replicas that serve (or will serve) the new version: those of the plan's new deployment."""
        return d.pool.deployments().get(rollout.plan.new_deployment, [])

    def model(self, d: Deployer, rollout: Rollout) -> str:
        """The upstream model name of the new version (for warm-up and the gate)."""
        replicas = self.new_replicas(d, rollout)
        return next(iter(replicas[0].models)) if replicas and replicas[0].models else rollout.plan.version

    async def warm_up(self, d: Deployer, rollout: Rollout) -> None:
        await d.warm(self.new_replicas(d, rollout), self.model(d, rollout), light=False)

    def canary(self, d: Deployer, rollout: Rollout) -> dict[str, Any]:
        """State changes for the canary share; only blue-green has one (``plan_rollout`` refuses ``--canary``
        for the others, so reaching this is a bug)."""
        raise RuntimeError(f"a {self.kind.value} rollout has no canary phase")

    @abstractmethod
    def switch(self, d: Deployer, rollout: Rollout) -> dict[str, Any]:
        """State changes that send users to the new version."""

    async def after_switch(self, d: Deployer, rollout: Rollout) -> None:
        """Work done once the switch is saved (the in-place reload); nothing for most strategies."""
        return None

    @abstractmethod
    def restore(self, d: Deployer, rollout: Rollout) -> dict[str, Any]:
        """State changes that send users back to the old version."""

    @abstractmethod
    async def drain(self, d: Deployer, rollout: Rollout) -> None:
        """Wait for the old version's requests, then retire it."""

    @abstractmethod
    async def retire_new(self, d: Deployer, rollout: Rollout) -> None:
        """Retire the new version (failed, rolled back, or interrupted before the switch)."""


async def wait_idle(
    d: Deployer,
    rollout: Rollout,
    *,
    replicas: set[str] = frozenset(),  # type: ignore[assignment]
    model: str | None = None,
    phase: Phase | None = None,
) -> bool:
    """Wait until nothing is in flight (on any gateway) for these replicas/model, or the rollout leaves ``phase``
    (a rollback during the drain); False when the drain timed out."""
    deadline = d.monotonic() + d.drain_timeout_s
    while await d.in_flight(replicas, model) > 0:
        if d.monotonic() > deadline:
            return False
        if phase is not None and rollout.phase is not phase:
            return True
        await d.pause(0.05)
    return True


class BlueGreen(RolloutStrategy):
    """A new engine (or a running server, for a URL target) beside the old one, then traffic moves in one step."""

    kind = Strategy.BLUE_GREEN

    def _name(self, rollout: Rollout) -> str:
        return f"{rollout.plan.new_deployment}-{rollout.plan.version}"

    async def prepare(self, d: Deployer, rollout: Rollout) -> None:
        plan = rollout.plan
        name = self._name(rollout)
        busy = {r.cpu_bind for r in d.state.replicas if r.cpu_bind} | {r.devices for r in d.state.replicas if r.devices}
        handle: ReplicaHandle = (
            ExternalReplica(plan.target)
            if is_url(plan.target)
            else d.launcher.prepare(plan.target, name, busy_binds=busy)
        )
        handle.spawn()
        record = d.record(name, handle, deployment=plan.new_deployment, version=plan.version, target=plan.target)
        weights = dict(d.state.weights)
        if plan.old_deployment is not None and not weights.get(plan.new_deployment):
            weights[plan.new_deployment] = 0.0
        rollout.facts["replica"] = name
        await d.commit(replicas=d.state.with_replica(record), weights=weights)  # recorded before it is ready
        await handle.wait_ready()
        d.supervisor.manage(name, handle)
        with_identity = d.record(name, handle, deployment=plan.new_deployment, version=plan.version, target=plan.target)
        if with_identity != record:
            await d.commit(replicas=d.state.with_replica(with_identity))
        replica = next(r for r in d.pool.replicas if r.name == name)
        await d.wait_ready(replica, d.ready_timeout_s)

    @staticmethod
    def _weights(rollout: Rollout, phase: Phase) -> dict[str, Any]:
        weights = traffic_weights(rollout, phase)
        return {} if weights is None else {"weights": weights}

    def canary(self, d: Deployer, rollout: Rollout) -> dict[str, Any]:
        return self._weights(rollout, Phase.CANARY)

    def switch(self, d: Deployer, rollout: Rollout) -> dict[str, Any]:
        return self._weights(rollout, Phase.SWITCHING)

    def restore(self, d: Deployer, rollout: Rollout) -> dict[str, Any]:
        return self._weights(rollout, Phase.FAILED)

    async def _retire(
        self, d: Deployer, rollout: Rollout, deployment: str | None, keep: str, phase: Phase | None = None
    ) -> None:
        names = {r.name for r in d.state.replicas if r.deployment == deployment}
        names |= {r.name for r in d.pool.replicas if r.deployment == deployment}
        if phase is not None:
            rollout.facts["drained_in_flight"] = await d.in_flight(names)
        timed_out = not await wait_idle(d, rollout, replicas=names, phase=phase)
        if phase is not None:
            rollout.facts["drain_timed_out"] = timed_out
            if rollout.phase is not phase:
                return  # rolled back during the drain: the old version stays
        for name in sorted(names):
            await d.supervisor.stop_process(name)
        weights = {k: v for k, v in d.state.weights.items() if k != deployment}
        await d.commit(replicas=d.state.without_replicas(names), weights=weights or {keep: 1.0})
        for replica in [r for r in d.pool.replicas if r.name in names]:
            d.pool.remove(replica)  # replicas found by DNS are not in the state; they leave the pool here

    async def drain(self, d: Deployer, rollout: Rollout) -> None:
        await self._retire(d, rollout, rollout.plan.old_deployment, rollout.plan.new_deployment, Phase.DRAINING)

    async def retire_new(self, d: Deployer, rollout: Rollout) -> None:
        name = rollout.facts.get("replica") or self._name(rollout)
        if d.state.replica(name) is None and name not in d.supervisor.handles:
            return
        await self._retire(d, rollout, rollout.plan.new_deployment, rollout.plan.old_deployment or "blue")


class LoraAlias(RolloutStrategy):
    """A LoRA adapter loaded into the running engines under ``ALIAS@VERSION``; the alias users call moves to it."""

    kind = Strategy.LORA

    async def prepare(self, d: Deployer, rollout: Rollout) -> None:
        plan = rollout.plan
        replicas = self.new_replicas(d, rollout)
        if not replicas:
            raise RuntimeError(f"deployment {plan.new_deployment} has no replicas")
        base = next(iter(replicas[0].models))
        alias = next((a for a, target in d.pool.aliases.items() if target == base), base)
        new_model = f"{alias}@{plan.version}"
        rollout.facts.update(alias=alias, old_model=d.pool.upstream_model(alias), new_model=new_model)
        path = str(Path(plan.target).resolve())
        await d.commit(adapters={**d.state.adapters, new_model: path})
        for replica in replicas:
            await load_adapter(d.client, replica, new_model, path)
            await probe(d.client, replica)  # it now lists the adapter: the alias may point at it

    def model(self, d: Deployer, rollout: Rollout) -> str:
        return str(rollout.facts["new_model"])

    async def warm_up(self, d: Deployer, rollout: Rollout) -> None:
        await d.warm(self.new_replicas(d, rollout), self.model(d, rollout), light=True)

    def _aliases(self, d: Deployer, alias: str, target: str | None) -> dict[str, Any]:
        aliases = dict(d.state.aliases)
        if target is None or target == alias:
            aliases.pop(alias, None)
        else:
            aliases[alias] = target
        return {"aliases": aliases}

    def switch(self, d: Deployer, rollout: Rollout) -> dict[str, Any]:
        return self._aliases(d, rollout.facts["alias"], rollout.facts["new_model"])

    def restore(self, d: Deployer, rollout: Rollout) -> dict[str, Any]:
        if "alias" not in rollout.facts:
            return {}
        return self._aliases(d, rollout.facts["alias"], rollout.facts.get("old_model"))

    async def _unload(self, d: Deployer, rollout: Rollout, model: str) -> None:
        if model not in d.state.adapters:
            return
        for replica in self.new_replicas(d, rollout):
            with contextlib.suppress(httpx.HTTPError):
                await d.client.post(f"{replica.url}/v1/unload_lora_adapter", json={"lora_name": model}, timeout=60)
        await d.commit(adapters={k: v for k, v in d.state.adapters.items() if k != model})

    async def drain(self, d: Deployer, rollout: Rollout) -> None:
        old_model = str(rollout.facts["old_model"])
        rollout.facts["drained_in_flight"] = await d.in_flight(model=old_model)
        rollout.facts["drain_timed_out"] = not await wait_idle(d, rollout, model=old_model, phase=Phase.DRAINING)
        if rollout.phase is Phase.DRAINING:
            await self._unload(d, rollout, old_model)

    async def retire_new(self, d: Deployer, rollout: Rollout) -> None:
        new_model = rollout.facts.get("new_model")
        if new_model:
            await wait_idle(d, rollout, model=new_model)
            await self._unload(d, rollout, new_model)


async def load_adapter(client: httpx.AsyncClient, replica: Replica, name: str, path: str) -> None:
    response = await client.post(
        f"{replica.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=120
    )
    if response.status_code != 200 and "already" not in response.text:
        raise RuntimeError(
            f"{replica.name} refused the adapter ({response.status_code}): {response.text[:300]} "
            "(engines need --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
        )


async def reload_adapters(client: httpx.AsyncClient, replica: Replica, adapters: Mapping[str, str]) -> None:
    """Load the deployment's adapters into an engine that restarted (errors are left to the health probe)."""
    for name, path in adapters.items():
        with contextlib.suppress(httpx.HTTPError, RuntimeError):
            await load_adapter(client, replica, name, path)
