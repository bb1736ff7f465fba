"""Process supervision: the engines this gateway owns, restarted with backoff when they die."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from shipyard.control.audit import AuditLog
from shipyard.control.launcher import ReplicaHandle
from shipyard.router.loop import BackgroundLoop
from shipyard.router.replica import ReplicaPool

log = logging.getLogger("shipyard.control")

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
        hung_restart_s: float | None = 60.0,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.audit = audit
        self.on_restart = on_restart
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.interval_s = interval_s
        self.hung_restart_s = hung_restart_s
        """An engine that has not answered a health probe for this long is killed and started again (None: never)."""
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
        now = time.monotonic()
        for replica in self.pool.replicas:
            handle = self.handles.get(replica.name)
            if handle is None or replica.name in self._restarting:
                continue
            if not handle.alive():
                self.restart_now(replica.name, "engine process exited")
            elif (
                self.hung_restart_s is not None
                and replica.unresponsive_since is not None
                and now - replica.unresponsive_since > self.hung_restart_s
            ):
                silent = round(now - replica.unresponsive_since, 1)
                self.audit.record("supervisor", "replica_hung", replica=replica.name, silent_s=silent)
                self.restart_now(replica.name, f"engine answered no health probe for {silent} s")

    def restart_now(self, name: str, reason: str) -> bool:
        """Stop (if it still runs) and start again the engine behind ``name``; False when it is not ours or
        already restarting."""
        handle = self.handles.get(name)
        if handle is None or name in self._restarting:
            return False
        replica = next((r for r in self.pool.replicas if r.name == name), None)
        if replica is not None:
            self.pool.eject(replica, reason)
            replica.unresponsive_since = None
        task = asyncio.get_running_loop().create_task(self._restart(name, handle))
        self._restarting[name] = task
        task.add_done_callback(functools.partial(self._restarted, name))
        return True

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
