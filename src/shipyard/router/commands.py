"""Rollout commands checked against the current state: a plan to carry out, or a refusal that changed nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shipyard.router.checks import QualityGate
from shipyard.router.launcher import Launcher
from shipyard.router.replica import ReplicaPool
from shipyard.router.rollout import Rollout, RolloutPlan, Strategy, other_color, parse_gate


class RolloutRejected(Exception):
    """A rollout command that cannot be carried out; nothing was changed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RolloutCommand:
    target: str
    version: str | None = None
    canary_percent: float | None = None
    gate: str | None = None
    lora: bool = False
    who: str = ""


def active_deployment(pool: ReplicaPool) -> str | None:
    """The deployment with the largest traffic weight (None when nothing is deployed)."""
    weights = pool.weights
    live = [name for name, weight in weights.items() if weight > 0 and name in pool.deployments()]
    return max(live, key=lambda n: weights[n]) if live else None


def plan_rollout(
    command: RolloutCommand,
    *,
    current: Rollout | None,
    pool: ReplicaPool,
    adapters: set[str],
    launcher: Launcher,
    gate: QualityGate,
) -> RolloutPlan:
    """The plan for ``command``, or :class:`RolloutRejected` (409: not now; 400: never as asked)."""
    if current is not None and current.active:
        raise RolloutRejected(
            409,
            f"rollout {current.id} is still {current.phase.value}; promote, roll back or wait for it first",
        )
    if len(pool.deployments()) > 1:
        raise RolloutRejected(
            409,
            f"deployments {sorted(pool.deployments())} are both present: the previous version is still "
            "draining or being stopped; retry when `shipyard rollout status` shows one",
        )
    if command.canary_percent is not None and command.lora:
        raise RolloutRejected(
            400,
            "a LoRA rollout switches the served model in place; --canary needs a full deployment "
            "(deploy the merged model instead)",
        )
    if command.canary_percent is not None and not 0 < command.canary_percent < 100:
        raise RolloutRejected(400, "canary percent must be between 0 and 100 (exclusive)")
    try:
        parsed_gate = parse_gate(command.gate) if command.gate else None
    except ValueError as exc:
        raise RolloutRejected(400, str(exc)) from None
    if parsed_gate is not None and (missing := gate.unavailable()):
        raise RolloutRejected(400, missing)
    old = active_deployment(pool)
    if command.lora:
        if not (Path(command.target) / "adapter_config.json").is_file():
            raise RolloutRejected(400, f"{command.target} is not a LoRA adapter folder (no adapter_config.json)")
        if old is None:
            raise RolloutRejected(409, "a LoRA rollout needs a running base deployment")
    else:
        try:
            launcher.check(command.target)
        except ValueError as exc:
            raise RolloutRejected(400, str(exc)) from None
    name = command.version or Path(command.target.rstrip("/")).name or "next"
    known = {r.version for r in pool.replicas} | {a.rpartition("@")[2] for a in adapters}
    if name in known:
        raise RolloutRejected(409, f"version {name!r} is already served; give the new one another --version")
    if command.lora:
        return RolloutPlan(
            command.target, name, old or "default", old, None, parsed_gate, True, command.who, Strategy.LORA,
            "a LoRA adapter: hot-loaded into the running engines",
        )  # fmt: skip
    return RolloutPlan(
        command.target, name, other_color(old), old, command.canary_percent, parsed_gate, False, command.who,
        Strategy.BLUE_GREEN, "a new engine beside the running one",
    )  # fmt: skip
