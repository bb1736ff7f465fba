"""Engines: what to run (:class:`EngineSpec`) and the process that runs it (:class:`EngineProcess`)."""

from shipyard.engine.process import EngineProcess, EngineStartError, free_port, last_error
from shipyard.engine.spec import PROFILE_OVERRIDES, EngineSpec, Profile

__all__ = [
    "PROFILE_OVERRIDES",
    "EngineProcess",
    "EngineSpec",
    "EngineStartError",
    "Profile",
    "free_port",
    "last_error",
]
