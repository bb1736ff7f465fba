"""Replicas (one OpenAI-compatible server each) and the pool the gateway routes over."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from shipyard.router.policy import pick_least_in_flight


@dataclass
class Replica:
    """One upstream server and what the gateway knows about it right now."""

    url: str
    name: str = ""
    deployment: str = "default"
    version: str = ""
    ready: bool = False
    in_flight: int = 0
    models: dict[str, int | None] = field(default_factory=dict)
    """Served model id -> its context length (``max_model_len``), as last read from ``/v1/models``."""
    last_error: str = ""

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if not self.name:
            self.name = self.url


class NoReplicaError(LookupError):
    """No ready replica serves the requested model."""


class UnknownModelError(LookupError):
    """No replica has ever announced the requested model."""


class ReplicaPool:
    """The replicas behind one gateway: who is ready, who serves which model, who is busiest."""

    def __init__(self, replicas: Sequence[Replica]) -> None:
        self._replicas = list(replicas)

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas)

    def ready(self) -> list[Replica]:
        return [r for r in self._replicas if r.ready]

    def models(self) -> dict[str, int | None]:
        """Every model a ready replica serves, with the smallest context length among them."""
        found: dict[str, int | None] = {}
        for replica in self.ready():
            for model, max_len in replica.models.items():
                known = found.get(model)
                found[model] = max_len if known is None else min(known, max_len or known)
        return found

    def choose(self, model: str, exclude: frozenset[str] = frozenset()) -> Replica:
        candidates = [r for r in self._replicas if model in r.models and r.name not in exclude]
        if not candidates and not any(model in r.models for r in self._replicas):
            raise UnknownModelError(model)
        chosen = pick_least_in_flight(candidates)
        if chosen is None:
            raise NoReplicaError(model)
        return chosen

    @contextmanager
    def track(self, replica: Replica) -> Iterator[Replica]:
        replica.in_flight += 1
        try:
            yield replica
        finally:
            replica.in_flight -= 1

    def mark_unready(self, replica: Replica, reason: str) -> None:
        if replica.ready:
            logging.getLogger("shipyard.router").warning("replica %s is not ready: %s", replica.name, reason)
        replica.ready = False
        replica.last_error = reason

    def knows_any_model(self) -> bool:
        return any(r.models for r in self._replicas)
