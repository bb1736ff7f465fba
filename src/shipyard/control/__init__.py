"""The control plane: the persisted deployment state of each model, its stores, the rollout state machine, its
strategies and the executor that runs them, the supervisor of the engines shipyard started, the audit log."""

from shipyard.control.plane import ControlConfig, ControlPlane
from shipyard.control.rollout import Action, Observation, Phase, Rollout, RolloutPlan, Strategy, next_action
from shipyard.control.state import DeploymentState, ReplicaRecord
from shipyard.control.store import FileStateStore, MemoryStateStore, RedisStateStore, StateStore, open_store
from shipyard.control.strategies import RolloutStrategy

__all__ = [
    "Action",
    "ControlConfig",
    "ControlPlane",
    "DeploymentState",
    "FileStateStore",
    "MemoryStateStore",
    "Observation",
    "Phase",
    "RedisStateStore",
    "ReplicaRecord",
    "Rollout",
    "RolloutPlan",
    "RolloutStrategy",
    "StateStore",
    "Strategy",
    "next_action",
    "open_store",
]
