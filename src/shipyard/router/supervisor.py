"""Process supervision: the engines this gateway owns, restarted with backoff when they die."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from shipyard.router.audit import AuditLog
from shipyard.router.launcher import ReplicaHandle
from shipyard.router.loop import BackgroundLoop
from shipyard.router.replica import ReplicaPool

log = logging.getLogger("shipyard.router")

Restarted = Callable[[str, ReplicaHandle], Awaitable[None]]
"""Called after a replica's process was started again (re-load adapters, record its new identity, probe)."""


class Supervisor(BackgroundLoop):
    """Watches the processes behind the pool's replicas; a dead one is marked unready at once and restarted.

    ``manage(name, handle)`` hands a process over; ``release(name)`` takes it back (a rollout stopping it);
    ``stop_all()`` stops every owned process (a deliberate shutdown — a crash stops nothing).
    """

    task_name = "shipyard-supervisor"

    def __init__(
        self,
        pool: ReplicaPool,
        audit: AuditLog,
        *,
        on_restart: Restarted | None = None,
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        interval_s: float = 0.2,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.audit = audit
        self.on_restart = on_restart
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.interval_s = interval_s
        self.sleep = sleep
        self.handles: dict[str, ReplicaHandle] = {}
        self.restarts: dict[str, int] = {}
        self._restarting: dict[str, asyncio.Task[None]] = {}

    def manage(self, name: str, handle: ReplicaHandle) -> None:
        self.handles[name] = handle

    def release(self, name: str) -> ReplicaHandle | None:
        task = self._restarting.pop(name, None)
        if task is not None:
            task.cancel()
        return self.handles.pop(name, None)

    async def stop_process(self, name: str) -> None:
        handle = self.release(name)
        if handle is not None:
            await handle.stop()

    async def check(self) -> None:
        for replica in self.pool.replicas:
            handle = self.handles.get(replica.name)
            if handle is not None and not handle.alive() and replica.name not in self._restarting:
                self.pool.mark_unready(replica, "engine process exited")
                task = asyncio.get_running_loop().create_task(self._restart(replica.name, handle))
                self._restarting[replica.name] = task
                task.add_done_callback(functools.partial(self._restarted, replica.name))

    def _restarted(self, name: str, _: asyncio.Task[None]) -> None:
        self._restarting.pop(name, None)

    async def _run(self) -> None:
        while True:
            await self.check()
            await self.sleep(self.interval_s)

    async def _restart(self, name: str, handle: ReplicaHandle) -> None:
        delay = self.backoff_s
        while self.handles.get(name) is handle:
            count = self.restarts[name] = self.restarts.get(name, 0) + 1
            self.audit.record("supervisor", "replica_restart", replica=name, attempt=count, after_s=delay)
            await self.sleep(delay)
            try:
                await handle.restart()
            except Exception as exc:  # any failure to start means: back off and try again
                replica = next((r for r in self.pool.replicas if r.name == name), None)
                if replica is not None:
                    replica.last_error = f"restart failed: {exc}"
                delay = min(delay * 2, self.backoff_max_s)
                continue
            if self.on_restart is not None:
                await self.on_restart(name, handle)
            self.audit.record("supervisor", "replica_restarted", replica=name)
            return

    async def stop(self) -> None:
        for task in list(self._restarting.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await super().stop()

    async def stop_all(self) -> None:
        """Stop every owned process (a deliberate stop of the whole stack)."""
        await self.stop()
        handles, self.handles = list(self.handles.values()), {}
        await asyncio.gather(*(h.stop() for h in handles), return_exceptions=True)
