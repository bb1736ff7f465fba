"""The Ray cluster backend: each engine replica a named, detached Ray actor that runs the vLLM server on its node.

``cluster: {backend: ray, address: HEAD:6379}`` puts a :class:`RayLauncher` behind the launcher seam
(``shipyard.control.launcher``): the control plane, its rollouts, the supervisor and the scaler use it as they use
local processes. Ray places each actor on a node with the resources it asks for (``num_gpus`` = the engine's
GPUs, one CPU where the cluster has no GPUs) and restarts it on another node when its node dies
(``max_restarts=-1``); the actor starts the engine on its node, listening on the node's address with the engine
key (every route but ``/health`` needs it). A replica's URL is its node's address and port, so a replica that
moved has a new URL: the handle reports it and the state records it.

Ray is an optional extra (``pip install 'shipyard[ray]'``); nothing on the single-host path imports this module.
Every node runs the same shipyard and sees the model folders at the same paths (shared storage).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

from shipyard.control.store import replace_with
from shipyard.engine.launcher import EngineLauncher
from shipyard.engine.process import EngineStartError
from shipyard.engine.spec import EngineSpec

log = logging.getLogger("shipyard.cluster")

NAMESPACE = "shipyard"
"""Default Ray namespace of shipyard's actors (named, detached: they outlive the gateway that made them); one per
shipyard deployment sharing a cluster (``cluster.namespace``)."""


class EngineActor:
    """Runs one engine's vLLM server on the node Ray placed it on (made a Ray actor class by :func:`actor_class`)."""

    def __init__(
        self, spec: dict[str, Any], name: str, log_dir: str, env: dict[str, str], command: list[str] | None
    ) -> None:
        import ray

        from shipyard.engine.process import EngineProcess

        self.node = ray.util.get_node_ip_address()
        self.serving = served_folder_file(log_dir, name)
        engine = dataclasses.replace(EngineSpec.from_record(spec), host=self.node)
        log_file = Path(log_dir) / f"engine-{name}.log"
        self.process = EngineProcess(self._served(engine), log_file, command=command, env=env, die_with_parent=True)
        self.process.start()  # a restart of the actor (its node died) starts the engine on its new node

    def _served(self, engine: EngineSpec) -> EngineSpec:
        """``engine`` loading the folder its replica serves now: an in-place update changes it after Ray was
        given this actor's arguments, and records it on shared storage (:meth:`RayReplicaHandle.serve_from`)."""
        if self.serving.is_file():
            return dataclasses.replace(engine, model=self.serving.read_text().strip())
        return engine

    def where(self) -> dict[str, Any]:
        return {"url": self.process.url, "host": self.node, "pid": self.process.pid}

    def alive(self) -> bool:
        return self.process.alive()

    def restart(self) -> dict[str, Any]:
        self.process.stop(5.0)
        self.process.spec = self._served(self.process.spec)
        self.process.start()
        return self.where()

    def stop(self) -> None:
        self.process.stop()

    def log_tail(self) -> str:
        from shipyard.engine.process import last_error

        return last_error(self.process.log_file)


def served_folder_file(log_dir: str | Path, name: str) -> Path:
    """Where a replica's current weights folder is kept on shared storage: Ray restarts an actor with the arguments
    it was created with, so after an in-place update the restarted engine would load the old weights without it.
    Written whole (``replace_with``): a reader sees the old folder or the new, never half a path."""
    return Path(log_dir) / f"engine-{name}.serving"


PLACE_TIMEOUT_S = 60.0
"""Longest a new engine actor may wait for a node with room before its start fails (the caller's loop waits)."""

_ACTOR: Any = None


def actor_class() -> Any:
    import ray

    global _ACTOR
    if _ACTOR is None:
        _ACTOR = ray.remote(EngineActor)
    return _ACTOR


