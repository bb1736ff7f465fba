"""The rollout state machine and its traffic decisions: pure, no processes, no I/O.

pending → starting → warming → [gating] → [canary ⇄ promote] → switching → draining → done
             ╰──────────╰─────────╰───────────╰→ failed (old version keeps serving)
canary / draining → rolled_back (traffic back to the old version in one step)
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Phase(str, Enum):
    PENDING = "pending"
    STARTING = "starting"
    WARMING = "warming"
    GATING = "gating"
    CANARY = "canary"
    SWITCHING = "switching"
    DRAINING = "draining"
    DONE = "done"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.PENDING: frozenset({Phase.STARTING, Phase.FAILED}),
    Phase.STARTING: frozenset({Phase.WARMING, Phase.FAILED}),
    Phase.WARMING: frozenset({Phase.GATING, Phase.CANARY, Phase.SWITCHING, Phase.FAILED}),
    Phase.GATING: frozenset({Phase.CANARY, Phase.SWITCHING, Phase.FAILED}),
    Phase.CANARY: frozenset({Phase.SWITCHING, Phase.ROLLED_BACK}),
    Phase.SWITCHING: frozenset({Phase.DRAINING}),
    Phase.DRAINING: frozenset({Phase.DONE, Phase.ROLLED_BACK}),
    Phase.DONE: frozenset(),
    Phase.FAILED: frozenset(),
    Phase.ROLLED_BACK: frozenset(),
}
TERMINAL = frozenset({Phase.DONE, Phase.FAILED, Phase.ROLLED_BACK})


class IllegalTransition(RuntimeError):
    """A rollout was asked to move to a phase it cannot reach from where it is."""


@dataclass(frozen=True)
class Gate:
    """A quality gate: the new version must reach ``min_accuracy`` on the first ``n`` intent test examples."""

    task: str
    min_accuracy: float
    n: int = 32


_GATE = re.compile(r"^(?P<task>[a-z_]+):(?P<args>.+)$")


def parse_gate(spec: str) -> Gate:
    """``intent:min_acc=0.8`` or ``intent:min_acc=0.8,n=64`` -> Gate; ValueError says what is wrong."""
    match = _GATE.match(spec.strip())
    if not match:
        raise ValueError(f"gate {spec!r} is not TASK:key=value[,key=value] (e.g. intent:min_acc=0.8)")
    if match["task"] != "intent":
        raise ValueError(f"gate task {match['task']!r} is not supported; available: intent")
    values: dict[str, str] = {}
    for part in match["args"].split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"gate argument {part!r} is not key=value")
        values[key.strip()] = value.strip()
    unknown = set(values) - {"min_acc", "n"}
    if unknown:
        raise ValueError(f"gate arguments {sorted(unknown)} are unknown; use min_acc and n")
    try:
        min_acc = float(values["min_acc"])
        n = int(values.get("n", "32"))
    except KeyError:
        raise ValueError("gate needs min_acc=<0..1>") from None
    except ValueError:
        raise ValueError(f"gate values must be numbers: {values}") from None
    if not 0 <= min_acc <= 1 or n < 1:
        raise ValueError("gate needs 0 <= min_acc <= 1 and n >= 1")
    return Gate("intent", min_acc, n)


@dataclass(frozen=True)
class RolloutPlan:
    target: str
    """A model folder to start an engine for, an http(s):// URL of a running server, or a LoRA adapter folder."""
    version: str
    new_deployment: str
    old_deployment: str | None
    canary_percent: float | None = None
    gate: Gate | None = None
    lora: bool = False
    requested_by: str = ""


@dataclass
class Rollout:
    plan: RolloutPlan
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    phase: Phase = Phase.PENDING
    error: str | None = None
    history: list[tuple[Phase, float, str]] = field(default_factory=list)
    """(phase, monotonic time entered, note)."""
    facts: dict[str, Any] = field(default_factory=dict)
    """Measurements taken along the way (switch time, gate accuracy, drained requests, ...)."""
    started_wall: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.history.append((self.phase, time.monotonic(), "requested"))

    @property
    def active(self) -> bool:
        return self.phase not in TERMINAL

    def advance(self, phase: Phase, note: str = "") -> None:
        if phase not in ALLOWED[self.phase]:
            raise IllegalTransition(f"rollout {self.id} cannot go from {self.phase.value} to {phase.value}")
        self.phase = phase
        self.history.append((phase, time.monotonic(), note))

    def fail(self, reason: str) -> None:
        self.error = reason
        self.advance(Phase.FAILED, reason)

    def durations(self) -> dict[str, float]:
        """Seconds spent in each phase so far (the current one up to now)."""
        spans: dict[str, float] = {}
        for (phase, entered, _), nxt in zip(self.history, [*self.history[1:], None], strict=True):
            end = nxt[1] if nxt else (entered if phase in TERMINAL else time.monotonic())
            spans[phase.value] = round(spans.get(phase.value, 0.0) + end - entered, 3)
        return spans

    def to_dict(self) -> dict[str, Any]:
        origin = self.history[0][1]
        return {
            "id": self.id,
            "phase": self.phase.value,
            "target": self.plan.target,
            "version": self.plan.version,
            "new_deployment": self.plan.new_deployment,
            "old_deployment": self.plan.old_deployment,
            "canary_percent": self.plan.canary_percent,
            "gate": None if self.plan.gate is None else vars(self.plan.gate),
            "lora": self.plan.lora,
            "requested_by": self.plan.requested_by,
            "error": self.error,
            "durations_s": self.durations(),
            "history": [{"phase": p.value, "at_s": round(t - origin, 3), "note": n} for p, t, n in self.history],
            "facts": self.facts,
        }


def traffic_weights(rollout: Rollout) -> dict[str, float] | None:
    """The deployment weights a rollout's phase calls for (None: leave the weights as they are)."""
    plan = rollout.plan
    old, new = plan.old_deployment, plan.new_deployment
    if plan.lora:
        return None  # a LoRA rollout switches a model alias, not deployment weights
    if rollout.phase is Phase.CANARY and plan.canary_percent is not None:
        share = plan.canary_percent / 100
        return {new: share, old: 1 - share} if old else {new: 1.0}
    if rollout.phase in (Phase.SWITCHING, Phase.DRAINING, Phase.DONE):
        return {new: 1.0, old: 0.0} if old else {new: 1.0}
    if rollout.phase in (Phase.FAILED, Phase.ROLLED_BACK) and old:
        return {old: 1.0, new: 0.0}
    return None


def other_color(current: str | None) -> str:
    """Deployments alternate blue and green; anything else is followed by blue."""
    return "green" if current == "blue" else "blue"
