"""Starting engines for new model versions (rollouts) and restarting crashed ones."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

from shipyard.engine.process import EngineProcess
from shipyard.engine.spec import EngineSpec
from shipyard.router.launcher import ExternalReplica, ReplicaHandle


class EngineHandle:
    """An :class:`EngineProcess` as the router sees it; blocking waits run in a worker thread."""

    def __init__(self, process: EngineProcess, ready_timeout_s: float) -> None:
        self.process = process
        self.ready_timeout_s = ready_timeout_s
        self.url = process.url

    def alive(self) -> bool:
        return self.process.alive()

    async def start(self) -> None:
        self.process.start()
        try:
            await asyncio.to_thread(self.process.wait_ready, self.ready_timeout_s)
        except BaseException:
            await asyncio.to_thread(self.process.stop, 5.0)
            raise

    async def restart(self) -> None:
        await asyncio.to_thread(self.process.stop, 5.0)
        await self.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.process.stop)


def cpu_halves(cpus: int | None = None) -> tuple[str, str] | None:
    """Two disjoint CPU sets ("0-3", "4-7") for vLLM-CPU engines that must run side by side, or None (1 CPU).

    vLLM-CPU binds its OpenMP threads to cores; left on ``auto``, a second engine binds to the same cores as the
    first and, while the first serves traffic, barely gets to start (seen here: stuck in start-up for minutes
    under 16 streaming clients on 2 cores). Blue and green each get half of the machine instead.
    """
    count = cpus or os.cpu_count() or 1
    if count < 2:
        return None
    half = count // 2

    def span(first: int, last: int) -> str:
        return str(first) if first == last else f"{first}-{last}"

    return span(0, half - 1), span(half, count - 1)


class EngineLauncher:
    """Starts ``vllm`` for a model folder with the same flags (and served name) as the running version.

    ``cpu_binds``: values of ``VLLM_CPU_OMP_THREADS_BIND`` handed to successive launches in turn (vLLM-CPU).
    """

    def __init__(
        self,
        base: EngineSpec,
        log_dir: Path,
        *,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
        ready_timeout_s: float = 600.0,
        cpu_binds: list[str] | None = None,
    ) -> None:
        self.base = base
        self.log_dir = log_dir
        self.command = command
        self.env = env
        self.ready_timeout_s = ready_timeout_s
        self.cpu_binds = cpu_binds or []
        self._launches = 0

    def check(self, target: str) -> None:
        if target.startswith(("http://", "https://")):
            return
        folder = Path(target)
        if not folder.is_dir():
            raise ValueError(f"model folder {target} does not exist")
        if not (folder / "config.json").is_file():
            raise ValueError(f"{target} is not an HF model folder (no config.json)")

    def handle(self, process: EngineProcess) -> EngineHandle:
        return EngineHandle(process, self.ready_timeout_s)

    async def launch(self, target: str, name: str) -> ReplicaHandle:
        self.check(target)
        if target.startswith(("http://", "https://")):
            return ExternalReplica(target)
        spec = dataclasses.replace(self.base, model=os.path.abspath(target))
        env = dict(self.env or {})
        if self.cpu_binds:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_binds[self._launches % len(self.cpu_binds)]
        self._launches += 1
        process = EngineProcess(spec, self.log_dir / f"engine-{name}.log", command=self.command, env=env or None)
        handle = self.handle(process)
        await handle.start()
        return handle
