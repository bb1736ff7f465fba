from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.engine import EngineProcess, EngineSpec
from shipyard.prepare.default_model import pull_default
from shipyard.testing import FakeOpenAI
from tests.integration.conftest import ENGINE_KEY, MODEL, shared_models_dir
from tests.stack import Stack, start_stack


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that use the shared real engine (``engine``: the fault suite's and the integration suite's) run
    one after the other where the first of them was, so the engine starts once and stops after the last."""
    users = [item for item in items if "engine" in getattr(item, "fixturenames", ())]
    if not users:
        return
    first, chosen = items.index(users[0]), set(users)
    rest = [item for item in items if item not in chosen]
    items[:] = rest[:first] + users + rest[first:]


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the last test that uses the shared engine (whatever order a plugin left): stop it."""
    if "engine" not in getattr(item, "fixturenames", ()):
        return
    items = item.session.items
    later = items[items.index(item) + 1 :] if item in items else []
    if not any("engine" in getattr(other, "fixturenames", ()) for other in later):
        _stop_shared_engine()


@pytest.fixture(autouse=True)
def clean_environ(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No SHIPYARD_* variable leaks in from the developer's shell; each test gets its own data dir."""
    for name in list(os.environ):
        if name.startswith("SHIPYARD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SHIPYARD_DATA_DIR", str(tmp_path_factory.mktemp("data")))
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))  # a developer's ./shipyard.yaml never applies
    yield


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI("fake-model", token_rate=2000.0, default_tokens=8, max_model_len=1024)


@pytest.fixture
def stack(fake: FakeOpenAI) -> Iterator[Stack]:
    yield from start_stack(fake)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return pull_default(shared_models_dir()).path


_SHARED: list[EngineProcess] = []


# One engine for the session's modules that ask for it (tests/conftest.py runs them one after the other and stops
# it after the last one: two side by side already take 2 x 0.3 of the machine's memory in the rollout test).
@pytest.fixture(scope="session")
def engine(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    spec = EngineSpec.from_profile(
        "cpu", model=str(default_model_dir), served_model_name=MODEL, max_model_len=2048, tool_call_parser="auto"
    )
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    # The Responses API's store (off by default in vLLM: it keeps every response in memory) for previous_response_id
    env = {"VLLM_ENABLE_RESPONSES_API_STORE": "1", "VLLM_API_KEY": ENGINE_KEY}  # keyed, as shipyard starts them
    with EngineProcess(spec, log, env=env) as process:
        process.wait_ready(timeout=600)
        _SHARED.append(process)
        yield process


def _stop_shared_engine() -> None:
    """Stop the shared engine once its last test ran (its fixture's own end comes at the session's end)."""
    while _SHARED:
        _SHARED.pop().stop()
