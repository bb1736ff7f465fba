"""The serving stack for one settings object: the deployment state, the engines it names, the gateway.

``build_stack`` reads the state (file or Redis), **adopts** every engine it records that still runs here and
answers ``/health`` with its model, starts again those that do not, and builds the gateway on that state —
so a gateway restarted after a crash serves what was live, from the same engine processes, in seconds.
With no state yet it starts the configured model (or the embedded default) and the gateway seeds the state.

>>> stack = build_stack(settings, engine=True, say=print)    # doctest: +SKIP
>>> run_gateway(stack.app, settings.host, settings.port); stack.stop_engines()   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
from fastapi import FastAPI

from shipyard.control.launcher import ReplicaHandle
from shipyard.control.rollout import Phase
from shipyard.control.state import DeploymentState, ReplicaRecord
from shipyard.control.store import FileStateStore, StateStore, StateUnreadable, StoreLocked, open_store
from shipyard.engine import EngineProcess, EngineSpec, EngineStartError, Profile
from shipyard.engine.launcher import EngineHandle, EngineLauncher, cpu_halves
from shipyard.engine.placement import Gpu, Need, PlacementError, Slot, gpus, plan, weights_gib
from shipyard.engine.process import MARKER_ENV
from shipyard.gateway import create_app
from shipyard.router import Replica
from shipyard.settings import Settings

VLLM_MEMORY_DEFAULT = 0.9
"""vLLM's own ``--gpu-memory-utilization`` default; several replicas on one device share it."""

Say = Callable[[str], None]
T = TypeVar("T")
PRE_SWITCH = {Phase.PENDING.value, Phase.STARTING.value, Phase.WARMING.value, Phase.GATING.value}


class StackError(RuntimeError):
    """The stack cannot start; the message is one line for people."""


@dataclass
class EngineChoice:
    """The engine to start when the state is empty: a model folder, its served name, and how to run it."""

    folder: str
    served: str
    spec: EngineSpec
    version: str


@dataclass
class Stack:
    app: FastAPI
    store: StateStore
    served: str
    handles: dict[str, ReplicaHandle] = field(default_factory=dict)
    adopted: list[str] = field(default_factory=list)
    """Replicas whose running engine was adopted (no cold start)."""

    def engines(self) -> list[EngineProcess]:
        """Every engine process this stack owns now (rollouts may have replaced or added some)."""
        control = self.app.state.control
        handles = {**self.handles, **control.supervisor.handles}
        return [h.process for h in handles.values() if isinstance(h, EngineHandle)]

    def stop_engines(self) -> int:
        """Stop every engine (a deliberate stop); returns how many were running. Also those whose server process
        died: ``stop`` then ends what is left of its process group (vLLM's engine-core children)."""
        engines = self.engines()
        running = sum(1 for e in engines if e.alive())
        for engine in engines:
            engine.stop()
        return running


def engine_spec(settings: Settings, folder: str, served: str, profile: str, enable_lora: bool) -> EngineSpec:
    e = settings.engine
    try:
        spec = EngineSpec.from_profile(
            profile,
            model=folder,
            served_model_name=served,
            dtype=None if e.dtype == "auto" else e.dtype,
            max_model_len=e.max_model_len,
            quantization=e.quantization,
            gpu_memory_utilization=e.gpu_memory_utilization,
            enforce_eager=e.enforce_eager,
            tensor_parallel_size=e.tensor_parallel_size,
            data_parallel_size=e.data_parallel_size,
            enable_lora=True if enable_lora else None,
            max_lora_rank=e.max_lora_rank if enable_lora else None,
            tool_call_parser=e.tool_call_parser,
            extra_args=e.extra_args,
        )
    except ValueError as exc:
        raise StackError(str(exc)) from None
    if e.replicas > 1 and e.gpu_memory_utilization is None:  # N engines share the device's memory
        share = min(spec.gpu_memory_utilization or VLLM_MEMORY_DEFAULT, round(VLLM_MEMORY_DEFAULT / e.replicas, 2))
        spec = dataclasses.replace(spec, gpu_memory_utilization=share)
    return spec


