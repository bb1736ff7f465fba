"""Routing: replicas, the pool the gateway picks from, the policy that picks, the health monitor."""

from shipyard.router.health import HealthMonitor, probe
from shipyard.router.policy import pick_deployment, pick_least_in_flight, session_draw
from shipyard.router.replica import NoReplicaError, Replica, ReplicaPool, UnknownModelError

__all__ = [
    "HealthMonitor",
    "NoReplicaError",
    "Replica",
    "ReplicaPool",
    "UnknownModelError",
    "pick_deployment",
    "pick_least_in_flight",
    "probe",
    "session_draw",
]
