"""The executor of rollouts and crash recovery: performs what ``rollout`` decides, on the pool and processes.

Blue-green: start the new version beside the old one → ready → warm up (incl. structured-output grammars)
→ optional quality gate → switch weights in one assignment (or to the canary share) → drain the old one
(its in-flight requests and streams finish) → stop it. A failure before the switch leaves the old version
serving. LoRA: load the adapter into the running engines under a new name per version and move the served
alias in one assignment. A replica whose process dies is marked unready at once and restarted with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from shipyard.router.audit import AuditLog
from shipyard.router.health import probe
from shipyard.router.launcher import Launcher, ReplicaHandle
from shipyard.router.replica import Replica, ReplicaPool
from shipyard.router.rollout import (
    IllegalTransition,
    Phase,
    Rollout,
    RolloutPlan,
    other_color,
    parse_gate,
    traffic_weights,
)
from shipyard.tasks.intent import LabelSet, intent_body, parse_intent
from shipyard.tasks.reply import Message, ReplyTemplate, reply_body

log = logging.getLogger("shipyard.router")


class RolloutRejected(Exception):
    """A rollout command that cannot be carried out; nothing was changed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class OrchestratorConfig:
    drain_timeout_s: float = 120.0
    ready_timeout_s: float = 600.0
    warmup_requests: int = 3
    gate_dataset: Path | None = None
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    watch_interval_s: float = 0.2


