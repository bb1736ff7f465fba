"""Starting engines for new model versions (rollouts), restarting crashed ones, adopting running ones."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from shipyard.engine.placement import Slot
from shipyard.engine.process import MARKER_ENV, EngineProcess
from shipyard.engine.spec import EngineSpec

CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
DEVICES_ENV = "CUDA_VISIBLE_DEVICES"


class EngineHandle:
    """An :class:`EngineProcess` as the router sees it (a ``ReplicaHandle``); blocking waits run in a thread."""

    def __init__(self, process: EngineProcess, ready_timeout_s: float) -> None:
        self.process = process
        self.ready_timeout_s = ready_timeout_s
        self.url = process.url

    @property
    def log_file(self) -> Path:
        return self.process.log_file

    def alive(self) -> bool:
        return self.process.alive()

    def identity(self) -> dict[str, Any]:
        """What a restarted gateway needs to adopt this engine, or start it again the same way."""
        return {
            "engine": dataclasses.asdict(self.process.spec),
            "pid": self.process.pid,
            "started_at": self.process.started_at,
            "cpu_bind": (self.process.env or {}).get(CPU_BIND_ENV),
            "devices": (self.process.env or {}).get(DEVICES_ENV),
            "log_file": str(self.process.log_file),
        }

    def serve_from(self, folder: str) -> None:
        """After an in-place weight reload: start from ``folder`` if the engine must be started again."""
        self.process.spec = dataclasses.replace(self.process.spec, model=folder)

    def spawn(self) -> None:
        """Start the process without waiting for it (its identity can be recorded before it is ready)."""
        self.process.start()

    async def wait_ready(self) -> None:
        try:
            await asyncio.to_thread(self.process.wait_ready, self.ready_timeout_s)
        except BaseException:
            await asyncio.to_thread(self.process.stop, 5.0)
            raise

    async def start(self) -> None:
        self.spawn()
        await self.wait_ready()

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
    sets = cpu_sets(2, cpus)
    return (sets[0], sets[1]) if len(sets) == 2 else None


def cpu_sets(parts: int, cpus: int | None = None) -> list[str]:
    """``parts`` disjoint CPU sets of (nearly) equal size, fewer when there are fewer CPUs than parts; none for
    one CPU. ``cpu_sets(3, 8)`` -> ``["0-1", "2-4", "5-7"]``."""
    count = cpus or os.cpu_count() or 1
    parts = min(parts, count)
    if parts < 2:
        return []

    def span(first: int, last: int) -> str:
        return str(first) if first == last else f"{first}-{last}"

    bounds = [count * i // parts for i in range(parts + 1)]
    return [span(bounds[i], bounds[i + 1] - 1) for i in range(parts)]


class EngineLauncher:
    """Starts ``vllm`` for a model folder with the same flags (and served name) as the running version.

    ``cpu_binds``: values of ``VLLM_CPU_OMP_THREADS_BIND`` (vLLM-CPU); each launch takes the first one no
    running engine of this launcher's ``busy_binds`` uses. ``marker``: set as ``SHIPYARD_ENGINE_OF`` in each
    engine's environment (``shipyard stop`` finds engines by it). ``die_with_parent``: see
    :class:`EngineProcess` (the serving stack's engines outlive the gateway).
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
        gpu_slots: list[Slot] | None = None,
        marker: str | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.gpu_slots = gpu_slots or []
        """Where engines go on this host's GPUs (``engine.placement.plan``): each launch takes the first slot no
        running engine uses, with its ``CUDA_VISIBLE_DEVICES`` and memory fraction."""
        self.base = base
        self.log_dir = log_dir
        self.command = command
        self.env = env
        self.ready_timeout_s = ready_timeout_s
        self.cpu_binds = cpu_binds or []
        self.marker = marker
        self.die_with_parent = die_with_parent

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

    def process_env(self, cpu_bind: str | None, devices: str | None = None) -> dict[str, str]:
        env = dict(self.env or {})
        if self.marker:
            env[MARKER_ENV] = self.marker
        if cpu_bind:
            env[CPU_BIND_ENV] = cpu_bind
        if devices:
            env[DEVICES_ENV] = devices
        return env

    def free_slot(self, busy: set[str]) -> Slot | None:
        """The first GPU slot no running engine uses (``busy``: their ``CUDA_VISIBLE_DEVICES``), else the first."""
        free = [s for s in self.gpu_slots if s.visible_devices not in busy] or self.gpu_slots
        return free[0] if free else None

    def free_place(self, busy: set[str]) -> dict[str, str | None]:
        """Where the next engine goes, given the CPU binds and GPU sets running engines use: ``cpu_bind`` and
        ``devices`` for :meth:`handle_for`."""
        slot = self.free_slot(busy)
        return {"cpu_bind": self.free_bind(busy), "devices": slot.visible_devices if slot else None}

    def room(self, busy: Iterable[str]) -> str | None:
        """None while a GPU slot (GPU) or CPU set (vLLM-CPU) of this model's plan is free; else why not."""
        taken = set(busy)
        if self.gpu_slots:
            if any(s.visible_devices not in taken for s in self.gpu_slots):
                return None
            return f"every GPU slot the placement plan gave this model is taken ({len(self.gpu_slots)})"
        if self.cpu_binds:
            if any(b not in taken for b in self.cpu_binds):
                return None
            return f"every CPU set of this host is taken ({', '.join(self.cpu_binds)})"
        return None

    def on_slot(self, spec: EngineSpec, devices: str | None) -> EngineSpec:
        """``spec`` with the memory fraction the plan gave the slot on ``devices`` (unchanged without one)."""
        slot = next((s for s in self.gpu_slots if s.visible_devices == devices), None)
        return dataclasses.replace(spec, gpu_memory_utilization=slot.memory_fraction) if slot else spec

    def free_bind(self, busy: set[str]) -> str | None:
        return next((b for b in self.cpu_binds if b not in busy), self.cpu_binds[0] if self.cpu_binds else None)

    def prepare(
        self,
        target: str,
        name: str,
        *,
        busy_binds: Iterable[str] = (),
        port: int | None = None,
    ) -> EngineHandle:
        """A handle for an engine serving ``target`` (not started yet: ``spawn`` or ``start`` it)."""
        self.check(target)
        spec = dataclasses.replace(self.base, model=os.path.abspath(target))
        return self.handle_for(spec, name, port=port, **self.free_place(set(busy_binds)))

    def handle_for(
        self,
        spec: EngineSpec,
        name: str,
        *,
        cpu_bind: str | None = None,
        port: int | None = None,
        devices: str | None = None,
    ) -> EngineHandle:
        process = EngineProcess(
            self.on_slot(spec, devices),
            self.log_dir / f"engine-{name}.log",
            port=port,
            command=self.command,
            env=self.process_env(cpu_bind, devices) or None,
            die_with_parent=self.die_with_parent,
        )
        return self.handle(process)

    def adopt(self, identity: Mapping[str, Any], url_port: int, name: str) -> EngineHandle:
        """The running engine ``identity`` describes (ProcessLookupError when it is gone)."""
        spec = EngineSpec.from_record(identity["engine"])
        own_log = self.log_dir / f"engine-{name}.log"
        recorded = Path(identity.get("log_file") or own_log).resolve()
        process = EngineProcess.adopt(
            spec,
            recorded if recorded.is_relative_to(self.log_dir.resolve()) else own_log,  # never append elsewhere
            port=url_port,
            pid=int(identity["pid"]),
            started_at=identity.get("started_at"),
            command=self.command,
            env=self.process_env(identity.get("cpu_bind"), identity.get("devices")) or None,
            marker=self.marker,
        )
        return self.handle(process)
