"""Routing decisions: plain functions over replica snapshots, no I/O.

A request first picks a deployment by traffic weight (``pick_deployment``), then a replica inside it
(``pick_least_in_flight``). With a session key, the weight draw is a hash of the key instead of a random
number, so one user keeps seeing one version while the weights stay the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar


class Routable(Protocol):
    @property
    def ready(self) -> bool: ...

    @property
    def in_flight(self) -> int: ...


R = TypeVar("R", bound=Routable)


def pick_least_in_flight(replicas: Sequence[R]) -> R | None:
    """The ready replica with the fewest requests in flight; ties go to the earliest in the list."""
    best: R | None = None
    for replica in replicas:
        if replica.ready and (best is None or replica.in_flight < best.in_flight):
            best = replica
    return best


def session_draw(session_key: str) -> float:
    """A stable number in [0, 1) for a session key (same key, same number, on every gateway)."""
    digest = hashlib.blake2b(session_key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def pick_deployment(weights: Mapping[str, float], available: Sequence[str], draw: float) -> str | None:
    """The deployment whose cumulative-weight bucket holds ``draw`` (in [0, 1)), among ``available`` ones.

    Weights of unavailable deployments are left out and the rest renormalised, so a canary that is down sends
    its share to the others. If no available deployment has weight, any available one is used (availability
    wins over the split: this only happens while every weighted deployment is down).
    """
    live = [(name, weights.get(name, 0.0)) for name in sorted(available)]
    total = sum(w for _, w in live if w > 0)
    if total <= 0:
        return live[0][0] if live else None
    point = min(max(draw, 0.0), 0.999999999) * total
    for name, weight in live:
        if weight <= 0:
            continue
        if point < weight:
            return name
        point -= weight
    return next(name for name, weight in reversed(live) if weight > 0)
