from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.testing import FakeOpenAI
from tests.stack import Stack, start_stack


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
