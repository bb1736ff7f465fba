"""Routing decisions: plain functions over replica snapshots, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
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
