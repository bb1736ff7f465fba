"""Replicas (one OpenAI-compatible server each) and the pool the gateway routes over."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from shipyard.router.admission import AdmissionPolicy
from shipyard.router.policy import CacheAware, RouteRequest, RoutingPolicy, pick_deployment, session_draw

log = logging.getLogger("shipyard.router")


EJECTION_BASE_S = 2.0
"""How long an ejected replica stays out after it answers its probes again; doubled at each ejection in a row
(Envoy's outlier detection), up to ``EJECTION_MAX_S``. Not applied while no other replica of its models is
ready (Envoy's panic threshold: a held-out replica is better than none)."""
EJECTION_MAX_S = 60.0


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
    roots: dict[str, str] = field(default_factory=dict)
    """Served model id -> the folder its engine loaded the tokenizer from (``root``; a LoRA adapter's base's)."""
    last_error: str = ""
    slow_probes: int = 0
    """Health probes in a row that timed out (a busy server answers late; a dead one refuses at once)."""
    unresponsive_since: float | None = None
    """Monotonic time of the first probe in the current run of timed-out probes (None while it answers)."""
    quarantined: str = ""
    """Why its weights are unknown: never chosen, not counted as ready, until the state clears it."""
    rotation: str = ""
    """``starting`` (being added: warming up) or ``draining`` (being removed: its requests finish): listed, never
    chosen for a new request; ``""`` in rotation (see ``control.scaler``)."""
    last_byte_at: float = 0.0
    """Monotonic time it last sent a byte of any answer (a busy engine makes progress; a hung one does not)."""
    elsewhere_in_flight: int = 0
    """Requests in flight on it that the other gateways (and gateway processes) last reported (the routing
    guard's view of its whole load; refreshed by the control plane every ``watch_interval_s``)."""
    ejections: int = 0
    """Times it was ejected without a quiet ``EJECTION_MAX_S`` since (each doubles the next hold-down)."""
    held_out_until: float = 0.0
    """Monotonic time before which a passing health probe does not put it back (Envoy's ejection time)."""
    _outage: asyncio.Future[None] | None = field(default=None, repr=False, compare=False)

    def outage(self) -> asyncio.Future[None]:
        """Done once this replica is ejected (hung or gone): requests waiting on it stop waiting."""
        if self._outage is None or self._outage.get_loop() is not asyncio.get_running_loop():
            self._outage = asyncio.get_running_loop().create_future()
        return self._outage

    hold: asyncio.Event | None = field(default=None, repr=False, compare=False)
    """Set while new requests must wait before reaching this replica (its weights are being replaced); the
    event fires when they may go."""

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if not self.name:
            self.name = self.url

    @property
    def routable(self) -> bool:
        """Ready, its weights known, and in rotation: a new request may go to it."""
        return self.ready and not self.quarantined and not self.rotation


class InFlight:
    """One request counted on one replica: released once, however many paths end it (a failed first try, a
    retry elsewhere, the stream's close), so counts never go below zero and a drain is never fooled."""

    __slots__ = ("pool", "replica", "upstream_model", "released", "sent_at", "load")

    def __init__(self, pool: ReplicaPool, replica: Replica, upstream_model: str) -> None:
        self.pool = pool
        self.replica = replica
        self.upstream_model = upstream_model
        self.released = False
        self.sent_at = time.monotonic()
        self.load = replica.in_flight + replica.elsewhere_in_flight
        """The replica's requests in flight as this one was sent (itself included)."""

    def answered(self) -> None:
        """The answer's headers arrived: its latency is a sample for the replica's learned limit."""
        if self.pool.admission is not None:
            self.pool.admission.sample(self.replica.name, time.monotonic() - self.sent_at, self.load)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool._release(self.replica, self.upstream_model)


class NoReplicaError(LookupError):
    """No ready replica serves the requested model."""


class UnknownModelError(LookupError):
    """No replica has ever announced the requested model."""


class NoRoomError(LookupError):
    """Replicas of the model are ready, but each has as many requests as its admission limit allows."""


class ReplicaPool:
    """The replicas behind one gateway, the traffic weight of each deployment, and model aliases.

    Weights: deployment name -> share of new requests (any scale; normalised over ready deployments). A
    deployment missing from ``weights`` gets weight 1 while no weights are set at all.
    Aliases: the model name clients use -> the name sent upstream (how a LoRA version is switched in place).
    """

    def __init__(
        self,
        replicas: Sequence[Replica],
        draw: Callable[[], float] = random.random,
        routing: RoutingPolicy | None = None,
    ) -> None:
        self.routing = routing or CacheAware()
        """How a replica is picked inside the chosen deployment (``router.policy``; cache-aware by default)."""
        self._replicas = list(replicas)
        self._weights: dict[str, float] = {}
        self._aliases: dict[str, str] = {}
        self._draw = draw
        self._model_in_flight: dict[str, int] = {}
        self.waiting_for_replicas = 0
        """Requests waiting at the gateway for a replica of a model scaled to zero (its first one is starting)."""
        self.cold_start_wait_s = 0.0
        """How long a request for this model waits while it has no replica (a model that may scale to zero)."""
        self.admission: AdmissionPolicy | None = None
        """The bound on each replica's requests and the queue in front of them (None: no bound, no queue)."""

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas)

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._weights) or {r.deployment: 1.0 for r in self._replicas}

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def deployments(self) -> dict[str, list[Replica]]:
        found: dict[str, list[Replica]] = {}
        for replica in self._replicas:
            found.setdefault(replica.deployment, []).append(replica)
        return found

    def add(self, replica: Replica) -> None:
        if any(r.name == replica.name for r in self._replicas):
            raise ValueError(f"a replica named {replica.name!r} is already in the pool")
        self._replicas = [*self._replicas, replica]

    def remove(self, replica: Replica) -> None:
        self._replicas = [r for r in self._replicas if r is not replica]

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Replace all weights at once (one assignment: no request ever sees a half-applied split)."""
        if any(w < 0 for w in weights.values()):
            raise ValueError("weights must not be negative")
        self._weights = dict(weights)

    def set_alias(self, model: str, upstream_model: str | None) -> None:
        aliases = dict(self._aliases)
        if upstream_model is None or upstream_model == model:
            aliases.pop(model, None)
        else:
            aliases[model] = upstream_model
        self._aliases = aliases

    def upstream_model(self, model: str) -> str:
        return self._aliases.get(model, model)

    def ready(self) -> list[Replica]:
        return [r for r in self._replicas if r.routable]

    def models(self) -> dict[str, int | None]:
        """Every model a ready replica serves (and every alias to one), with the smallest context length."""
        found: dict[str, int | None] = {}
        for replica in self.ready():
            for model, max_len in replica.models.items():
                known = found.get(model)
                found[model] = max_len if known is None else min(known, max_len or known)
        for alias, target in self._aliases.items():
            if target in found:
                found[alias] = found[target]
        return found

    def choose(self, model: str, exclude: frozenset[str] = frozenset(), request: RouteRequest | None = None) -> Replica:
        """Pick the replica for one request: deployment by weight (sticky per session), then by the routing
        policy (the replica holding the request's prefix, or the least busy)."""
        return self.route(model, exclude, request)[0]

    def route(
        self, model: str, exclude: frozenset[str] = frozenset(), request: RouteRequest | None = None
    ) -> tuple[Replica, str]:
        """:meth:`choose`, and the reason the routing policy gives (``prefix``, ``overloaded``, ``least_busy``...)."""
        upstream = self.upstream_model(model)
        serving = [r for r in self._replicas if upstream in r.models]
        if not serving:
            raise UnknownModelError(model)
        candidates = [r for r in serving if r.routable and r.name not in exclude]
        if self.admission is not None and candidates:
            candidates = [r for r in candidates if self.has_room(r)]
            if not candidates:
                raise NoRoomError(model)
        free = [r for r in candidates if r.hold is None]
        candidates = free or candidates  # a held replica only when every other one is held too (it waits)
        by_deployment: dict[str, list[Replica]] = {}
        for replica in candidates:
            by_deployment.setdefault(replica.deployment, []).append(replica)
        request = request or RouteRequest()
        session = request.session
        draw = session_draw(session) if session else self._draw()
        deployment = pick_deployment(self.weights, list(by_deployment), draw)
        if deployment is None:
            raise NoReplicaError(model)
        chosen, reason = self.routing.pick(by_deployment[deployment], request)
        if chosen is None:
            raise NoReplicaError(model)
        return chosen, reason

    def acquire(self, replica: Replica, upstream_model: str) -> InFlight:
        """Count a request sent to ``replica`` for ``upstream_model`` until the returned ticket is released."""
        replica.in_flight += 1
        self._model_in_flight[upstream_model] = self._model_in_flight.get(upstream_model, 0) + 1
        return InFlight(self, replica, upstream_model)

    def _release(self, replica: Replica, upstream_model: str) -> None:
        replica.in_flight -= 1
        self._model_in_flight[upstream_model] = self._model_in_flight.get(upstream_model, 1) - 1
        if self.admission is not None:
            self.admission.queue.wake()  # a slot freed: the best waiting request routes again

    def has_room(self, replica: Replica) -> bool:
        """Whether ``replica`` may take one more request under its admission limit (this process's requests
        and what the other gateways last reported on it)."""
        if self.admission is None:
            return True
        return self.admission.has_room(replica.name, replica.in_flight + replica.elsewhere_in_flight)

    def model_load(self) -> dict[str, int]:
        """Requests in flight per upstream model."""
        return dict(self._model_in_flight)

    def in_flight_for(self, upstream_model: str) -> int:
        return self._model_in_flight.get(upstream_model, 0)

    @staticmethod
    def hold(replica: Replica) -> None:
        if replica.hold is None:
            replica.hold = asyncio.Event()

    @staticmethod
    def release_hold(replica: Replica) -> None:
        if replica.hold is not None:
            replica.hold.set()
            replica.hold = None

    def mark_unready(self, replica: Replica, reason: str) -> None:
        if replica.ready:
            log.warning("replica %s is not ready: %s", replica.name, reason)
        replica.ready = False
        replica.last_error = reason

    def eject(self, replica: Replica, reason: str) -> None:
        """Out of rotation, and every request waiting on it stops waiting (Envoy's outlier ejection): those
        that got no byte yet go to another replica, streams already under way end with an error event."""
        self.mark_unready(replica, reason)
        now = time.monotonic()
        if now - replica.held_out_until > EJECTION_MAX_S:  # quiet for a while: start again from the base
            replica.ejections = 0
        replica.ejections += 1
        replica.held_out_until = now + min(EJECTION_BASE_S * 2 ** (replica.ejections - 1), EJECTION_MAX_S)
        if replica._outage is not None and not replica._outage.done():
            replica._outage.set_result(None)
        replica._outage = None

    def knows_any_model(self) -> bool:
        return any(r.models for r in self._replicas)
