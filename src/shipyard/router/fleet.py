"""The fleet: one :class:`ReplicaPool` per served model, routed by the model a request names.

Each model's pool holds that model's replicas, the traffic weights of its deployments and its aliases, changed
only by that model's control plane; so two models may both have a ``blue`` and a ``green`` deployment, and a
canary split of one never moves the other's traffic. The gateway (proxy, health monitor, metrics) sees the
fleet through the same calls it made on one pool.

>>> fleet = Fleet({"assistant": ReplicaPool([Replica("http://127.0.0.1:8001")]), "embed": ReplicaPool([])})
>>> fleet.pool_of("assistant").replicas[0].url
'http://127.0.0.1:8001'
"""

from __future__ import annotations

from collections.abc import Mapping

from shipyard.router.policy import RouteRequest
from shipyard.router.replica import InFlight, Replica, ReplicaPool, UnknownModelError


class Fleet:
    def __init__(self, pools: Mapping[str, ReplicaPool]) -> None:
        if not pools:
            raise ValueError("a fleet has at least one model")
        self.pools = dict(pools)

    @property
    def names(self) -> list[str]:
        """The fleet's model names, in the order they were configured."""
        return list(self.pools)

    @property
    def default(self) -> ReplicaPool:
        """The first model's pool (where ``--upstream`` servers and DNS-discovered replicas go)."""
        return next(iter(self.pools.values()))

    def pool_of(self, model: str) -> ReplicaPool:
        """The pool of the fleet's model called ``model``; KeyError when there is none."""
        return self.pools[model]

    def owner(self, replica: Replica) -> ReplicaPool:
        """The pool that holds ``replica``."""
        for pool in self.pools.values():
            if any(r is replica for r in pool.replicas):
                return pool
        return self.default

    def serving(self, model: str) -> ReplicaPool:
        """The pool whose replicas serve ``model`` (a name clients send, an alias, or a LoRA adapter);
        UnknownModelError when none announced it."""
        for pool in self.pools.values():
            upstream = pool.upstream_model(model)
            if any(upstream in r.models for r in pool.replicas):
                return pool
        raise UnknownModelError(model)

    # ----- what the gateway calls on a pool, over every model ----------------------------------------------

    @property
    def replicas(self) -> list[Replica]:
        return [r for pool in self.pools.values() for r in pool.replicas]

    @property
    def aliases(self) -> dict[str, str]:
        return {alias: target for pool in self.pools.values() for alias, target in pool.aliases.items()}

    def ready(self) -> list[Replica]:
        return [r for pool in self.pools.values() for r in pool.ready()]

    def models(self) -> dict[str, int | None]:
        found: dict[str, int | None] = {}
        for pool in self.pools.values():
            found.update(pool.models())
        return found

    def knows_any_model(self) -> bool:
        return any(pool.knows_any_model() for pool in self.pools.values())

    def upstream_model(self, model: str) -> str:
        for pool in self.pools.values():
            if model in pool.aliases:
                return pool.upstream_model(model)
        return model

    def choose(self, model: str, exclude: frozenset[str] = frozenset(), request: RouteRequest | None = None) -> Replica:
        return self.route(model, exclude, request)[0]

    def route(
        self, model: str, exclude: frozenset[str] = frozenset(), request: RouteRequest | None = None
    ) -> tuple[Replica, str]:
        return self.serving(model).route(model, exclude, request)

    def acquire(self, replica: Replica, upstream_model: str) -> InFlight:
        return self.owner(replica).acquire(replica, upstream_model)

    def mark_unready(self, replica: Replica, reason: str) -> None:
        self.owner(replica).mark_unready(replica, reason)

    def eject(self, replica: Replica, reason: str) -> None:
        self.owner(replica).eject(replica, reason)

    def model_load(self) -> dict[str, int]:
        load: dict[str, int] = {}
        for pool in self.pools.values():
            for model, count in pool.model_load().items():
                load[model] = load.get(model, 0) + count
        return load

    def in_flight_for(self, upstream_model: str) -> int:
        return sum(pool.in_flight_for(upstream_model) for pool in self.pools.values())
