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
from shipyard.engine.launcher import EngineHandle, EngineLauncher, cpu_halves, cpu_sets
from shipyard.engine.placement import Gpu, Need, PlacementError, Slot, gpus, plan, weights_gib
from shipyard.engine.process import MARKER_ENV
from shipyard.gateway import ServedModel, create_app
from shipyard.router import Replica
from shipyard.settings import EngineSettings, Settings

VLLM_MEMORY_DEFAULT = 0.9
"""vLLM's own ``--gpu-memory-utilization`` default; several replicas on one device share it."""

Say = Callable[[str], None]
T = TypeVar("T")
PRE_SWITCH = {Phase.PENDING.value, Phase.STARTING.value, Phase.WARMING.value, Phase.GATING.value}


class StackError(RuntimeError):
    """The stack cannot start; the message is one line for people."""


@dataclass
class EngineChoice:
    """One model of the fleet and the engines to start for it when its state is empty: a model folder (or the
    URL of a running server: ``spec`` None), its served name, how to run it, its version's name.

    ``name``: the model's entry in ``models:`` ("" for the one model of the ``model:`` shorthand, whose state
    stays where it always was). ``engine``: its engine settings (replicas, port, memory); ``gpus``: the GPUs it
    may use (None: any); ``kind``: ``generate`` or ``embed`` (a pooling model)."""

    folder: str
    served: str
    spec: EngineSpec | None
    version: str
    name: str = ""
    engine: EngineSettings | None = None
    gpus: tuple[int, ...] | None = None
    kind: str = "generate"
    memory_fraction: float | None = None
    """The ``gpu_memory_utilization`` set for this model itself (its ``models:`` entry), not the top-level one
    every model inherits: only that overrides the plan's fraction."""

    def settings_of(self, settings: Settings) -> EngineSettings:
        return self.engine or settings.engine


@dataclass
class Stack:
    app: FastAPI
    store: StateStore
    served: str
    handles: dict[str, ReplicaHandle] = field(default_factory=dict)
    adopted: list[str] = field(default_factory=list)
    """Replicas whose running engine was adopted (no cold start)."""
    stores: list[StateStore] = field(default_factory=list)
    """The state store of each model of the fleet (``store`` is the first one's)."""
    models: tuple[tuple[str, str], ...] = ()
    """(name, store scope) of each model of the fleet (scope "": the store of a fleet of one)."""

    def engines(self) -> list[EngineProcess]:
        """Every engine process this stack owns now, of every model (rollouts may have replaced or added some)."""
        handles = list(self.handles.values())
        for control in self.app.state.controls.values():
            handles += control.supervisor.handles.values()
        unique = {id(h): h for h in handles}
        return [h.process for h in unique.values() if isinstance(h, EngineHandle)]

    def stop_engines(self) -> int:
        """Stop every engine (a deliberate stop); returns how many were running. Also those whose server process
        died: ``stop`` then ends what is left of its process group (vLLM's engine-core children)."""
        engines = self.engines()
        running = sum(1 for e in engines if e.alive())
        for engine in engines:
            engine.stop()
        return running


def engine_spec(
    settings: Settings,
    folder: str,
    served: str,
    profile: str,
    enable_lora: bool,
    engine: EngineSettings | None = None,
) -> EngineSpec:
    """The engine of one model: ``engine`` (that model's settings; default the top-level ``engine``)."""
    e = engine or settings.engine
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
            default_max_tokens=e.default_max_tokens,
            extra_args=[*e.extra_args, *(["--scheduling-policy", "priority"] if settings.prioritized() else [])],
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
    choice = EngineChoice(spec.model, spec.served_model_name or spec.model, spec, "")
    return fleet_gpu_plan(settings, [choice], inventory)


