"""The fault suite: each test bounded in time (a fault test that hangs is a failed promise, not a stuck CI run),
and sharing the integration tests' real engine (``engine`` of tests/conftest.py: one for the session)."""

from __future__ import annotations

import pytest

FAULT_TEST_TIMEOUT_S = 180
"""Each fault test's bound (the real-engine ones include the engine's ~40 s start)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in str(item.path) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(FAULT_TEST_TIMEOUT_S))
