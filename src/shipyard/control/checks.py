"""What a rollout runs against a new version before users see it, as protocols the control plane is given.

The control plane knows neither the task endpoints nor the evaluation code: ``tasks.warmup.TaskWarmUp`` and
``evaluate.gate.IntentGate`` implement these, and the gateway's factory passes them in.
"""

from __future__ import annotations

from typing import Any, Protocol

import httpx

from shipyard.control.rollout import Gate


class GateFailed(RuntimeError):
    """The new version did not pass its quality gate (the message says by how much; ``facts`` what was measured)."""

    def __init__(self, message: str, facts: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.facts = facts or {}


class WarmUp(Protocol):
    def bodies(self, model: str) -> list[dict[str, Any]]:
        """Chat-completion bodies that exercise what users will ask of ``model`` (structured outputs included,
        so their grammars are compiled before the first user request)."""


class QualityGate(Protocol):
    def unavailable(self) -> str | None:
        """Why the gate cannot run here (e.g. its dataset is missing), or None."""

    async def check(self, client: httpx.AsyncClient, url: str, model: str, gate: Gate) -> dict[str, Any]:
        """Run ``gate`` against the server at ``url``; the facts measured, or :class:`GateFailed`."""


class PlainWarmUp:
    """One short chat request (a gateway without task endpoints to warm)."""

    def bodies(self, model: str) -> list[dict[str, Any]]:
        return [{"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}]


class NoGate:
    def unavailable(self) -> str | None:
        return "this gateway has no quality gate"

    async def check(self, client: httpx.AsyncClient, url: str, model: str, gate: Gate) -> dict[str, Any]:
        raise GateFailed(self.unavailable() or "")