def fleet_gpu_plan(settings: Settings, choices: list[EngineChoice], inventory: list[Gpu] | None = None) -> list[Slot]:
    """The GPUs of this host for every engine of the fleet (``engine.placement.plan``; each slot's ``model`` is
    the served name); none without GPUs. StackError, before anything starts, when the fleet does not fit."""
    inventory = gpus() if inventory is None else inventory
    local = [c for c in choices if c.spec is not None and Path(c.spec.model).is_dir()]
    if not inventory or not local:
        return []
    needs = []
    for choice in local:
        assert choice.spec is not None
        e = choice.settings_of(settings)
        needs.append(
            Need(
                choice.served,
                weights_gib(choice.spec.model),
                replicas=engine_places(settings, choice),  # an autoscaled model: room for its maximum
                tensor_parallel=e.tensor_parallel_size or 1,
                gpus=choice.gpus,
            )
        )
    try:
        slots = plan(needs, inventory, max_fraction=settings.engine.gpu_memory_utilization or VLLM_MEMORY_DEFAULT)
    except PlacementError as exc:
        raise StackError(f"the engines do not fit this host's GPUs: {exc}") from None
    budget = settings.engine.gpu_memory_utilization or VLLM_MEMORY_DEFAULT
    fractions = {c.served: c.memory_fraction for c in local}
    slots = [  # a fraction the user set for a model's engines stays theirs, within the GPU's budget
        dataclasses.replace(s, memory_fraction=f) if (f := fractions.get(s.model)) is not None else s for s in slots
    ]
    used: dict[int, list[Slot]] = {}
    for slot in slots:
        for gpu in slot.gpus:
            used.setdefault(gpu, []).append(slot)
    for gpu, sharing in sorted(used.items()):
        total = sum(s.memory_fraction for s in sharing)
        if len(sharing) > 1 and total > budget + 1e-9:
            parts = ", ".join(f"{s.model} #{s.replica} {s.memory_fraction:g}" for s in sharing)
            raise StackError(
                f"GPU {gpu} is shared by {parts}: {total:g} of its memory, over the budget of {budget:g} "
                "(engine.gpu_memory_utilization); lower the models' own gpu_memory_utilization or give them "
                "other GPUs"
            )
    return slots


CPU_ENGINE_OVERHEAD_GIB = 1.0
"""RAM a vLLM-CPU engine takes besides its weights and KV cache (its processes' Python, torch, activations)."""
EMBED_KV_CACHE_BYTES = 64 * 2**20
"""The KV cache a pooling model's CPU engine is given: an encoder keeps no cache between requests, and vLLM-CPU
otherwise reserves the profile's share of the host's RAM (7 GiB of 23.5 for a 90 MB all-MiniLM-L6-v2)."""


def cpu_memory_gib(spec: EngineSpec, total_gib: float) -> float:
    """RAM one vLLM-CPU engine of ``spec`` reserves at start: weights + its explicit KV cache + overhead, or (no
    explicit cache) its ``gpu_memory_utilization`` share of the host's RAM, which is what vLLM-CPU asks for."""
    args = list(spec.extra_args)
    if "--kv-cache-memory-bytes" in args:
        kv = int(args[args.index("--kv-cache-memory-bytes") + 1]) / 2**30
        return weights_gib(spec.model) + kv + CPU_ENGINE_OVERHEAD_GIB
    return (spec.gpu_memory_utilization or VLLM_MEMORY_DEFAULT) * total_gib


def check_cpu_memory(choice: EngineChoice, replicas: int, available_gib: float, total_gib: float) -> None:
    """StackError, in one line naming the model and the shortfall, when its CPU engines cannot get the RAM they
    reserve (vLLM-CPU would refuse a minute into its start, after the engines before it took theirs)."""
    assert choice.spec is not None
    need = replicas * cpu_memory_gib(choice.spec, total_gib)
    if need > available_gib:
        engines = f"{replicas} engines" if replicas > 1 else "engine"
        raise StackError(
            f"{choice.served}'s {engines} need {need:.1f} GiB of RAM and {available_gib:.1f} GiB is free "
            f"({need - available_gib:.1f} GiB short): lower its engine.gpu_memory_utilization (on CPU, a share of "
            "the host's RAM) or serve fewer models on this host"
        )


