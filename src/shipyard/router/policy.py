"""Routing decisions: plain functions over replica snapshots, no I/O.

A request first picks a deployment by traffic weight (``pick_deployment``), then a replica inside it by the
model's :class:`RoutingPolicy` (cache-aware by default: the replica that holds the conversation's prefix). With
a session key, the weight draw is a hash of the key instead of a random number, so one user keeps seeing one
version while the weights stay the same.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, TypeVar


class Routable(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def ready(self) -> bool: ...

    @property
    def in_flight(self) -> int: ...


R = TypeVar("R", bound=Routable)


def pick_least_in_flight(replicas: Sequence[R]) -> R | None:
    """The ready replica with the fewest requests in flight (:func:`load_of`); ties go to the earliest."""
    best: R | None = None
    for replica in replicas:
        if replica.ready and (best is None or load_of(replica) < load_of(best)):
            best = replica
    return best


def load_of(replica: Routable) -> int:
    """Requests in flight on a replica: this process's, plus what the other gateways and gateway processes last
    reported on it (``elsewhere_in_flight``, where the replica carries it): a guard that sees only its own
    process's share lets every process pile onto one replica."""
    return replica.in_flight + int(getattr(replica, "elsewhere_in_flight", 0))


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


class Routing(str, Enum):
    """How a request picks a replica inside the deployment its weight draw chose (``routing`` setting)."""

    CACHE_AWARE = "cache-aware"
    LEAST_BUSY = "least-busy"
    SESSION = "session"
    ROUND_ROBIN = "round-robin"


@dataclass(frozen=True)
class RouteRequest:
    """What a routing policy may look at (made by :func:`route_request`): the request's prefix key, its session,
    and whether it opens a conversation (no replica holds anything of it yet)."""

    prefix: str | None = None
    session: str | None = None
    opening: bool = False


class RoutingPolicy(ABC):
    """Picks one of a deployment's ready replicas; returns it and the reason (a metric label)."""

    kind: Routing

    @abstractmethod
    def pick(self, replicas: Sequence[R], request: RouteRequest) -> tuple[R | None, str]: ...


class LeastBusy(RoutingPolicy):
    kind = Routing.LEAST_BUSY

    def pick(self, replicas: Sequence[R], request: RouteRequest) -> tuple[R | None, str]:
        return pick_least_in_flight(replicas), "least_busy"


class RoundRobin(RoutingPolicy):
    """Each ready replica in turn (per gateway process): the baseline the other policies are measured against."""

    kind = Routing.ROUND_ROBIN

    def __init__(self) -> None:
        self._next = 0

    def pick(self, replicas: Sequence[R], request: RouteRequest) -> tuple[R | None, str]:
        ready = [r for r in replicas if r.ready]
        if not ready:
            return None, "none"
        self._next += 1
        return ready[self._next % len(ready)], "round_robin"


class CacheAware(RoutingPolicy):
    """The replica most likely to hold the request's prefix in its KV cache, unless it is overloaded.

    The replica is chosen by rendezvous hashing of the request's prefix key (:func:`route_request`) over the replica
    names: every gateway process and every gateway sharing a state sees the same names, so they all send a
    conversation's turns to the same replica without asking anyone (a shared index would cost a round trip per
    request; a per-process index would not agree across processes). When that replica is overloaded — more than
    ``balance_abs`` requests over the least busy one *and* more than ``balance_rel`` times as many (SGLang's
    cache-aware router's guard and defaults) — the least busy replica takes the request instead. Replicas that
    leave or join move only the conversations hashed to them (rendezvous hashing's property).

    A conversation's first turn (``opening``) is cached nowhere yet, so it is placed for balance first: it goes to
    the replica its later turns will hash to only while that one is at most ``opening_slack`` (a share of the
    least busy replica's load) busier than the least busy (reason ``opening``), else to the least busy. Without
    this the second turn found its history on the hashed replica only half the time with two replicas (the first
    turn had gone to whichever was least busy). The slack is relative because balance costs most where few
    requests run: on 1-core engines at 2 in flight, an absolute slack of one request put both on one engine and
    cost 20% of the throughput on unique prompts (measured 2026-12-06), and hashing first turns under the wide
    overload guard cost 29%. With nothing in flight on the least busy replica only a tie goes home, so a load
    with nothing to share is balanced as least-busy balances it. A negative ``opening_slack`` sends every first
    turn to the least busy replica.
    """

    kind = Routing.CACHE_AWARE

    def __init__(self, balance_abs: int = 64, balance_rel: float = 1.5, opening_slack: float = 0.25) -> None:
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.opening_slack = opening_slack

    def pick(self, replicas: Sequence[R], request: RouteRequest) -> tuple[R | None, str]:
        ready = [r for r in replicas if r.ready]
        key = request.prefix or request.session
        if not ready or key is None:
            return pick_least_in_flight(ready), "least_busy" if ready else "none"
        preferred = max(ready, key=lambda r: rendezvous_score(key, r.name))
        idlest = min(load_of(r) for r in ready)
        busy = load_of(preferred)
        if request.opening:
            if self.opening_slack < 0 or busy - idlest > self.opening_slack * idlest:
                return pick_least_in_flight(ready), "least_busy"
            return preferred, "opening"
        if busy - idlest > self.balance_abs and busy > self.balance_rel * idlest:
            return pick_least_in_flight(ready), "overloaded"
        return preferred, "prefix"


