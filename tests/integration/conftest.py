"""One real vLLM-CPU engine with the embedded default model, shared by the integration tests."""

from __future__ import annotations

import os
from pathlib import Path

from shipyard.prepare.default_model import DEFAULT_MODEL_NAME

MODEL = DEFAULT_MODEL_NAME
ENGINE_KEY = "sk-shared-engine"
"""The shared real engine's key (every route but /health needs it): gateways in front of it send it, tests that
ask the engine directly pass it."""


def shared_models_dir() -> Path:
    """Where the converted default model is cached across test runs (the same place `shipyard up` uses)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "shipyard" / "models"
