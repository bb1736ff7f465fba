"""One background asyncio task per object, started and stopped with the gateway (health probes, discovery)."""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod


class BackgroundLoop(ABC):
    """Subclasses implement ``_run`` (usually ``while True: ...; await asyncio.sleep(...)``)."""

    task_name = "shipyard-loop"

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    @abstractmethod
    async def _run(self) -> None:
        """The task's body; runs until cancelled by ``stop``."""

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