class Sticky(RoutingPolicy):
    """By session (``x-session-id`` or the body's ``user``) through rendezvous hashing, whatever the load;
    least busy for requests without one."""

    kind = Routing.SESSION

    def pick(self, replicas: Sequence[R], request: RouteRequest) -> tuple[R | None, str]:
        ready = [r for r in replicas if r.ready]
        if not ready or request.session is None:
            return pick_least_in_flight(ready), "least_busy" if ready else "none"
        return max(ready, key=lambda r: rendezvous_score(request.session or "", r.name)), "session"


def routing_policy(
    kind: Routing | str, balance_abs: int = 64, balance_rel: float = 1.5, opening_slack: float = 0.25
) -> RoutingPolicy:
    kind = Routing(kind)
    if kind is Routing.CACHE_AWARE:
        return CacheAware(balance_abs, balance_rel, opening_slack)
    if kind is Routing.SESSION:
        return Sticky()
    if kind is Routing.ROUND_ROBIN:
        return RoundRobin()
    return LeastBusy()


def rendezvous_score(key: str, name: str) -> int:
    """Highest-random-weight hashing: the replica with the highest score for ``key`` gets it."""
    return int.from_bytes(hashlib.blake2b(f"{key}\x00{name}".encode(), digest_size=8).digest(), "big")


PREFIX_CHARS = 4096
"""How much of a prompt (or of a chat's first turn) keys its route: the part every later turn repeats."""


def _messages(body: Mapping[str, Any]) -> list[Any] | None:
    messages = body.get("messages")
    if messages is None and isinstance(body.get("input"), list):
        messages = body["input"]
    return messages if isinstance(messages, list) and messages else None


def route_request(body: Mapping[str, Any], session: str | None = None) -> RouteRequest:
    """What the routing policy needs of a request body, its messages read once.

    ``prefix``: what the request shares with the next turn of its conversation, as the engine will see it first.
    Chat (``messages``, or the Responses API's ``input`` list): the messages up to and including the first user
    message — system prompt and opening question, which every turn repeats before its history; the first turn
    has the key of its later turns. Completions (``prompt``): its first :data:`PREFIX_CHARS` characters. None when
    there is nothing to share (embeddings). ``opening``: a chat request with no assistant turn yet, the first turn
    of its conversation, cached on no replica.
    """
    messages = _messages(body)
    opening = messages is not None and not any(
        isinstance(m, Mapping) and m.get("role") == "assistant" for m in messages
    )
    return RouteRequest(_prefix_key(body, messages), session, opening)


def _prefix_key(body: Mapping[str, Any], messages: list[Any] | None) -> str | None:
    if messages is not None:
        head = []
        for message in messages:
            head.append(message)
            if isinstance(message, Mapping) and message.get("role") == "user":
                break
        # the whole head, however long: a system prompt longer than any cut would give every conversation
        # behind it one key (and one replica)
        text = json.dumps([body.get("model"), head], sort_keys=True, default=str)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return hashlib.blake2b(f"{body.get('model')}\x00{prompt[:PREFIX_CHARS]}".encode(), digest_size=16).hexdigest()
    return None