def connect(address: str, namespace: str = NAMESPACE) -> None:
    """Join the cluster at ``address`` as a driver (once per process). Ray's token authentication applies when the
    cluster runs with ``RAY_AUTH_MODE=token``: this process needs the same ``RAY_AUTH_TOKEN``."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level=logging.WARNING)


class RayReplicaHandle:
    """A replica whose engine runs in a Ray actor (a ``ReplicaHandle``). ``alive`` reads a flag a watcher thread
    keeps (the supervisor asks every 0.2 s, and a call to a dead node would block its loop)."""

    def __init__(self, launcher: RayLauncher, name: str, spec: EngineSpec, actor: Any = None) -> None:
        self.launcher = launcher
        self.name = name
        self.spec = spec
        self.actor = actor
        self.url = ""
        self.host = ""
        self.pid: int | None = None
        self._alive = actor is not None
        self._watching = threading.Event()
        self._resources: dict[str, Any] = {}

    @property
    def log_file(self) -> Path:
        """Where the engine writes its log, on its node (the model folders and logs are on shared storage)."""
        return self.launcher.log_dir / f"engine-{self.name}.log"

    # ----- ReplicaHandle ---------------------------------------------------------------------------------

    def alive(self) -> bool:
        return self._alive

    def identity(self) -> dict[str, Any]:
        return {
            "engine": dataclasses.asdict(self.spec),
            "url": self.url,
            "host": self.host,
            "pid": self.pid,
            "started_at": None,
            "devices": None,
            "cpu_bind": None,
            "log_file": str(self.log_file),
        }

    def serve_from(self, folder: str) -> None:
        """After an in-place update: a restart of the actor (on any node) or of its engine loads ``folder``."""
        self.spec = dataclasses.replace(self.spec, model=folder)
        replace_with(served_folder_file(self.launcher.log_dir, self.name), folder)  # read at its next (re)start

    def spawn(self) -> None:
        # a name used before (a recycled blue-v1) must not start from an older record
        replace_with(served_folder_file(self.launcher.log_dir, self.name), self.spec.model)
        resource, amount = replica_need(self.spec, self.launcher.has_gpus())
        # An engine on GPUs takes no CPU of Ray's: an actor holds one CPU by default, and a node's CPU count
        # would then cap its engines below its GPUs (a host with 2 CPUs could not take a lost host's replicas)
        resources: dict[str, Any] = (
            {"num_gpus": int(amount), "num_cpus": 0} if resource == "GPU" else {"num_cpus": int(amount)}
        )
        self.actor = (
            actor_class()
            .options(
                name=self.launcher.actor_name(self.name),
                namespace=self.launcher.namespace,
                lifetime="detached",
                max_restarts=-1,
                max_task_retries=-1,
                get_if_exists=True,
                scheduling_strategy=self.launcher.placement(self.name, resource, amount),
                **resources,
            )
            .remote(
                dataclasses.asdict(self.spec),
                self.name,
                str(self.launcher.log_dir),
                self.launcher.process_env(None, None),
                self.launcher.command,
            )
        )
        self._resources = resources
        self.launcher.placed[self.name] = self
        self.url = f"http://{self.name}.placing.invalid:0"  # until Ray has placed it (``wait_ready`` learns where)
        self._alive = True  # being placed: not a dead engine to restart

    def _locate(self, where: Mapping[str, Any]) -> None:
        self.url, self.host, self.pid = str(where["url"]), str(where["host"]), where.get("pid")
        self._alive = True

    def _watch(self) -> None:
        if self._watching.is_set():
            return
        self._watching.set()
        threading.Thread(target=self._watch_loop, daemon=True, name=f"ray-watch-{self.name}").start()

    def _watch_loop(self) -> None:
        import ray

        while self._watching.is_set():
            try:
                where = ray.get(self.actor.where.remote(), timeout=2.0)
                alive = bool(ray.get(self.actor.alive.remote(), timeout=2.0))
                moved = where["url"] != self.url
                self._alive = alive and not moved  # moved: the supervisor restarts it, and learns the new URL
            except Exception:  # its node is gone (Ray restarts the actor elsewhere) or it was killed
                self._alive = False
            time.sleep(0.5)

    def _placed(self) -> Mapping[str, Any]:
        """Where Ray put the actor (waits up to ``PLACE_TIMEOUT_S`` for a node with room; then the start fails)."""
        import ray

        try:
            return dict(ray.get(self.actor.where.remote(), timeout=PLACE_TIMEOUT_S))
        except ray.exceptions.GetTimeoutError:
            ray.kill(self.actor, no_restart=True)
            raise EngineStartError(
                f"the Ray cluster at {self.launcher.address} placed no engine actor for {self.name} within "
                f"{PLACE_TIMEOUT_S:g} s: no node has the resources it asks for ({self._resources})"
            ) from None

    async def wait_ready(self) -> None:
        if self.url.endswith(".placing.invalid:0"):  # spawned, not placed yet: learn where, off the event loop
            self._locate(await asyncio.to_thread(self._placed))
            self._watch()
        deadline = time.monotonic() + self.launcher.ready_timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                try:
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if not await asyncio.to_thread(self._actor_alive):
                    tail = await asyncio.to_thread(self._log_tail)
                    raise EngineStartError(f"vLLM on {self.host} exited while starting: {tail}")
                await asyncio.sleep(0.5)
        raise EngineStartError(f"vLLM on {self.host} not healthy after {self.launcher.ready_timeout_s:.0f}s")

    def _actor_alive(self) -> bool:
        import ray

        try:
            return bool(ray.get(self.actor.alive.remote(), timeout=10.0))
        except Exception:
            return True  # the actor is being restarted elsewhere: its new engine is awaited, not given up

    def _log_tail(self) -> str:
        import ray

        try:
            return str(ray.get(self.actor.log_tail.remote(), timeout=10.0))
        except Exception as exc:
            return f"(no log: {type(exc).__name__})"

    async def start(self) -> None:
        await asyncio.to_thread(self.spawn)
        await self.wait_ready()

    async def restart(self) -> None:
        """Its engine again: where the actor is now (a node that died moved it: the engine its restart started
        there is waited for), or started anew on the same node (the engine died or hung)."""
        import ray

        where = await asyncio.to_thread(ray.get, self.actor.where.remote(), timeout=self.launcher.ready_timeout_s)
        if where["url"] == self.url:
            where = await asyncio.to_thread(ray.get, self.actor.restart.remote(), timeout=60)
        self._locate(where)
        await self.wait_ready()

    async def stop(self) -> None:
        import ray

        self._watching.clear()
        self._alive = False
        if self.actor is None:
            return
        try:
            await asyncio.to_thread(ray.get, self.actor.stop.remote(), timeout=60)
        except Exception as exc:  # its node is gone: nothing left to stop there
            log.warning("engine actor %s did not stop cleanly: %s", self.name, exc)
        await asyncio.to_thread(ray.kill, self.actor, no_restart=True)


class RayLauncher(EngineLauncher):
    """Starts each replica as a Ray actor on whichever node has room (see the module's text)."""

    def __init__(
        self,
        base: EngineSpec,
        log_dir: Path,
        *,
        address: str,
        model: str = "",
        namespace: str = NAMESPACE,
        **kwargs: Any,
    ) -> None:
        super().__init__(base, log_dir, **kwargs)
        self.address = address
        self.model = model
        self.namespace = namespace
        self.placed: dict[str, RayReplicaHandle] = {}
        """This model's replicas this process started or adopted (their hosts spread the next one)."""
        connect(address, namespace)

    def placement(self, name: str, need: str, amount: float) -> Any:
        """Where a new replica of this model goes: the live node with room that holds the fewest of the model's
        other replicas (then the fewest engines of the whole fleet), so one lost host takes a share of each model,
        not a whole one. Soft: Ray may start it elsewhere, and restarts it elsewhere when that node dies.
        ``SPREAD`` when no node has room now (Ray then waits for one, or asks its autoscaler for one)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        mine: dict[str, int] = {}
        for other, handle in self.placed.items():
            if other != name and handle.host and handle.alive():
                mine[handle.host] = mine.get(handle.host, 0) + 1
        try:
            candidates = [n for n in node_inventory() if n["free"].get(need, 0.0) >= amount]
        except Exception as exc:  # Ray's per-node view is not public API: without it, Ray's own spreading
            log.warning("no per-node view of the Ray cluster (%s): placing with SPREAD", exc)
            return "SPREAD"
        if not candidates:
            return "SPREAD"
        best = min(candidates, key=lambda n: (mine.get(n["host"], 0), -n["free"].get(need, 0.0), n["host"]))
        # soft + spill: another node when that one died or has no room by the time the actor is scheduled
        return NodeAffinitySchedulingStrategy(node_id=best["node_id"], soft=True, _spill_on_unavailable=True)

    def actor_name(self, replica: str) -> str:
        """Unique in the namespace: two models of a fleet may both have a ``blue-v1``."""
        return f"{self.model}/{replica}" if self.model else replica

    spans_hosts = True
    """Its replicas run on other hosts: a restarted gateway adopts them whatever host its records name."""

    def has_gpus(self) -> bool:
        import ray

        return float(ray.cluster_resources().get("GPU", 0)) > 0

    def room(self, busy: Iterable[str]) -> str | None:
        import ray

        free = ray.available_resources()
        need = "GPU" if self.has_gpus() else "CPU"
        amount = (self.base.tensor_parallel_size or 1) if need == "GPU" else 1
        if float(free.get(need, 0)) >= amount:
            return None
        return f"no node of the Ray cluster at {self.address} has {amount} free {need} (free: {free.get(need, 0)})"

    def handle_for(  # type: ignore[override]
        self,
        spec: EngineSpec,
        name: str,
        *,
        cpu_bind: str | None = None,
        port: int | None = None,
        devices: str | None = None,
    ) -> RayReplicaHandle:
        return RayReplicaHandle(self, name, spec)

    def adopt(self, identity: Mapping[str, Any], url_port: int, name: str) -> RayReplicaHandle:  # type: ignore[override]
        import ray

        try:
            actor = ray.get_actor(self.actor_name(name), namespace=self.namespace)
        except ValueError:
            raise ProcessLookupError(f"no engine actor {self.actor_name(name)} in the Ray cluster") from None
        handle = RayReplicaHandle(self, name, EngineSpec.from_record(identity["engine"]), actor)
        try:
            handle._locate(ray.get(actor.where.remote(), timeout=30))
        except Exception as exc:
            raise ProcessLookupError(f"engine actor {name} does not answer: {exc}") from None
        handle._watch()
        self.placed[name] = handle
        return handle


def replica_need(spec: EngineSpec, gpus: bool) -> tuple[str, float]:
    """What one replica takes on one node: its GPUs (a tensor-parallel group stays on one node) on a cluster with
    GPUs, else one CPU."""
    return ("GPU", float(spec.tensor_parallel_size or 1)) if gpus else ("CPU", 1.0)


def node_inventory() -> list[dict[str, Any]]:
    """Each live node: its id, address, total and free resources (GPU, CPU, memory in bytes), from Ray's GCS."""
    import ray
    from ray._private.state import state  # available_resources_per_node: no public per-node view without a dashboard

    free = state.available_resources_per_node()
    return [
        {
            "node_id": n["NodeID"],
            "host": n["NodeManagerAddress"],
            "total": {k: float(v) for k, v in n.get("Resources", {}).items()},
            "free": {k: float(v) for k, v in free.get(n["NodeID"], {}).items()},
        }
        for n in ray.nodes()
        if n.get("Alive")
    ]


def check_fleet_fits(needs: list[tuple[str, int, float, str]], nodes: list[dict[str, Any]]) -> None:
    """Refuse, before anything starts, a fleet the cluster cannot place: ``needs`` holds (model, replicas, amount,
    resource) — each replica takes ``amount`` of ``resource`` (its GPUs: a tensor-parallel group stays on one node)
    on one node. Packed largest first onto the nodes' free resources (first fit decreasing); raises
    :class:`EngineStartError` naming the model, each host's free amount and the shortfall."""
    free = {n["host"]: dict(n["free"]) for n in nodes}
    wanted = sorted(
        ((model, amount, resource) for model, replicas, amount, resource in needs for _ in range(replicas)),
        key=lambda item: -item[1],
    )
    needed = {r: sum(a for _, a, kind in wanted if kind == r) for _, _, r in wanted}
    had = {r: sum(left.get(r, 0.0) for left in free.values()) for r in needed}
    for model, amount, resource in wanted:
        host = next((h for h, left in free.items() if left.get(resource, 0.0) >= amount), None)
        if host is None:
            short = needed[resource] - had[resource]
            each = ", ".join(f"{h} {left.get(resource, 0.0):g}" for h, left in free.items()) or "no live node"
            raise EngineStartError(
                f"the Ray cluster cannot place the fleet: a replica of {model} needs {amount:g} {resource} on one "
                f"host and none has it (free after the replicas placed before it: {each}); the fleet needs "
                f"{max(short, amount):g} {resource} more — add nodes or serve fewer replicas"
            )
        free[host][resource] = free[host].get(resource, 0.0) - amount


def running_actors() -> list[str]:
    """The names of this namespace's engine actors (``MODEL/REPLICA``, or ``REPLICA`` for a one-model shipyard)."""
    import ray

    return list(ray.util.list_named_actors())


def has_actors(model: str, names: list[str]) -> bool:
    """Whether ``model`` (a fleet key, which may hold '/'; "" for a one-model shipyard) has engine actors."""
    return any(n.startswith(f"{model}/") for n in names) if model else any("/" not in n for n in names)


def stop_actors(address: str, namespace: str = NAMESPACE) -> list[str]:
    """Stop every engine actor of this shipyard's namespace on the cluster (``shipyard stop``); their names."""
    import ray

    connect(address, namespace)
    stopped = []
    for name in ray.util.list_named_actors():  # this driver's namespace only
        try:
            actor = ray.get_actor(name, namespace=namespace)
        except ValueError:
            continue
        with contextlib.suppress(Exception):
            ray.get(actor.stop.remote(), timeout=60)
        ray.kill(actor, no_restart=True)
        stopped.append(name)
    return stopped
