"""Commands the tests need, and the real servers they start (from ``shipyard.testing.services``)."""

from __future__ import annotations

import os

import pytest

from shipyard.testing.services import Nginx, RedisServer, find_tool


def tool(name: str, hint: str) -> str:
    """A command the test needs; in CI (scripts/test installs them) its absence is a failure, not a skip."""
    found = find_tool(name)
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"{name} is missing in CI: {hint}")
    pytest.skip(f"{name} is not installed ({hint})")


def start_redis(folder: os.PathLike[str] | str) -> RedisServer:
    tool("redis-server", "apt-get install redis-server")
    from pathlib import Path

    return RedisServer(Path(folder))


__all__ = ["Nginx", "RedisServer", "start_redis", "tool"]
