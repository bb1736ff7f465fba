"""Routing and the control plane: replicas, the pool the gateway picks from, the policy that picks, the health
monitor; the persisted deployment state, its stores, rollout strategies and the executor that runs them."""

from shipyard.router.control import ControlConfig, ControlPlane
from shipyard.router.health import HealthMonitor, probe
from shipyard.router.policy import pick_deployment, pick_least_in_flight, session_draw
from shipyard.router.replica import NoReplicaError, Replica, ReplicaPool, UnknownModelError
from shipyard.router.rollout import Action, Observation, Phase, Rollout, RolloutPlan, Strategy, next_action
from shipyard.router.state import DeploymentState, ReplicaRecord
from shipyard.router.store import FileStateStore, MemoryStateStore, RedisStateStore, StateStore, open_store
from shipyard.router.strategies import RolloutStrategy

__all__ = [
    "Action",
    "ControlConfig",
    "ControlPlane",
    "DeploymentState",
    "FileStateStore",
    "HealthMonitor",
    "MemoryStateStore",
    "NoReplicaError",
    "Observation",
    "Phase",
    "RedisStateStore",
    "Replica",
    "ReplicaPool",
    "ReplicaRecord",
    "Rollout",
    "RolloutPlan",
    "RolloutStrategy",
    "StateStore",
    "Strategy",
    "UnknownModelError",
    "next_action",
    "open_store",
    "pick_deployment",
    "pick_least_in_flight",
    "probe",
    "session_draw",
]