def gpu_plan(settings: Settings, spec: EngineSpec, inventory: list[Gpu] | None = None) -> list[Slot]:
    """The GPUs of this host for the model's ``engine.replicas`` engines (one a GPU while there are enough, then
    sharing with memory fractions); none without GPUs. StackError, before anything starts, when they do not fit."""
    inventory = gpus() if inventory is None else inventory
    if not inventory or not Path(spec.model).is_dir():
        return []
    e = settings.engine
    need = Need(
        spec.served_model_name or spec.model,
        weights_gib(spec.model),
        replicas=e.replicas,
        tensor_parallel=e.tensor_parallel_size or 1,
    )
    try:
        slots = plan([need], inventory, max_fraction=e.gpu_memory_utilization or VLLM_MEMORY_DEFAULT)
    except PlacementError as exc:
        raise StackError(f"the engines do not fit this host's GPUs: {exc}") from None
    if e.gpu_memory_utilization is not None:  # the user's fraction for every engine, as before
        slots = [dataclasses.replace(s, memory_fraction=e.gpu_memory_utilization) for s in slots]
    return slots


def engine_launcher(settings: Settings, spec: EngineSpec, profile: str, enable_lora: bool) -> EngineLauncher:
    halves = cpu_halves() if profile == Profile.CPU.value else None
    return EngineLauncher(
        spec,
        settings.data_dir / "logs",
        command=settings.engine.vllm_command or None,
        env={
            **({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if enable_lora else {}),
            **({"VLLM_API_KEY": key} if (key := settings.engine_key_value()) else {}),
        },
        ready_timeout_s=settings.engine.startup_timeout_s,
        cpu_binds=list(halves) if halves else None,
        gpu_slots=gpu_plan(settings, spec) if profile != Profile.CPU.value else None,
        marker=str(settings.data_dir.resolve()),
        die_with_parent=False,
    )


def serves(url: str, model: str, timeout: float = 3.0, api_key: str | None = None) -> bool:
    """True when the server at ``url`` is healthy and serves ``model`` (to a client with ``api_key``)."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        if httpx.get(f"{url}/health", timeout=timeout).status_code != 200:
            return False
        listing = httpx.get(f"{url}/v1/models", timeout=timeout, headers=headers).json()
    except (httpx.HTTPError, ValueError):
        return False
    return any(card.get("id") == model for card in listing.get("data", []))


def _open_store(settings: Settings) -> StateStore:
    try:
        store = open_store(settings.state_url, settings.data_dir, settings.state_key_value())
        if isinstance(store, FileStateStore):
            store.lock()
    except (ValueError, StoreLocked) as exc:
        raise StackError(str(exc)) from None
    return store


async def _load(store: StateStore) -> DeploymentState | None:
    try:
        return await store.load()
    except StateUnreadable as exc:
        raise StackError(str(exc)) from None
    except (OSError, ConnectionError) as exc:
        raise StackError(f"cannot read the deployment state from {store.description}: {exc}") from None


class _Engines:
    """Adopts or starts the engines a state records (the part of ``build_stack`` that touches processes)."""

    def __init__(self, launcher: EngineLauncher, say: Say) -> None:
        self.launcher = launcher
        self.say = say
        self.handles: dict[str, ReplicaHandle] = {}
        self.adopted: list[str] = []

    def bring_up(self, state: DeploymentState) -> tuple[ReplicaRecord, ...]:
        """Every record with a live engine: adopted, or started again; records of an interrupted rollout's new
        version are only adopted (the rollout is rolled back, see ``next_action``)."""
        rollout = state.rollout or {}
        interrupted_new = (
            rollout.get("plan", {}).get("new_deployment")
            if rollout.get("phase") in PRE_SWITCH and rollout.get("plan", {}).get("strategy") != "lora"
            else None
        )
        here = socket.gethostname()
        records = []
        for record in state.replicas:
            if not record.managed or (record.host and record.host != here):
                records.append(record)
                continue
            adopted = self._adopt(record, check=record.deployment != interrupted_new)
            if adopted is not None:
                records.append(record)
            elif record.deployment == interrupted_new:
                records.append(dataclasses.replace(record, pid=None))
            else:
                records.append(self._restart(record))
        return tuple(records)

    def _adopt(self, record: ReplicaRecord, check: bool) -> ReplicaHandle | None:
        try:
            handle = self.launcher.adopt(dataclasses.asdict(record), record.port, record.name)
        except (ProcessLookupError, KeyError, TypeError, ValueError):
            return None
        served = (record.engine or {}).get("served_model_name") or (record.engine or {}).get("model", "")
        if check and not serves(record.url, str(served), api_key=(self.launcher.env or {}).get("VLLM_API_KEY")):
            self.say(f"engine {record.name} (pid {record.pid}) runs but does not serve {served}; replacing it")
            asyncio.run(handle.stop())
            return None
        self.handles[record.name] = handle
        self.adopted.append(record.name)
        self.say(f"adopted the running engine of {record.name} (version {record.version}, pid {record.pid})")
        return handle

    def _restart(self, record: ReplicaRecord) -> ReplicaRecord:
        spec = EngineSpec.from_record(record.engine or {})
        handle = self.launcher.handle_for(
            spec, record.name, cpu_bind=record.cpu_bind, port=record.port, devices=record.devices
        )
        self.say(f"the engine of {record.name} (version {record.version}) is gone; starting it again ...")
        start(handle)
        self.handles[record.name] = handle
        identity = handle.identity()
        return dataclasses.replace(record, **identity)


def start(handle: EngineHandle) -> None:
    try:
        asyncio.run(handle.start())
    except EngineStartError as exc:
        raise StackError(str(exc)) from None


def build_stack(
    settings: Settings,
    *,
    upstreams: list[Replica],
    choose_engine: Callable[[], EngineChoice] | None,
    profile: str,
    enable_lora: bool = False,
    say: Say = print,
) -> Stack:
    """Read the state, adopt or start its engines (or start ``choose_engine()`` for an empty state), build the app.

    ``choose_engine`` None: a gateway without engines (``--no-engine``), routing to ``upstreams`` and to what
    the state names.
    """
    store = _open_store(settings)
    try:
        state = asyncio.run(_in_this_loop(settings, store, _load))
        replicas = list(upstreams)
        launcher: EngineLauncher | None = None
        handles: dict[str, ReplicaHandle] = {}
        adopted: list[str] = []
        served = ", ".join(r.url for r in upstreams)
        if choose_engine is not None:
            choice = choose_engine()
            served = choice.served
            launcher = engine_launcher(settings, choice.spec, profile, enable_lora)
        if state is not None and state.replicas:
            say(f"serving the deployment state from {store.description} (revision {state.revision})")
            if launcher is not None:
                engines = _Engines(launcher, say)
                records = engines.bring_up(state)
                handles, adopted = engines.handles, engines.adopted
                if records != state.replicas:
                    state = state.evolve(by="shipyard-serve", replicas=records)
                    try:
                        asyncio.run(_in_this_loop(settings, store, functools.partial(_save, state)))
                    except Exception as exc:  # the store is down: serve what runs; the next change saves it
                        say(f"the engines' new identities were not saved ({type(exc).__name__}: {exc}); serving anyway")
            replicas = [Replica(r.url, name=r.name, deployment=r.deployment, version=r.version) for r in state.replicas]
            served = ", ".join(sorted(set(_served_names(state)))) or served
        elif choose_engine is not None and launcher is not None:
            # one after the other: the second engine finds the first one's compiled graphs in vLLM's cache
            for n in range(settings.engine.replicas):
                name = f"blue-{choice.version}" + (f"-{n + 1}" if n else "")
                port = settings.engine.port + n if settings.engine.port is not None else None
                ours = [h.identity() for h in handles.values() if isinstance(h, EngineHandle)]
                busy = {i["cpu_bind"] for i in ours if i["cpu_bind"]} | {i["devices"] for i in ours if i["devices"]}
                handle = launcher.handle_for(choice.spec, name, port=port, **launcher.free_place(busy))
                say(f"starting vLLM for {choice.folder} (log: {handle.process.log_file}) ...")
                try:
                    start(handle)
                except StackError:
                    for started in handles.values():  # no half-started set of replicas left behind
                        asyncio.run(started.stop())
                    raise
                say(f"vLLM ready at {handle.url} (its own metrics: {handle.url}/metrics)")
                handles[name] = handle
                replicas.insert(n, Replica(handle.url, name=name, deployment="blue", version=choice.version))
        if not replicas and settings.state_url is None and not any(u.startswith("dns+") for u in settings.upstreams):
            raise StackError("nothing to serve: give a model, or --upstream URL with --no-engine")
        app = create_app(settings, replicas, launcher=launcher, managed=handles, store=store)
    except BaseException:
        if isinstance(store, FileStateStore):
            asyncio.run(store.close())  # its lock
        raise
    return Stack(app, store, served, handles, adopted)


def _served_names(state: DeploymentState) -> list[str]:
    names = []
    for record in state.replicas:
        engine: Mapping[str, Any] = record.engine or {}
        name = engine.get("served_model_name") or engine.get("model")
        if name:
            names.append(str(name))
    return names


async def _save(state: DeploymentState, store: StateStore) -> None:
    await store.save(state)


async def _in_this_loop(settings: Settings, store: StateStore, work: Callable[[StateStore], Awaitable[T]]) -> T:
    """``work`` on ``store`` before the gateway runs. A Redis client binds its connections to the event loop that
    first uses them, so that work gets a store of its own and ``store`` stays unused for the gateway's loop."""
    if isinstance(store, FileStateStore):
        return await work(store)
    temporary = open_store(settings.state_url, settings.data_dir, settings.state_key_value())
    try:
        return await work(temporary)
    finally:
        await temporary.close()


def gateway_pid_file(settings: Settings) -> Path:
    return settings.data_dir / "gateway.pid"


def shipyard_engines(data_dir: Path) -> list[psutil.Process]:
    """Every process of an engine started by a shipyard using ``data_dir`` (found by its ``SHIPYARD_ENGINE_OF``,
    which vLLM's engine-core and worker processes inherit: also those whose server process is gone)."""
    marker = str(data_dir.resolve())
    found = []
    for process in psutil.process_iter(["pid"]):
        try:
            if process.environ().get(MARKER_ENV) == marker:
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def stop_everything(settings: Settings, say: Say, grace_s: float = 30.0) -> int:
    """``shipyard stop``: the gateway (which stops its engines), then any engine left (also after a crash).
    Returns how many processes were stopped."""
    stopped = 0
    pid_file = gateway_pid_file(settings)
    with contextlib.suppress(OSError, ValueError, psutil.Error):
        gateway = psutil.Process(int(pid_file.read_text().split()[0]))
        if "shipyard" in " ".join(gateway.cmdline()):
            say(f"stopping the gateway (pid {gateway.pid}) ...")
            gateway.terminate()
            with contextlib.suppress(psutil.TimeoutExpired):
                gateway.wait(timeout=grace_s)
            if gateway.is_running():
                gateway.kill()
            stopped += 1
    processes = shipyard_engines(settings.data_dir)
    groups = set()
    for process in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            groups.add(os.getpgid(process.pid))
    for group in sorted(groups):
        say(f"stopping engine process group {group} ...")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGTERM)
    _gone, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            os.killpg(os.getpgid(process.pid), signal.SIGKILL)
            process.kill()
    return stopped + len(groups)
