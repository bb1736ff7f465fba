"""Routing: replicas, the pool the gateway picks from (one per model of the fleet), the policy that picks, the
health monitor and discovery. The control plane that changes what is routed lives in ``shipyard.control``."""

from shipyard.router.fleet import Fleet
from shipyard.router.health import HealthMonitor, probe
from shipyard.router.policy import (
    RouteRequest,
    Routing,
    RoutingPolicy,
    pick_deployment,
    pick_least_in_flight,
    route_request,
    routing_policy,
    session_draw,
)
from shipyard.router.replica import NoReplicaError, Replica, ReplicaPool, UnknownModelError

__all__ = [
    "Fleet",
    "HealthMonitor",
    "NoReplicaError",
    "Replica",
    "ReplicaPool",
    "RouteRequest",
    "Routing",
    "RoutingPolicy",
    "UnknownModelError",
    "pick_deployment",
    "pick_least_in_flight",
    "probe",
    "route_request",
    "routing_policy",
    "session_draw",
]