class Orchestrator:
    def __init__(
        self,
        pool: ReplicaPool,
        client: httpx.AsyncClient,
        launcher: Launcher,
        *,
        labels: LabelSet,
        templates: dict[str, ReplyTemplate],
        audit: AuditLog,
        config: OrchestratorConfig | None = None,
    ) -> None:
        self.pool = pool
        self.client = client
        self.launcher = launcher
        self.labels = labels
        self.templates = templates
        self.audit = audit
        self.config = config or OrchestratorConfig()
        self.handles: dict[str, ReplicaHandle] = {}
        self.restarts: dict[str, int] = {}
        self.adapters: dict[str, str] = {}
        """LoRA adapter name -> folder, re-loaded into an engine after it restarts."""
        self.current: Rollout | None = None
        self.history: list[Rollout] = []
        self._promote = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._restarting: set[str] = set()

    # ----- registration and crash recovery -------------------------------------------------------------

    def manage(self, replica: Replica, handle: ReplicaHandle) -> None:
        """Own ``replica``'s process: restart it when it dies."""
        self.handles[replica.name] = handle

    def start(self) -> None:
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_processes(), name="shipyard-watch")

    async def stop(self) -> None:
        for task in [*self._tasks, *([self._watch] if self._watch else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watch = None

    async def _watch_processes(self) -> None:
        while True:
            for replica in self.pool.replicas:
                handle = self.handles.get(replica.name)
                if handle is not None and not handle.alive() and replica.name not in self._restarting:
                    self.pool.mark_unready(replica, "engine process exited")
                    self._restarting.add(replica.name)
                    self._spawn(self._restart(replica, handle))
            await asyncio.sleep(self.config.watch_interval_s)

    async def _restart(self, replica: Replica, handle: ReplicaHandle) -> None:
        delay = self.config.restart_backoff_s
        try:
            while replica in self.pool.replicas:
                count = self.restarts[replica.name] = self.restarts.get(replica.name, 0) + 1
                self.audit.record("supervisor", "replica_restart", replica=replica.name, attempt=count, after_s=delay)
                await asyncio.sleep(delay)
                try:
                    await handle.restart()
                except Exception as exc:  # any failure to start means: back off and try again
                    replica.last_error = f"restart failed: {exc}"
                    delay = min(delay * 2, self.config.restart_backoff_max_s)
                    continue
                await self._reload_adapters(replica)
                await probe(self.client, replica)
                self.audit.record("supervisor", "replica_restarted", replica=replica.name, ready=replica.ready)
                return
        finally:
            self._restarting.discard(replica.name)

    async def _reload_adapters(self, replica: Replica) -> None:
        for name, path in self.adapters.items():
            with contextlib.suppress(httpx.HTTPError):
                await self.client.post(
                    f"{replica.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=60
                )

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----- commands ------------------------------------------------------------------------------------

    def active_deployment(self) -> str | None:
        weights = self.pool.weights
        live = [name for name, weight in weights.items() if weight > 0 and name in self.pool.deployments()]
        return max(live, key=lambda n: weights[n]) if live else None

    def request(
        self, target: str, *, version: str | None, canary_percent: float | None, gate: str | None, lora: bool, who: str
    ) -> Rollout:
        """Validate and start a rollout in the background; raise RolloutRejected with nothing changed."""
        if self.current is not None and self.current.active:
            raise RolloutRejected(
                409,
                f"rollout {self.current.id} is still {self.current.phase.value}; "
                "promote, roll back or wait for it first",
            )
        if len(self.pool.deployments()) > 1:
            raise RolloutRejected(
                409,
                f"deployments {sorted(self.pool.deployments())} are both present: the previous version is still "
                "draining or being stopped; retry when `shipyard rollout status` shows one",
            )
        if canary_percent is not None and lora:
            raise RolloutRejected(
                400,
                "a LoRA rollout switches the served model in place; --canary needs a "
                "full deployment (deploy the merged model instead)",
            )
        if canary_percent is not None and not 0 < canary_percent < 100:
            raise RolloutRejected(400, "canary percent must be between 0 and 100 (exclusive)")
        try:
            parsed_gate = parse_gate(gate) if gate else None
        except ValueError as exc:
            raise RolloutRejected(400, str(exc)) from None
        if parsed_gate is not None and (self.config.gate_dataset is None or not self.config.gate_dataset.is_file()):
            raise RolloutRejected(
                400,
                f"the quality gate cannot run: gate dataset {self.config.gate_dataset} "
                "is missing (settings: gate_dataset)",
            )
        old = self.active_deployment()
        if lora:
            self._check_adapter(target, old)
        else:
            try:
                self.launcher.check(target)
            except ValueError as exc:
                raise RolloutRejected(400, str(exc)) from None
        name = version or Path(target.rstrip("/")).name or "next"
        known = {r.version for r in self.pool.replicas} | {a.rpartition("@")[2] for a in self.adapters}
        if name in known:
            raise RolloutRejected(409, f"version {name!r} is already served; give the new one another --version")
        new_deployment = (old or "default") if lora else other_color(old)
        plan = RolloutPlan(target, name, new_deployment, old, canary_percent, parsed_gate, lora, who)
        rollout = Rollout(plan)
        self.current = rollout
        self.history.append(rollout)
        self._promote = asyncio.Event()
        self.audit.record(
            who,
            "rollout_requested",
            rollout=rollout.id,
            target=target,
            version=name,
            canary_percent=canary_percent,
            gate=gate,
            lora=lora,
        )
        self._spawn(self._run(rollout))
        return rollout

    def _check_adapter(self, target: str, old: str | None) -> None:
        folder = Path(target)
        if not (folder / "adapter_config.json").is_file():
            raise RolloutRejected(400, f"{target} is not a LoRA adapter folder (no adapter_config.json)")
        if old is None:
            raise RolloutRejected(409, "a LoRA rollout needs a running base deployment")

    def promote(self, who: str) -> Rollout:
        rollout = self.current
        if rollout is None or rollout.phase is not Phase.CANARY:
            raise RolloutRejected(409, "no canary to promote (promote applies to a rollout in its canary phase)")
        self.audit.record(who, "promote", rollout=rollout.id)
        self._promote.set()
        return rollout

    def rollback(self, who: str) -> Rollout:
        rollout = self.current
        if rollout is None or rollout.phase not in (Phase.CANARY, Phase.DRAINING):
            raise RolloutRejected(
                409,
                "nothing to roll back: the previous version is no longer running (roll back while the "
                "rollout is in its canary or draining phase, or deploy the old version again)",
            )
        rollout.advance(Phase.ROLLED_BACK, f"by {who}")
        self._apply_traffic(rollout)
        self.audit.record(who, "rollback", rollout=rollout.id, phase=rollout.phase.value)
        self._spawn(self._retire_new(rollout))
        return rollout

    # ----- the rollout itself ------------------------------------------------------------------------------

    async def _run(self, rollout: Rollout) -> None:
        plan = rollout.plan
        try:
            self._enter(rollout, Phase.STARTING)
            replicas, model = await (self._load_adapter(rollout) if plan.lora else self._start_new(rollout))
            self._enter(rollout, Phase.WARMING)
            await self._warm_up(replicas, model, light=plan.lora)
            if plan.gate is not None:
                self._enter(rollout, Phase.GATING)
                await self._gate(rollout, replicas[0], model)
            ready_at = time.monotonic()
            if plan.canary_percent is not None:
                self._enter(rollout, Phase.CANARY)
                self._apply_traffic(rollout)
                await self._promote.wait()
                if rollout.phase is not Phase.CANARY:
                    return  # rolled back while waiting
                ready_at = time.monotonic()
            self._enter(rollout, Phase.SWITCHING)
            self._apply_traffic(rollout)
            rollout.facts["switch_s"] = round(time.monotonic() - ready_at, 6)
            self._enter(rollout, Phase.DRAINING)
            await self._drain_old(rollout)
            if rollout.phase is Phase.DRAINING:
                self._enter(rollout, Phase.DONE)
        except IllegalTransition:
            return  # a rollback moved the rollout on while this step was running
        except Exception as exc:  # any failure before the switch must leave the old version serving
            if rollout.phase in (Phase.STARTING, Phase.WARMING, Phase.GATING, Phase.PENDING):
                rollout.fail(f"{type(exc).__name__}: {exc}")
                self.audit.record("rollout", "rollout_failed", rollout=rollout.id, error=rollout.error)
                self._apply_traffic(rollout)
                await self._retire_new(rollout)
            else:
                log.exception("rollout %s failed after the switch", rollout.id)
                rollout.error = f"{type(exc).__name__}: {exc}"

    def _enter(self, rollout: Rollout, phase: Phase) -> None:
        rollout.advance(phase)
        self.audit.record("rollout", "phase", rollout=rollout.id, phase=phase.value)

    def _apply_traffic(self, rollout: Rollout) -> None:
        plan = rollout.plan
        if plan.lora:
            alias = rollout.facts.get("alias")
            if alias is None:
                return
            if rollout.phase in (Phase.SWITCHING, Phase.DRAINING, Phase.DONE):
                self.pool.set_alias(alias, rollout.facts["new_model"])
            elif rollout.phase in (Phase.ROLLED_BACK, Phase.FAILED):
                self.pool.set_alias(alias, rollout.facts.get("old_model"))
            return
        weights = traffic_weights(rollout)
        if weights is not None:
            self.pool.set_weights(weights)

    async def _start_new(self, rollout: Rollout) -> tuple[list[Replica], str]:
        plan = rollout.plan
        name = f"{plan.new_deployment}-{plan.version}"
        if plan.old_deployment is not None and not self.pool.weights.get(plan.new_deployment):
            self.pool.set_weights({**self.pool.weights, plan.new_deployment: 0.0})
        handle = await self.launcher.launch(plan.target, name)
        replica = Replica(handle.url, name=name, deployment=plan.new_deployment, version=plan.version)
        rollout.facts["replica"] = name
        self.handles[name] = handle
        self.pool.add(replica)
        deadline = time.monotonic() + self.config.ready_timeout_s
        while not replica.ready:
            await probe(self.client, replica)
            if time.monotonic() > deadline:
                raise TimeoutError(f"new replica not ready after {self.config.ready_timeout_s}s: {replica.last_error}")
            if not replica.ready:
                await asyncio.sleep(0.2)
        return [replica], next(iter(replica.models))

    async def _load_adapter(self, rollout: Rollout) -> tuple[list[Replica], str]:
        plan = rollout.plan
        replicas = self.pool.deployments().get(plan.new_deployment, [])
        if not replicas:
            raise RuntimeError(f"deployment {plan.new_deployment} has no replicas")
        alias = next(iter(replicas[0].models))
        alias = next((a for a, target in self.pool.aliases.items() if target == alias), alias)
        new_model = f"{alias}@{plan.version}"
        rollout.facts.update(alias=alias, old_model=self.pool.upstream_model(alias), new_model=new_model)
        path = str(Path(plan.target).resolve())
        for replica in replicas:
            response = await self.client.post(
                f"{replica.url}/v1/load_lora_adapter", json={"lora_name": new_model, "lora_path": path}, timeout=120
            )
            if response.status_code != 200:
                raise RuntimeError(
                    f"{replica.name} refused the adapter ({response.status_code}): "
                    f"{response.text[:300]} (engines need --enable-lora and "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
                )
            await probe(self.client, replica)
        self.adapters[new_model] = path
        return replicas, new_model

    async def _warm_up(self, replicas: list[Replica], model: str, light: bool = False) -> None:
        """Real requests, including structured outputs, so first users do not pay for grammar compilation.

        ``light``: one 1-token request per replica, to prove the new model answers. Enough for a LoRA adapter,
        which runs in an engine whose kernels and grammars are already warm.
        """
        if light:
            for replica in replicas:
                response = await self.client.post(
                    f"{replica.url}/v1/chat/completions",
                    timeout=120,
                    json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
                )
                if response.status_code != 200:
                    raise RuntimeError(
                        f"{model} does not answer on {replica.name}: HTTP {response.status_code} {response.text[:200]}"
                    )
            return
        template = next(iter(self.templates.values()))
        conversation = [Message(role="user", content="My parcel is late and I want a refund.")]
        bodies = [
            {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8},
            intent_body(model, self.labels, "I lost my card"),
            {**reply_body(model, template, conversation), "max_tokens": 32},
        ]
        for replica in replicas:
            for i in range(max(self.config.warmup_requests, 1)):
                body = bodies[i % len(bodies)]
                response = await self.client.post(f"{replica.url}/v1/chat/completions", json=body, timeout=300)
                if response.status_code != 200:
                    raise RuntimeError(
                        f"warm-up request failed on {replica.name}: HTTP {response.status_code} {response.text[:200]}"
                    )

    async def _gate(self, rollout: Rollout, replica: Replica, model: str) -> None:
        from shipyard.evaluate.datasets import load_intent_dataset

        gate = rollout.plan.gate
        assert gate is not None and self.config.gate_dataset is not None
        examples = load_intent_dataset(self.config.gate_dataset, self.labels.labels).examples[: gate.n]
        correct = 0
        for example in examples:
            response = await self.client.post(
                f"{replica.url}/v1/chat/completions", json=intent_body(model, self.labels, example.text), timeout=120
            )
            response.raise_for_status()
            correct += parse_intent(self.labels, response.json()) == example.label
        accuracy = correct / len(examples)
        rollout.facts["gate_accuracy"] = round(accuracy, 4)
        rollout.facts["gate_n"] = len(examples)
        if accuracy < gate.min_accuracy:
            raise RuntimeError(
                f"quality gate failed: intent accuracy {accuracy:.3f} < {gate.min_accuracy} on {len(examples)} examples"
            )

    async def _drain_old(self, rollout: Rollout) -> None:
        plan = rollout.plan
        deadline = time.monotonic() + self.config.drain_timeout_s
        if plan.lora:
            old_model = rollout.facts["old_model"]
            rollout.facts["drained_in_flight"] = self.pool.in_flight_for(old_model)
            while self.pool.in_flight_for(old_model) > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            rollout.facts["drain_timed_out"] = self.pool.in_flight_for(old_model) > 0
            if rollout.phase is not Phase.DRAINING:
                return
            await self._unload_adapter(plan.new_deployment, old_model)
            return
        old = [r for r in self.pool.replicas if r.deployment == plan.old_deployment]
        rollout.facts["drained_in_flight"] = sum(r.in_flight for r in old)
        while any(r.in_flight for r in old) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if rollout.phase is not Phase.DRAINING:
                return  # rolled back during the drain: the old version stays
        rollout.facts["drain_timed_out"] = any(r.in_flight for r in old)
        await self._remove(old)
        weights = {k: v for k, v in self.pool.weights.items() if k != plan.old_deployment}
        self.pool.set_weights(weights or {plan.new_deployment: 1.0})

    async def _retire_new(self, rollout: Rollout) -> None:
        plan = rollout.plan
        if plan.lora:
            new_model = rollout.facts.get("new_model")
            while new_model and self.pool.in_flight_for(new_model) > 0:
                await asyncio.sleep(0.05)
            if new_model:
                await self._unload_adapter(plan.new_deployment, new_model)
            return
        new = [r for r in self.pool.replicas if r.deployment == plan.new_deployment]
        deadline = time.monotonic() + self.config.drain_timeout_s
        while any(r.in_flight for r in new) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self._remove(new)
        pending = rollout.facts.get("replica")
        if pending and pending in self.handles and not any(r.name == pending for r in self.pool.replicas):
            await self.handles.pop(pending).stop()  # started, but never added to the pool
        weights = {k: v for k, v in self.pool.weights.items() if k != plan.new_deployment}
        if weights:
            self.pool.set_weights(weights)

    async def _unload_adapter(self, deployment: str, name: str) -> None:
        """Unload a runtime LoRA adapter from a deployment's engines (the base model is never unloaded)."""
        if name not in self.adapters:
            return
        for replica in self.pool.deployments().get(deployment, []):
            with contextlib.suppress(httpx.HTTPError):
                await self.client.post(f"{replica.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
        self.adapters.pop(name, None)

    async def _remove(self, replicas: list[Replica]) -> None:
        for replica in replicas:
            self.pool.remove(replica)
            handle = self.handles.pop(replica.name, None)
            if handle is not None:
                await handle.stop()

    def describe(self) -> dict[str, Any]:
        deployments = {
            name: {
                "weight": self.pool.weights.get(name, 0.0),
                "replicas": [
                    {
                        "name": r.name,
                        "url": r.url,
                        "version": r.version,
                        "ready": r.ready,
                        "in_flight": r.in_flight,
                        "restarts": self.restarts.get(r.name, 0),
                        "models": sorted(r.models),
                        "error": r.last_error or None,
                    }
                    for r in replicas
                ],
            }
            for name, replicas in self.pool.deployments().items()
        }
        return {
            "deployments": deployments,
            "aliases": self.pool.aliases,
            "rollout": self.current.to_dict() if self.current else None,
        }
