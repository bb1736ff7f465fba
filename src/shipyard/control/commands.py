"""Rollout commands checked against the current state: a plan to carry out, or a refusal that changed nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shipyard.control.checks import QualityGate
from shipyard.control.launcher import Launcher, is_url
from shipyard.control.rollout import Rollout, RolloutPlan, Strategy, other_color, parse_gate
from shipyard.control.state import ReplicaRecord
from shipyard.engine.checkpoint import first_difference
from shipyard.router.replica import ReplicaPool


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
    strategy: str = "auto"
    """``auto`` (in place when the new weights fit the running engines, else blue-green), ``inplace`` or
    ``blue-green``."""


STRATEGY_CHOICES = ("auto", Strategy.IN_PLACE.value, Strategy.BLUE_GREEN.value)


def in_place_blocker(records: list[ReplicaRecord], target: str) -> str | None:
    """Why ``target`` cannot be reloaded into these replicas' engines, or None when it can."""
    if is_url(target):
        return "the target is a running server (a URL), not weights to load"
    if not records:
        return "nothing is deployed to update"
    for record in records:
        if record.engine is None:
            return f"replica {record.name} is a server shipyard did not start (its weights cannot be reloaded)"
        running = str(record.engine.get("model") or record.target)
        difference = first_difference(Path(running), Path(target))
        if difference is not None:
            return difference
    return None


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
    records: list[ReplicaRecord] | None = None,
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
    if command.strategy not in STRATEGY_CHOICES:
        raise RolloutRejected(400, f"strategy {command.strategy!r} is not one of {', '.join(STRATEGY_CHOICES)}")
    if command.strategy == Strategy.IN_PLACE.value and (command.canary_percent is not None or command.lora):
        raise RolloutRejected(
            400, "an in-place update has no canary and takes full weights; use --strategy blue-green or --lora"
        )
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
    if not command.lora and command.canary_percent is None and command.strategy != Strategy.BLUE_GREEN.value:
        serving = [r for r in (records or []) if r.deployment == old]
        blocker = in_place_blocker(serving, command.target)
        if blocker is None:
            return RolloutPlan(
                command.target, name, old or "blue", old, None, parsed_gate, False, command.who, Strategy.IN_PLACE,
                "the new weights fit the running engines: reloaded in place",
            )  # fmt: skip
        if command.strategy == Strategy.IN_PLACE.value:
            raise RolloutRejected(400, f"cannot update in place: {blocker}")
        reason = f"a new engine beside the running one (not in place: {blocker})"
    else:
        reason = "a new engine beside the running one" + (" (a canary)" if command.canary_percent else "")
    engines = [r for r in (records or []) if r.deployment == old and r.engine is not None]
    if not command.lora and len(engines) > 1:
        reason += f"; it takes the place of the {len(engines)} engines of {old} (an in-place update keeps them all)"
    if command.lora:
        return RolloutPlan(
            command.target, name, old or "default", old, None, parsed_gate, True, command.who, Strategy.LORA,
            "a LoRA adapter: hot-loaded into the running engines",
        )  # fmt: skip
    return RolloutPlan(
        command.target, name, other_color(old), old, command.canary_percent, parsed_gate, False, command.who,
        Strategy.BLUE_GREEN, reason,
    )  # fmt: skip
