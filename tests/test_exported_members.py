"""The public API is what __all__ says, sorted, and every name in it exists (httpx-style pin)."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "shipyard.engine": [
        "PROFILE_OVERRIDES",
        "EngineProcess",
        "EngineSpec",
        "EngineStartError",
        "Profile",
        "free_port",
        "last_error",
    ],
    "shipyard.router": [
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
    ],
    "shipyard.control": [
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
    ],
    "shipyard.gateway": [
        "GatewayMetrics",
        "KeyChecker",
        "OpenAIError",
        "ServedModel",
        "create_app",
        "error_body",
        "upstream_client",
    ],
    "shipyard.testing": ["FakeOpenAI", "Fault"],
    "shipyard.bench": [
        "ChatWorkload",
        "DatasetWorkload",
        "LoadResult",
        "RandomWorkload",
        "RequestRecord",
        "Slo",
        "Workload",
        "find_max",
        "percentile",
        "run_closed_loop",
        "run_open_loop",
        "summarize",
    ],
    "shipyard.tasks": [
        "IntentDecode",
        "IntentRequest",
        "IntentResponse",
        "LabelSet",
        "ReplyDraft",
        "ReplyRequest",
        "ReplyResponse",
        "ReplyTemplate",
        "load_labels",
        "load_templates",
    ],
    "shipyard.evaluate": [
        "PASS_THRESHOLD",
        "DatasetError",
        "EvalRun",
        "classification_report",
        "cosine",
        "evaluate_intent",
        "evaluate_reply",
        "load_intent_dataset",
        "load_reply_dataset",
        "reply_report",
    ],
    "shipyard.cli": ["app", "main"],
}


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_exported_members(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.__all__ == PUBLIC[module_name]
    assert module.__all__ == sorted(module.__all__, key=lambda n: (not n.isupper(), n))
    for name in module.__all__:
        assert hasattr(module, name)


def test_every_data_file_of_the_package_is_declared_for_the_wheel() -> None:
    """A file the code reads at run time (labels, templates, manifests) ships in the wheel and the image; found
    missing by the image test (the labels were symlinks no one declared)."""
    import fnmatch
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["shipyard"]
    package = root / "src" / "shipyard"
    files = [p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file() or p.is_symlink()]
    data = [f for f in files if not f.endswith((".py", ".pyc")) and "__pycache__" not in f]
    assert data and all(any(fnmatch.fnmatch(f, pattern) for pattern in declared) for f in data), data