def engine_launcher(
    settings: Settings,
    choice: EngineChoice,
    profile: str,
    enable_lora: bool,
    cpu_binds: list[str] | None = None,
    gpu_slots: list[Slot] | None = None,
) -> EngineLauncher:
    """Starts the engines of one model: its log folder (``logs/<name>`` in a fleet), its CPU sets (vLLM-CPU) or
    its GPU slots."""
    assert choice.spec is not None
    e = choice.settings_of(settings)
    if cpu_binds is None and profile == Profile.CPU.value:
        cpu_binds = list(cpu_halves() or ())
    if gpu_slots is None and profile != Profile.CPU.value:
        gpu_slots = fleet_gpu_plan(settings, [choice])
    logs = settings.data_dir / "logs"
    if settings.cluster is not None:  # Ray places the engines: no CPU sets or GPU slots of this host
        from shipyard.cluster.ray_backend import RayLauncher

        return RayLauncher(
            choice.spec,
            logs / choice.name.replace("/", "_") if choice.name else logs,
            address=settings.cluster.address,
            model=choice.name,
            namespace=settings.cluster.namespace,
            command=e.vllm_command or None,
            env={
                **({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if enable_lora else {}),
                **({"VLLM_API_KEY": key} if (key := settings.engine_key_value()) else {}),
                **({"VLLM_SERVER_DEV_MODE": "1"} if SLEEP_FLAG in choice.spec.extra_args else {}),
            },
            ready_timeout_s=e.startup_timeout_s,
            marker=str(settings.data_dir.resolve()),
            die_with_parent=False,
        )
    return EngineLauncher(
        choice.spec,
        logs / choice.name.replace("/", "_") if choice.name else logs,
        command=e.vllm_command or None,
        env={
            **({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if enable_lora else {}),
            # vLLM registers /sleep and /wake_up in its dev mode only (the engine listens on loopback, keyed)
            **({"VLLM_SERVER_DEV_MODE": "1"} if SLEEP_FLAG in choice.spec.extra_args else {}),
            **({"VLLM_API_KEY": key} if (key := settings.engine_key_value()) else {}),
        },
        ready_timeout_s=e.startup_timeout_s,
        cpu_binds=cpu_binds or None,
        gpu_slots=[s for s in gpu_slots or [] if s.model == choice.served] or None,
        marker=str(settings.data_dir.resolve()),
        die_with_parent=False,
    )


SLEEP_FLAG = "--enable-sleep-mode"


def sleeps(settings: Settings, model: str) -> bool:
    """Whether fleet model ``model`` puts replicas to sleep when scaling in (``autoscale.idle: sleep``)."""
    autoscale = settings.autoscale_of(model)
    return autoscale is not None and autoscale.idle == "sleep"


def with_sleep_mode(spec: EngineSpec) -> EngineSpec:
    return (
        spec if SLEEP_FLAG in spec.extra_args else dataclasses.replace(spec, extra_args=(*spec.extra_args, SLEEP_FLAG))
    )


def engine_places(settings: Settings, choice: EngineChoice) -> int:
    """How many engines of the model may run at once here (each gets a CPU set of its own): its replicas, or its
    autoscale maximum when that is larger."""
    autoscale = settings.autoscale_of(choice.name)
    count = choice.settings_of(settings).replicas
    return max(count, autoscale.max_replicas) if autoscale is not None else count


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


def _open_store(settings: Settings, model: str | None = None) -> StateStore:
    try:
        store = open_store(settings.state_url, settings.data_dir, settings.state_key_value(), model)
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
        spans_hosts = getattr(self.launcher, "spans_hosts", False)  # a cluster's engines: adopted wherever they run
        for record in state.replicas:
            if not record.managed or (record.host and record.host != here and not spans_hosts):
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


def check_cluster_room(settings: Settings, engines: list[EngineChoice]) -> None:
    """Before any engine of the fleet starts on the Ray cluster: every replica to start fits on its nodes (a
    tensor-parallel group on one node), or the fleet is refused in one line naming the model, the hosts and the
    shortfall. A model whose engine actors already run (a gateway started again adopts them) needs no room."""
    assert settings.cluster is not None
    from shipyard.cluster.ray_backend import (
        check_fleet_fits,
        connect,
        has_actors,
        node_inventory,
        replica_need,
        running_actors,
    )

    connect(settings.cluster.address, settings.cluster.namespace)
    nodes = node_inventory()
    gpus = any(n["total"].get("GPU", 0.0) > 0 for n in nodes)
    running = running_actors()
    needs = []
    for c in engines:
        if c.spec is not None and not has_actors(c.name, running):
            resource, amount = replica_need(c.spec, gpus)
            needs.append((c.served, c.settings_of(settings).replicas, amount, resource))
    try:
        check_fleet_fits(needs, nodes)
    except EngineStartError as exc:
        raise StackError(str(exc)) from None


def build_stack(
    settings: Settings,
    *,
    upstreams: list[Replica],
    choose_engines: Callable[[], list[EngineChoice]] | None,
    profile: str,
    enable_lora: bool = False,
    say: Say = print,
) -> Stack:
    """For each model of the fleet: read its state, adopt or start its engines (or start those of its
    ``choose_engines()`` entry for an empty state); then build the app over them all.

    ``choose_engines`` None: a gateway without engines (``--no-engine``), routing to ``upstreams`` and to what
    the states name.
    """
    choices = choose_engines() if choose_engines is not None else []
    if choose_engines is None:  # no engines here: each model's state, and the servers its source names
        choices = [EngineChoice(m.source or "", m.name, None, m.version or "", m.name) for m in settings.models]
    names = [c.name for c in choices] or [""]
    engines = [c for c in choices if c.spec is not None]
    cpu = profile == Profile.CPU.value
    total = sum(engine_places(settings, c) for c in engines)
    binds = cpu_sets(max(total, 2)) if cpu and engines else []
    slots = fleet_gpu_plan(settings, engines) if engines and not cpu else []
    stores: list[StateStore] = []
    served_models: list[ServedModel] = []
    handles: dict[str, ReplicaHandle] = {}
    adopted: list[str] = []
    if settings.cluster is not None and engines:
        check_cluster_room(settings, engines)
    try:
        taken = 0
        for n, name in enumerate(names):
            choice = choices[n] if choices else None
            store = _open_store(settings, name or None)
            stores.append(store)
            state = asyncio.run(_in_this_loop(settings, store, _load, name))
            if state is None and name and choice is not None:
                state = _carry_over(settings, store, choice, say)
            launcher = None
            if choice is not None and choice.spec is not None and sleeps(settings, choice.name):
                if cpu:
                    raise StackError(
                        f"{choice.served}: autoscale.idle: sleep needs a GPU (vLLM's sleep mode runs on CUDA, ROCm "
                        "and XPU only); on CPU use idle: stop"
                    )
                choice = dataclasses.replace(choice, spec=with_sleep_mode(choice.spec))
            if choice is not None and choice.spec is not None:
                count = engine_places(settings, choice)
                own = binds[taken : taken + count] if binds else []
                taken += count
                launcher = engine_launcher(
                    settings,
                    choice,
                    profile,
                    enable_lora,
                    cpu_binds=[*own, *(b for b in binds if b not in own)] if binds else None,
                    gpu_slots=slots,
                )
            if cpu and launcher is not None and choice is not None and not (state is not None and state.replicas):
                memory = psutil.virtual_memory()
                check_cpu_memory(
                    choice, choice.settings_of(settings).replicas, memory.available / 2**30, memory.total / 2**30
                )
            model, adopted_here = _bring_up_model(settings, store, state, choice, launcher, say)
            handles.update(model.managed or {})
            adopted += adopted_here
            served_models.append(model)
        replicas = [*upstreams, *(r for m in served_models for r in m.replicas)]
        if not replicas and settings.state_url is None and not any(u.startswith("dns+") for u in settings.upstreams):
            raise StackError("nothing to serve: give a model, or --upstream URL with --no-engine")
        app = create_app(settings, upstreams, models=served_models)
    except BaseException:
        for store in stores:
            if isinstance(store, FileStateStore):
                asyncio.run(store.close())  # its lock
        raise
    served = ", ".join(m.name for m in served_models if m.name) or ", ".join(r.url for r in upstreams)
    fleet = tuple((m.name, name) for m, name in zip(served_models, names, strict=True))
    return Stack(app, stores[0], served, handles, adopted, stores, fleet)


def _bring_up_model(
    settings: Settings,
    store: StateStore,
    state: DeploymentState | None,
    choice: EngineChoice | None,
    launcher: EngineLauncher | None,
    say: Say,
) -> tuple[ServedModel, list[str]]:
    """One model's replicas: those its state names (engines adopted or started again), else new ones; and the
    names of the replicas whose running engine was adopted."""
    served = choice.served if choice is not None else ""
    kind = choice.kind if choice is not None else "generate"
    of = f" of {served}" if served else ""
    handles: dict[str, ReplicaHandle] = {}
    adopted: list[str] = []
    if state is not None and state.replicas:
        say(f"serving the deployment state{of} from {store.description} (revision {state.revision})")
        if choice is not None and not _state_serves(state, choice.folder):
            live = ", ".join(sorted({f"{r.version or '?'} ({r.target})" for r in state.replicas}))
            say(
                f"note: that state serves {live}, not {choice.folder}: a restart serves what the state names (the "
                f"last rollout's result); roll the new model out (`shipyard deploy`), or remove {store.description} "
                "to start from the configured model"
            )
        if launcher is not None:
            engines = _Engines(launcher, say)
            records = engines.bring_up(state)
            handles, adopted = engines.handles, engines.adopted
            if records != state.replicas:
                state = state.evolve(by="shipyard-serve", replicas=records)
                try:
                    asyncio.run(
                        _in_this_loop(settings, store, functools.partial(_save, state), choice.name if choice else None)
                    )
                except Exception as exc:  # the store is down: serve what runs; the next change saves it
                    say(f"the engines' new identities were not saved ({type(exc).__name__}: {exc}); serving anyway")
        replicas = [Replica(r.url, name=r.name, deployment=r.deployment, version=r.version) for r in state.replicas]
        served = served or ", ".join(sorted(set(_served_names(state))))
        return ServedModel(served, replicas, launcher, handles, store, kind), adopted
    if choice is None:
        return ServedModel(served, [], None, None, store, kind), []
    if choice.folder.startswith("dns+"):  # servers someone else runs, found by name (Kubernetes pods)
        return ServedModel(served, [], None, None, store, kind, discover=[choice.folder]), []
    if launcher is None and not choice.folder.startswith(("http://", "https://")):
        return ServedModel(served, [], None, None, store, kind), []  # no engine here: what its state will name
    if launcher is None or choice.spec is None:  # a server someone else runs
        replica = Replica(
            choice.folder, name=f"{choice.name or 'upstream'}-0", deployment="blue", version=choice.version
        )
        if not serves(choice.folder, choice.served, api_key=settings.engine_key_value()):
            say(f"{choice.folder} does not serve {choice.served} yet; routing to it once it does")
        return ServedModel(served, [replica], None, None, store, kind), []
    e = choice.settings_of(settings)
    replicas = []
    # one after the other: the second engine finds the first one's compiled graphs in vLLM's cache
    for n in range(e.replicas):
        name = f"blue-{choice.version}" + (f"-{n + 1}" if n else "")
        port = e.port + n if e.port is not None else None
        ours = [h.identity() for h in handles.values() if isinstance(h, EngineHandle)]
        busy = {i["cpu_bind"] for i in ours if i["cpu_bind"]} | {i["devices"] for i in ours if i["devices"]}
        handle = launcher.handle_for(choice.spec, name, port=port, **launcher.free_place(busy))
        say(f"starting vLLM for {choice.served} from {choice.folder} (log: {handle.log_file}) ...")
        try:
            start(handle)
        except StackError:
            for started in handles.values():  # no half-started set of replicas left behind
                asyncio.run(started.stop())
            raise
        say(f"vLLM ready at {handle.url} (its own metrics: {handle.url}/metrics)")
        handles[name] = handle
        replicas.append(Replica(handle.url, name=name, deployment="blue", version=choice.version))
    return ServedModel(served, replicas, launcher, handles, store, kind), []


def _state_serves(state: DeploymentState, folder: str) -> bool:
    """Whether some replica of ``state`` serves ``folder`` (the same path, or the same URL)."""

    def same(target: str) -> bool:
        if "://" in folder or "://" in target:
            return target.rstrip("/") == folder.rstrip("/")
        return Path(target).resolve() == Path(folder).resolve()

    targets = [r.target for r in state.replicas if r.target]
    return not targets or any(same(t) for t in targets)  # no target recorded: nothing to tell


def _carry_over(settings: Settings, store: StateStore, choice: EngineChoice, say: Say) -> DeploymentState | None:
    """The state a shipyard of one model (``model:``) left, for the fleet model of the same served name: read
    from where it was and saved to this model's own store, so its engines are adopted and its versions kept."""
    legacy = open_store(settings.state_url, settings.data_dir, settings.state_key_value())
    try:
        old = asyncio.run(_in_this_loop(settings, legacy, _load_quietly))
    finally:
        if isinstance(legacy, FileStateStore):
            asyncio.run(legacy.close())
    if old is None or choice.served not in _served_names(old):
        return None
    carried = dataclasses.replace(old, revision=0).evolve(by="shipyard-serve")  # the first revision of its store
    asyncio.run(_in_this_loop(settings, store, functools.partial(_save, carried), choice.name))
    say(f"carried the state of {choice.served} (revision {old.revision}) over from {legacy.description}")
    return carried


async def _load_quietly(store: StateStore) -> DeploymentState | None:
    try:
        return await store.load()
    except (StateUnreadable, OSError, ConnectionError):
        return None


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


async def _in_this_loop(
    settings: Settings, store: StateStore, work: Callable[[StateStore], Awaitable[T]], model: str | None = None
) -> T:
    """``work`` on ``store`` (of ``model``) before the gateway runs. A Redis client binds its connections to the
    event loop that first uses them, so that work gets a store of its own and ``store`` stays unused for the
    gateway's loop."""
    if isinstance(store, FileStateStore):
        return await work(store)
    temporary = open_store(settings.state_url, settings.data_dir, settings.state_key_value(), model or None)
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
    if settings.cluster is not None:  # the engines this shipyard placed on the cluster's nodes
        from shipyard.cluster.ray_backend import stop_actors

        for name in stop_actors(settings.cluster.address, settings.cluster.namespace):
            say(f"stopped engine actor {name} on the Ray cluster")
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
