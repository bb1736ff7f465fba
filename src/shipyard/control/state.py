"""The deployment state: one snapshot of everything that must outlive a gateway process.

Replicas (with the identity of the engine process behind each), deployment weights, model aliases, LoRA
adapters, the active rollout and a bounded history of finished ones. Immutable: a change is a new snapshot
with the next ``revision`` (:meth:`DeploymentState.evolve`), saved to a :class:`~shipyard.control.store.StateStore`
before it takes effect.

>>> state = DeploymentState().evolve(weights={"blue": 1.0}, by="gateway-1")
>>> DeploymentState.from_json(state.to_json()) == state
True
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SCHEMA = 1
HISTORY_LIMIT = 20
"""Finished rollouts kept in the state (the audit log keeps everything)."""


class StateError(ValueError):
    """A saved state that cannot be read back (corrupt, from a newer shipyard, or not a state at all)."""


@dataclass(frozen=True)
class ReplicaRecord:
    """One replica as the state knows it: where it answers and, for an engine shipyard started, which process.

    ``engine`` holds the :class:`~shipyard.engine.EngineSpec` fields it was started with (None for a server
    someone else runs); ``pid``/``started_at``/``host`` identify the process so a restarted gateway adopts the
    very engine it left running, and never a different process that got the same pid.
    """

    name: str
    url: str
    deployment: str = "blue"
    version: str = ""
    target: str = ""
    """The model folder (or URL) this replica serves."""
    engine: Mapping[str, Any] | None = None
    pid: int | None = None
    started_at: float | None = None
    host: str = ""
    cpu_bind: str | None = None
    devices: str | None = None
    """``CUDA_VISIBLE_DEVICES`` of the engine (its GPUs, from the placement plan)."""
    log_file: str | None = None
    held: bool = False
    """New requests for this replica wait at every gateway (an in-place update is changing its weights)."""
    quarantined: str = ""
    """Why this replica's weights are unknown (a reload that failed or never returned): out of rotation at every
    gateway until its engine was restarted from the known-good weights its record names."""
    rotation: str = ""
    """``starting`` or ``draining`` while the scaler adds or removes it: out of rotation at every gateway."""

    @property
    def port(self) -> int:
        """The port of ``url`` (an engine shipyard started listens on loopback at this port)."""
        return int(self.url.rstrip("/").rsplit(":", 1)[1])

    @property
    def managed(self) -> bool:
        """True when shipyard started (and so supervises and stops) the engine behind this replica."""
        return self.engine is not None


@dataclass(frozen=True)
class DeploymentState:
    revision: int = 0
    replicas: tuple[ReplicaRecord, ...] = ()
    weights: Mapping[str, float] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    adapters: Mapping[str, str] = field(default_factory=dict)
    """LoRA adapter name -> folder, loaded into every engine of the deployment (again after a restart)."""
    rollout: Mapping[str, Any] | None = None
    """The current (or last) rollout, as ``Rollout.to_record()``."""
    history: tuple[Mapping[str, Any], ...] = ()
    fingerprints: Mapping[str, Any] = field(default_factory=dict)
    """Checkpoint digest -> the fingerprint an engine gave once it served it (see ``control.fingerprint``)."""
    scale: Mapping[str, Any] = field(default_factory=dict)
    """The scaler's persisted part: ``manual`` (the count ``shipyard scale`` set, absent: automatic) and ``by``;
    ``template``/``deployment`` (what a start from zero serves)."""
    updated_at: float = 0.0
    updated_by: str = ""

    def evolve(self, *, by: str, at: float | None = None, **changes: Any) -> DeploymentState:
        """The next snapshot: ``changes`` applied, revision + 1, stamped with who and when."""
        if "replicas" in changes:
            changes["replicas"] = tuple(changes["replicas"])
        if "history" in changes:
            changes["history"] = tuple(changes["history"])[-HISTORY_LIMIT:]
        return dataclasses.replace(
            self,
            revision=self.revision + 1,
            updated_at=time.time() if at is None else at,
            updated_by=by,
            **changes,
        )

    def replica(self, name: str) -> ReplicaRecord | None:
        return next((r for r in self.replicas if r.name == name), None)

    def with_replica(self, record: ReplicaRecord) -> tuple[ReplicaRecord, ...]:
        """The replicas with ``record`` added, or put in place of the one of the same name."""
        others = [r for r in self.replicas if r.name != record.name]
        return (
            (*others, record)
            if len(others) == len(self.replicas)
            else tuple(record if r.name == record.name else r for r in self.replicas)
        )

    def without_replicas(self, names: set[str]) -> tuple[ReplicaRecord, ...]:
        return tuple(r for r in self.replicas if r.name not in names)

    def deployments(self) -> dict[str, list[ReplicaRecord]]:
        found: dict[str, list[ReplicaRecord]] = {}
        for record in self.replicas:
            found.setdefault(record.deployment, []).append(record)
        return found

    def to_json(self) -> str:
        body = {"schema": SCHEMA, **dataclasses.asdict(self)}
        return json.dumps(body, indent=1, sort_keys=True, default=_plain)

    @classmethod
    def from_json(cls, text: str | bytes) -> DeploymentState:
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise StateError(f"not JSON ({exc})") from None
        if not isinstance(body, dict) or "revision" not in body:
            raise StateError("not a shipyard deployment state")
        if body.get("schema") != SCHEMA:
            raise StateError(f"state schema {body.get('schema')!r}; this shipyard reads schema {SCHEMA}")
        try:
            return cls(
                revision=int(body["revision"]),
                replicas=tuple(ReplicaRecord(**r) for r in body.get("replicas", [])),
                weights={str(k): float(v) for k, v in body.get("weights", {}).items()},
                aliases={str(k): str(v) for k, v in body.get("aliases", {}).items()},
                adapters={str(k): str(v) for k, v in body.get("adapters", {}).items()},
                rollout=body.get("rollout"),
                history=tuple(body.get("history", [])),
                fingerprints={str(k): v for k, v in body.get("fingerprints", {}).items()},
                scale=dict(body.get("scale", {})),
                updated_at=float(body.get("updated_at", 0.0)),
                updated_by=str(body.get("updated_by", "")),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise StateError(f"malformed state ({type(exc).__name__}: {exc})") from None


def rebase(changes: Mapping[str, Any], base: DeploymentState, latest: DeploymentState) -> dict[str, Any]:
    """``changes`` computed from ``base``, re-expressed over ``latest`` (a newer state another writer saved).

    Only what the changes really changed moves: replicas by name, weights/aliases/adapters by key, history by
    rollout id. Whatever the other writer changed in between (a supervisor's new pid, another gateway's
    record) stays, instead of being overwritten by lists read from the older state.
    """
    rebased: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "replicas":
            old = {r.name: r for r in base.replicas}
            new = {r.name: r for r in value}
            kept = [r for r in latest.replicas if r.name not in old or r.name in new]
            merged = {r.name: r for r in kept}
            merged.update({n: r for n, r in new.items() if old.get(n) != r})
            rebased[name] = tuple(merged.values())
        elif name in ("weights", "aliases", "adapters", "fingerprints", "scale"):
            old_map, new_map = dict(getattr(base, name)), dict(value)
            merged_map = {k: v for k, v in getattr(latest, name).items() if k not in old_map or k in new_map}
            merged_map.update({k: v for k, v in new_map.items() if old_map.get(k) != v})
            rebased[name] = merged_map
        elif name == "history":
            seen = {h.get("id") for h in value}
            rebased[name] = (*(h for h in latest.history if h.get("id") not in seen), *value)
        else:
            rebased[name] = value
    return rebased


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
