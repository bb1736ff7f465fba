"""The rollout state machine, its traffic decisions and ``next_action``: pure, no processes, no I/O.

pending → starting → warming → [gating] → [canary ⇄ promote] → switching → draining → done
             ╰──────────╰─────────╰───────────╰→ failed (old version keeps serving)
canary / draining → rolled_back (traffic back to the old version in one step)

Times are wall-clock seconds from an injected clock, so a rollout saved by one gateway process reads the same
in the next one.
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from collections.abc import Callable, Mapping
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
    Phase.SWITCHING: frozenset({Phase.DRAINING, Phase.FAILED}),
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


class Strategy(str, Enum):
    """How a new version reaches users (``RolloutStrategy`` implementations, in ``control.strategies``)."""

    BLUE_GREEN = "blue-green"
    """A new engine beside the old one; traffic moves once it is warm; the old one drains and stops."""
    LORA = "lora"
    """A LoRA adapter hot-loaded into the running engines; the served alias moves to it."""
    IN_PLACE = "inplace"
    """New weights reloaded into the running engines (same architecture and tensor shapes), one at a time."""


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
    strategy: Strategy = Strategy.BLUE_GREEN
    reason: str = ""
    """Why this strategy (shown in the status)."""


Clock = Callable[[], float]


@dataclass
class Rollout:
    plan: RolloutPlan
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    phase: Phase = Phase.PENDING
    error: str | None = None
    history: list[tuple[Phase, float, str]] = field(default_factory=list)
    """(phase, wall-clock time entered, note)."""
    facts: dict[str, Any] = field(default_factory=dict)
    """Measurements taken along the way (switch time, gate accuracy, drained requests, ...)."""
    clock: Clock = field(default=time.time, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.history:
            self.history.append((self.phase, self.clock(), "requested"))

    @property
    def started_wall(self) -> float:
        return self.history[0][1]

    @property
    def active(self) -> bool:
        return self.phase not in TERMINAL

    def advance(self, phase: Phase, note: str = "") -> None:
        if phase not in ALLOWED[self.phase]:
            raise IllegalTransition(f"rollout {self.id} cannot go from {self.phase.value} to {phase.value}")
        self.phase = phase
        self.history.append((phase, self.clock(), note))

    def fail(self, reason: str) -> None:
        self.error = reason
        self.advance(Phase.FAILED, reason)

    def durations(self) -> dict[str, float]:
        """Seconds spent in each phase so far (the current one up to now)."""
        spans: dict[str, float] = {}
        for (phase, entered, _), nxt in zip(self.history, [*self.history[1:], None], strict=True):
            end = nxt[1] if nxt else (entered if phase in TERMINAL else self.clock())
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
            "strategy": self.plan.strategy.value,
            "strategy_reason": self.plan.reason,
            "requested_by": self.plan.requested_by,
            "requested_at": origin,
            "error": self.error,
            "durations_s": self.durations(),
            "history": [{"phase": p.value, "at_s": round(t - origin, 3), "note": n} for p, t, n in self.history],
            "facts": self.facts,
        }

    def to_record(self) -> dict[str, Any]:
        """Everything needed to rebuild this rollout in another process (:meth:`from_record`)."""
        plan = dataclasses.asdict(self.plan)
        plan["strategy"] = self.plan.strategy.value
        return {
            "id": self.id,
            "phase": self.phase.value,
            "error": self.error,
            "plan": plan,
            "history": [[p.value, t, n] for p, t, n in self.history],
            "facts": dict(self.facts),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any], clock: Clock = time.time) -> Rollout:
        plan = dict(record["plan"])
        gate = plan.get("gate")
        plan["gate"] = Gate(**gate) if gate else None
        plan["strategy"] = Strategy(plan.get("strategy", Strategy.BLUE_GREEN.value))
        return cls(
            RolloutPlan(**plan),
            id=str(record["id"]),
            phase=Phase(record["phase"]),
            error=record.get("error"),
            history=[(Phase(p), float(t), str(n)) for p, t, n in record["history"]],
            facts=dict(record.get("facts", {})),
            clock=clock,
        )


def traffic_weights(rollout: Rollout, phase: Phase | None = None) -> dict[str, float] | None:
    """The deployment weights ``phase`` (default: the rollout's own) calls for (None: leave them as they are)."""
    plan = rollout.plan
    old, new = plan.old_deployment, plan.new_deployment
    phase = rollout.phase if phase is None else phase
    if plan.lora:
        return None  # a LoRA rollout switches a model alias, not deployment weights
    if phase is Phase.CANARY and plan.canary_percent is not None:
        share = plan.canary_percent / 100
        return {new: share, old: 1 - share} if old else {new: 1.0}
    if phase in (Phase.SWITCHING, Phase.DRAINING, Phase.DONE):
        return {new: 1.0, old: 0.0} if old else {new: 1.0}
    if phase in (Phase.FAILED, Phase.ROLLED_BACK) and old:
        return {old: 1.0, new: 0.0}
    return None


def other_color(current: str | None) -> str:
    """Deployments alternate blue and green; anything else is followed by blue."""
    return "green" if current == "blue" else "blue"


class Action(str, Enum):
    """What the rollout executor does next (``next_action`` decides; the executor performs)."""

    PREPARE = "prepare"
    """Start the new version (an engine, or an adapter load)."""
    WARM_UP = "warm_up"
    GATE = "gate"
    OPEN_CANARY = "open_canary"
    AWAIT_PROMOTE = "await_promote"
    SWITCH = "switch"
    DRAIN = "drain"
    FINISH = "finish"
    ABORT = "abort"
    """Put the old version back (traffic, aliases), retire the new one, end ``failed``."""
    RETIRE_NEW = "retire_new"
    """After a rollback: retire the new version (its requests finish first)."""
    NOTHING = "nothing"


@dataclass(frozen=True)
class Observation:
    """What the executor knows of the current phase's work (reset to nothing when a gateway restarts)."""

    done: bool = False
    """The current phase's step completed."""
    error: str | None = None
    promoted: bool = False
    interrupted: bool = False
    """The rollout was found in the saved state by a gateway that did not run it (restart or lease takeover)."""
    retired: bool = False


def next_action(rollout: Rollout, seen: Observation) -> Action:
    """The next step of ``rollout`` given what was observed of its current phase.

    The rule for a rollout interrupted by a gateway crash (written in docs/guides/update.md): before traffic moved
    (pending, starting, warming, gating) it is rolled back — the new version may be half started, half warm or
    ungated, and the old one still serves everything; in canary it stays in canary (both versions run; an
    admin promotes or rolls back); once switching or draining, it is finished (users are on the new version).
    An in-place update is rolled back until it is done: its switch is the reload itself, and a replica caught
    mid-reload gets its previous weights back.
    """
    phase, plan = rollout.phase, rollout.plan
    if phase is Phase.ROLLED_BACK:
        return Action.NOTHING if seen.retired else Action.RETIRE_NEW
    if phase in TERMINAL:
        return Action.NOTHING
    before_switch = phase in (Phase.PENDING, Phase.STARTING, Phase.WARMING, Phase.GATING)
    if plan.strategy is Strategy.IN_PLACE and phase is Phase.SWITCHING:
        before_switch = True  # the switch is the reload, replica by replica: a failure there puts the old back
    if before_switch and (seen.error is not None or seen.interrupted):
        return Action.ABORT
    after_checks = Action.OPEN_CANARY if plan.canary_percent is not None else Action.SWITCH
    if phase is Phase.PENDING:
        return Action.PREPARE
    if phase is Phase.STARTING:
        return Action.WARM_UP if seen.done else Action.PREPARE
    if phase is Phase.WARMING:
        if not seen.done:
            return Action.WARM_UP
        gated_here = plan.gate is not None and plan.strategy is not Strategy.IN_PLACE  # in place: per replica
        return Action.GATE if gated_here else after_checks
    if phase is Phase.GATING:
        return after_checks if seen.done else Action.GATE
    if phase is Phase.CANARY:
        return Action.SWITCH if seen.promoted else Action.AWAIT_PROMOTE
    if phase is Phase.SWITCHING:
        return Action.DRAIN if seen.done or seen.interrupted else Action.SWITCH
    return Action.FINISH if seen.done else Action.DRAIN  # draining
