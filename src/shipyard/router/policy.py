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


def deployment_shares(weights: Mapping[str, float], available: Sequence[str]) -> dict[str, float]:
    """The share of new requests each of the ``available`` deployments gets (summing to 1; in name order).

    Weights of unavailable deployments are left out and the rest renormalised, so a canary that is down sends
    its share to the others. If no available deployment has weight, the first available one takes everything
    (availability wins over the split: this only happens while every weighted deployment is down).
    """
    live = [(name, weights.get(name, 0.0)) for name in sorted(available)]
    total = sum(w for _, w in live if w > 0)
    if total <= 0:
        return {live[0][0]: 1.0} if live else {}
    return {name: w / total for name, w in live if w > 0}


def pick_deployment(weights: Mapping[str, float], available: Sequence[str], draw: float) -> str | None:
    """The deployment whose bucket of :func:`deployment_shares` holds ``draw`` (in [0, 1))."""
    shares = deployment_shares(weights, available)
    point = min(max(draw, 0.0), 0.999999999)
    for name, share in shares.items():
        if point < share:
            return name
        point -= share
    return next(reversed(shares), None)
