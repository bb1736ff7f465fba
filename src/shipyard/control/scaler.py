"""Elastic fleets: the control plane's second kind of change, beside rollouts (issue 35).

Every ``interval_s`` the :class:`Scaler` of a model observes its load — each replica's queue and KV-cache use read
from the engine's own ``/metrics`` (vLLM's ``num_requests_waiting``, ``kv_cache_usage_perc``), the TTFT P90 this
gateway measured, the requests in flight on every gateway — asks the pure
:class:`~shipyard.control.autoscale.Autoscaler` (or the manual count ``shipyard scale`` set) how many replicas
the model should have, and carries a change out **under the model's lease and fencing token**: one writer of the
replica count across gateways, and never while a rollout of the model runs (the rollout owns the replicas until
it ends; the scaler then sizes the deployment that serves, whichever color it is).

- **Out**: a replica goes where the launcher has room (a CPU set or GPU slot no engine of the model uses; none:
  the change is *pending*, with the reason). It is recorded ``starting`` (listed by ``/ready``, never routed to),
  started, its adapters loaded, warmed with real requests, then put in rotation.
- **In**: the replica whose loss costs least — fewest requests in flight on every gateway, then the one that
  sent a byte least recently (the coldest cache) — is recorded ``draining``: out of rotation at every gateway; its
  requests and streams finish (up to ``shutdown_grace_s``), then its engine stops and its record goes — or, with
  ``idle: sleep`` (GPU), the engine is put to sleep (vLLM's ``POST /sleep?level=1``: weights to host RAM, KV
  cache freed) and kept, ``sleeping``; a scale-out wakes a sleeping replica (``POST /wake_up``) before it starts
  a new engine.

Every change is saved before it takes effect and written to the audit log with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from shipyard.control.audit import AuditLog
from shipyard.control.autoscale import AutoscalePolicy, Autoscaler, Load, Scale
from shipyard.control.launcher import Launcher, ReplicaHandle, UrlLauncher
from shipyard.control.rollout import Rollout
from shipyard.control.state import DeploymentState, ReplicaRecord
from shipyard.control.strategies import reload_adapters
from shipyard.control.supervisor import Supervisor
from shipyard.router.replica import Replica, ReplicaPool

log = logging.getLogger("shipyard.control")

STARTING, DRAINING, SLEEPING = "starting", "draining", "sleeping"
"""A replica's ``rotation`` while it is being added or removed, or while its engine sleeps (``""``: in
rotation)."""


class ScaleRejected(ValueError):
    """A scale command that cannot be carried out; nothing was changed. ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ScaleHost(Protocol):
    """What the scaler uses of the control plane (and nothing else: the arrows run one way)."""

    pool: ReplicaPool
    client: httpx.AsyncClient
    launcher: Launcher
    supervisor: Supervisor
    audit: AuditLog
    gateway_id: str
    ready_timeout_s: float

    @property
    def state(self) -> DeploymentState: ...

    @property
    def current(self) -> Rollout | None: ...

    async def commit(self, **changes: Any) -> DeploymentState: ...

    def record(self, name: str, handle: ReplicaHandle, **fields: Any) -> ReplicaRecord: ...

    def leased(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the model's lease for the body (every save fenced by its token); the body is cancelled when the
        lease is lost; LeaseBusy when another gateway (or this one's rollout) holds it."""

    async def wait_ready(self, replica: Replica, deadline_s: float) -> None: ...

    async def warm(self, replicas: list[Replica], model: str, light: bool) -> None: ...

    async def in_flight(
        self,
        replicas: set[str] = frozenset(),  # type: ignore[assignment]
        model: str | None = None,
        waiting: bool = False,
    ) -> int:
        """Requests in flight on every gateway (``waiting``: and those waiting for a first replica)."""

    async def settle(self, timeout_s: float = 3.0) -> None: ...

    def monotonic(self) -> float: ...

    async def pause(self, seconds: float) -> None: ...


class LeaseBusy(RuntimeError):
    """The model's lease is held elsewhere (a rollout, another gateway's scaler) or the store did not answer."""


@dataclass(frozen=True)
class EngineLoad:
    """One engine's own view of its load, from its ``/metrics``."""

    waiting: float = 0.0
    running: float = 0.0
    kv_cache: float = 0.0


ENGINE_GAUGES = {
    "vllm:num_requests_waiting": "waiting",
    "vllm:num_requests_running": "running",
    "vllm:kv_cache_usage_perc": "kv_cache",
    "vllm:gpu_cache_usage_perc": "kv_cache",  # vLLM before 0.10
}


def parse_engine_metrics(text: str) -> EngineLoad:
    """The queue, running count and KV-cache use in a vLLM ``/metrics`` page (summed over its engines' labels;
    the cache use averaged). Unknown or missing metrics count as 0."""
    found: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        name = ENGINE_GAUGES.get(family.name) or ENGINE_GAUGES.get(f"{family.name}_total")
        if name is not None:
            found.setdefault(name, []).extend(s.value for s in family.samples if not s.name.endswith("_created"))
    kv = found.get("kv_cache", [])
    return EngineLoad(
        waiting=sum(found.get("waiting", [])),
        running=sum(found.get("running", [])),
        kv_cache=sum(kv) / len(kv) if kv else 0.0,
    )


async def engine_load(client: httpx.AsyncClient, replica: Replica, timeout_s: float = 2.0) -> EngineLoad | None:
    """``replica``'s engine load, or None when its ``/metrics`` does not answer (a starting or external server)."""
    try:
        response = await client.get(f"{replica.url}/metrics", timeout=timeout_s)
        if response.status_code != 200:
            return None
        return parse_engine_metrics(response.text)
    except (httpx.HTTPError, ValueError):
        return None


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative ``(upper bound, count)`` buckets (sorted, +Inf last):
    linear inside the bucket the rank falls in; None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


class HistogramWindow:
    """The P90 of a cumulative Prometheus histogram over the last ``window_s`` (the growth of its buckets since
    the look at least that old). A window of several seconds, not one tick: first tokens arrive in bursts (a
    client's next request starts when its stream ends), and a tick without any would read as no load."""

    def __init__(
        self,
        read: Callable[[], dict[float, float]],
        window_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.read = read
        self.window_s = window_s
        self.clock = clock
        self._looks: deque[tuple[float, dict[float, float]]] = deque()

    def p90_ms(self) -> float | None:
        now, buckets = self.clock(), self.read()
        self._looks.append((now, buckets))
        while len(self._looks) > 1 and self._looks[1][0] <= now - self.window_s:
            self._looks.popleft()
        base = self._looks[0][1]
        grown = sorted((bound, count - base.get(bound, 0.0)) for bound, count in buckets.items())
        value = histogram_quantile(0.9, grown)
        return None if value is None else value * 1000


@dataclass
class ScaleStatus:
    """What ``shipyard rollout status``, ``/admin/scale`` and the metrics show of a model's scaling."""

    mode: str = "fixed"
    """``auto`` (the autoscaler decides), ``manual`` (``shipyard scale --replicas``) or ``fixed``."""
    desired: int | None = None
    reason: str = ""
    pending: str = ""
    """Why the desired count is not being reached (no room, a rollout runs, the lease is elsewhere)."""
    load: dict[str, Any] = field(default_factory=dict)
    changes: dict[str, int] = field(default_factory=lambda: {"out": 0, "in": 0})
    last_change: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Scaler:
    """Sizes one model's serving deployment (see the module's text). ``policy`` None: only a manual count moves
    it; ``engine_load`` and ``ttft_p90_ms`` are where the observations come from (replaceable in tests)."""

    def __init__(
        self,
        host: ScaleHost,
        policy: AutoscalePolicy | None,
        *,
        model: str = "",
        interval_s: float = 1.0,
        shutdown_grace_s: float = 120.0,
        ttft_p90_ms: Callable[[], float | None] | None = None,
        engine_load: Callable[[Replica], Awaitable[EngineLoad | None]] | None = None,
        clock: Callable[[], float] | None = None,
        busy_elsewhere: Callable[[], set[str]] | None = None,
        on_change: Callable[[str], None] | None = None,
        idle: str = "stop",
    ) -> None:
        self.host = host
        self.policy = policy
        self.autoscaler = Autoscaler(policy) if policy is not None else None
        self.model = model
        self.interval_s = interval_s
        self.shutdown_grace_s = shutdown_grace_s
        self.ttft_p90_ms = ttft_p90_ms or (lambda: None)
        self.engine_load = engine_load or (lambda replica: _engine_load(host.client, replica))
        self.clock = clock or host.monotonic
        self.busy_elsewhere = busy_elsewhere or set
        """The CPU sets and GPU sets the other models of this host use (a new replica goes elsewhere)."""
        self.on_change = on_change or (lambda direction: None)
        """Called with ``out`` or ``in`` once a replica was added or removed (the metrics' counter)."""
        self.idle = idle
        """``stop`` or ``sleep``: what a replica scaled in becomes (see the module's text)."""
        self.on_tick: Callable[[], None] = lambda: None
        """Called after every observation (the control plane exports the status as gauges)."""
        self.status = ScaleStatus(mode="auto" if policy is not None else "fixed")
        self._acting: asyncio.Task[None] | None = None
        self._last_ttft: float | None = None

    # ----- observing and deciding ----------------------------------------------------------------------------

    def serving_deployment(self) -> str | None:
        """The deployment the scaler sizes: the one with the largest traffic weight among those with replicas
        (after a blue-green rollout, the new color)."""
        deployments = self.host.state.deployments() or self.host.pool.deployments()  # pool: found by DNS
        if not deployments:
            return self.host.state.scale.get("deployment")
        weights = self.host.pool.weights
        return max(deployments, key=lambda d: (weights.get(d, 0.0), d))

    def counted(self, deployment: str | None) -> list[ReplicaRecord]:
        """The deployment's replicas that count: serving or starting (a draining one is on its way out); those
        found by DNS (Kubernetes pods, not in the state) count as serving."""
        records = [
            r for r in self.host.state.replicas if r.deployment == deployment and r.rotation not in (DRAINING, SLEEPING)
        ]
        if records or self.host.state.replicas:
            return records
        found = [r for r in self.host.pool.replicas if r.deployment == deployment]
        return [ReplicaRecord(r.name, r.url, r.deployment, r.version, target=r.url) for r in found]

    def external(self) -> bool:
        """True when this gateway starts no engines (``--no-engine``, Kubernetes): the decision is exported as
        ``shipyard_autoscale_desired_replicas`` for KEDA to carry out, and nothing is done here."""
        return isinstance(self.host.launcher, UrlLauncher)

    async def observe(self) -> Load:
        deployment = self.serving_deployment()
        records = self.counted(deployment)
        names = {r.name for r in records}
        replicas = [r for r in self.host.pool.replicas if r.name in names and r.ready and not r.rotation]
        loads = [x for x in await asyncio.gather(*(self.engine_load(r) for r in replicas)) if x is not None]
        requests = max(await self.host.in_flight(names, waiting=True), int(sum(x.waiting + x.running for x in loads)))
        ttft = self.ttft_p90_ms()
        if ttft is None and requests > 0:  # no first token in the window while requests run: the last one stands
            ttft = self._last_ttft
        self._last_ttft = ttft
        load = Load(
            at=self.clock(),
            replicas=len(records),
            waiting=sum(x.waiting for x in loads),
            kv_cache=sum(x.kv_cache for x in loads) / len(loads) if loads else 0.0,
            ttft_p90_ms=ttft,
            requests=requests,
        )
        self.status.load = {k: v for k, v in dataclasses.asdict(load).items() if k != "at"}
        return load

    def decide(self, load: Load) -> Scale | None:
        manual = self.host.state.scale.get("manual")
        if manual is not None:
            self.status.mode = "manual"
            return Scale(int(manual), f"set to {manual} by {self.host.state.scale.get('by', '?')}")
        if self.autoscaler is None:
            self.status.mode = "fixed"
            return None
        self.status.mode = "auto"
        return self.autoscaler.decide(load)

    async def tick(self) -> Scale | None:
        """One observation and decision; starts carrying it out in the background when it changes the count."""
        stale = [r for r in self.host.state.replicas if r.rotation in (STARTING, DRAINING)]
        if stale and not self.acting():  # left mid-change by a gateway that died or lost the lease
            self._acting = asyncio.get_running_loop().create_task(self._settle(stale), name="shipyard-scale")
            return None
        if self.autoscaler is None and self.host.state.scale.get("manual") is None:  # fixed: nothing to observe
            self.status.mode, self.status.reason, self.status.pending = "fixed", "", ""
            self.status.desired = len(self.counted(self.serving_deployment()))
            return None
        load = await self.observe()
        decision = self.decide(load)
        if decision is None:
            return None
        self.status.desired, self.status.reason = decision.replicas, decision.reason
        if decision.replicas == load.replicas:
            self.status.pending = ""
        elif self.external():
            self.status.pending = "carried out by the platform (KEDA's ScaledObject reads the desired count)"
        elif self._acting is None or self._acting.done():
            rollout = self.host.current
            if rollout is not None and rollout.active:
                self.status.pending = f"rollout {rollout.id} runs: the replica count changes once it ends"
            else:
                self._acting = asyncio.get_running_loop().create_task(
                    self._act(load.replicas, decision), name="shipyard-scale"
                )
        return decision

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
                self.on_tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one bad observation (a store hiccup) must not end the scaling of the model
                log.warning("scaler of %s: %s: %s", self.model or "the model", type(exc).__name__, exc)
            await self.host.pause(self.interval_s)

    async def stop(self) -> None:
        if self._acting is not None and not self._acting.done():
            self._acting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._acting

    def acting(self) -> bool:
        return self._acting is not None and not self._acting.done()

    # ----- carrying a decision out ---------------------------------------------------------------------------

    async def _act(self, current: int, decision: Scale) -> None:
        deployment = self.serving_deployment()
        if decision.replicas > current and not any(
            r.deployment == deployment and r.rotation == SLEEPING for r in self.host.state.replicas
        ):
            room = self.host.launcher.room(self._busy())
            if room is not None:  # said once in status (and once in the audit log), not every tick
                if self.status.pending != room:
                    self.host.audit.record("autoscaler", "scale_pending", deployment=deployment, reason=room)
                self.status.pending = room
                return
        try:
            async with self.host.leased():
                if self.host.current is not None and self.host.current.active:
                    return  # a rollout started between the decision and the lease
                self.status.pending = ""
                direction = "out" if decision.replicas > current else "in"
                self.host.audit.record(
                    "autoscaler" if self.status.mode == "auto" else "scale",
                    "scale_" + direction,
                    deployment=deployment,
                    replicas=current,
                    to=decision.replicas,
                    reason=decision.reason,
                )
                for _ in range(abs(decision.replicas - current)):
                    done = await (self._add(deployment) if direction == "out" else self._remove(deployment))
                    if not done:
                        break
                    self.status.changes[direction] += 1
                    self.on_change(direction)
                    self.status.last_change = {"direction": direction, "at": self.clock(), "reason": decision.reason}
        except LeaseBusy as exc:
            self.status.pending = str(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.status.pending = f"{type(exc).__name__}: {exc}"
            log.exception("scaling %s failed", self.model or "the model")

    async def _drained(self, name: str) -> int:
        """Wait (up to ``shutdown_grace_s``) until no gateway has a request in flight on replica ``name``, which is
        out of rotation; the requests still in flight when the wait ended (0 unless the grace ran out)."""
        deadline = self.host.monotonic() + self.shutdown_grace_s
        in_flight = await self.host.in_flight({name})
        while in_flight > 0 and self.host.monotonic() < deadline:
            await self.host.pause(0.05)
            in_flight = await self.host.in_flight({name})
        return in_flight

    async def _settle(self, stale: list[ReplicaRecord]) -> None:
        """Finish what another owner left half done: a replica left ``starting`` or ``draining`` is drained (up to
        ``shutdown_grace_s``), its engine stopped and its record removed; the decision then starts over from what
        serves. Only under the lease: while another gateway holds it, its change may still be running."""
        host = self.host
        try:
            async with host.leased():
                for record in stale:
                    latest = host.state.replica(record.name)
                    if latest is None or latest.rotation not in (STARTING, DRAINING):
                        continue
                    if latest.rotation == STARTING:  # never served: out of rotation everywhere first
                        await host.commit(
                            replicas=host.state.with_replica(dataclasses.replace(latest, rotation=DRAINING))
                        )
                        await host.settle()
                    in_flight = await self._drained(record.name)
                    await host.supervisor.stop_process(record.name)
                    await host.commit(replicas=host.state.without_replicas({record.name}))
                    host.audit.record(
                        "autoscaler",
                        "replica_settled",
                        replica=record.name,
                        was=latest.rotation,
                        cut_in_flight=in_flight,
                    )
        except LeaseBusy as exc:
            self.status.pending = str(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.status.pending = f"settling {', '.join(r.name for r in stale)}: {type(exc).__name__}: {exc}"

    def _template(self, deployment: str | None) -> dict[str, Any] | None:
        """What a new replica of ``deployment`` serves: one of its records, else the one kept when it went to 0."""
        records = [r for r in self.host.state.replicas if r.deployment == deployment]
        if records:
            r = records[0]
            return {"deployment": r.deployment, "version": r.version, "target": r.target}
        kept = self.host.state.scale.get("template")
        return dict(kept) if kept else None

    def _busy(self) -> set[str]:
        state = self.host.state
        own = {r.cpu_bind for r in state.replicas if r.cpu_bind} | {r.devices for r in state.replicas if r.devices}
        return own | self.busy_elsewhere()

    def _new_name(self, template: dict[str, Any]) -> str:
        taken = {r.name for r in self.host.state.replicas} | {r.name for r in self.host.pool.replicas}
        stem = f"{template['deployment']}-{template['version']}" if template["version"] else template["deployment"]
        if stem not in taken:
            return stem
        return next(f"{stem}-{n}" for n in range(2, 1000) if f"{stem}-{n}" not in taken)  # as ``serve`` names them

    async def _wake(self, record: ReplicaRecord) -> bool:
        """Wake a sleeping replica, warm it, put it back in rotation (False: it did not wake; it is stopped)."""
        host = self.host
        started = self.clock()
        replica = next((r for r in host.pool.replicas if r.name == record.name), None)
        try:
            response = await host.client.post(f"{record.url}/wake_up", timeout=host.ready_timeout_s)
            if response.status_code != 200 or replica is None:
                raise RuntimeError(f"wake_up answered HTTP {response.status_code}: {response.text[:200]}")
            await host.wait_ready(replica, host.ready_timeout_s)
            await host.warm(
                [replica], self.model if self.model in replica.models else next(iter(replica.models), ""), light=True
            )
        except Exception as exc:  # a replica that cannot wake is stopped: a new one is started instead
            host.audit.record("autoscaler", "wake_failed", replica=record.name, error=f"{type(exc).__name__}: {exc}")
            await host.supervisor.stop_process(record.name)
            await host.commit(replicas=host.state.without_replicas({record.name}))
            return False
        latest = host.state.replica(record.name) or record  # the supervisor may have recorded a restart meanwhile
        await host.commit(replicas=host.state.with_replica(dataclasses.replace(latest, rotation="")))
        woke = round(self.clock() - started, 2)
        host.audit.record("autoscaler", "replica_woken", replica=record.name, wake_s=woke)
        self.status.last_change = {"direction": "out", "replica": record.name, "wake_s": woke}
        return True

    async def _add(self, deployment: str | None) -> bool:
        host = self.host
        asleep = [r for r in host.state.replicas if r.deployment == deployment and r.rotation == SLEEPING]
        if asleep and await self._wake(asleep[0]):
            return True
        template = self._template(deployment)
        if template is None or not template["target"]:
            self.status.pending = "nothing to start: the model has no replica to copy and no template"
            return False
        room = host.launcher.room(self._busy())
        if room is not None:
            self.status.pending = room
            return False
        name = self._new_name(template)
        handle = host.launcher.prepare(template["target"], name, busy_binds=self._busy())
        started = self.clock()
        fields = {k: template[k] for k in ("deployment", "version", "target")}
        try:
            handle.spawn()
            await host.commit(replicas=host.state.with_replica(host.record(name, handle, **fields, rotation=STARTING)))
            await handle.wait_ready()
            host.supervisor.manage(name, handle)
            await host.commit(replicas=host.state.with_replica(host.record(name, handle, **fields, rotation=STARTING)))
            replica = next(r for r in host.pool.replicas if r.name == name)
            await host.wait_ready(replica, host.ready_timeout_s)
            await reload_adapters(host.client, replica, host.state.adapters)
            model = self.model if self.model in replica.models else next(iter(replica.models), "")
            await host.warm([replica], model, light=False)
        except BaseException as exc:
            host.supervisor.release(name)
            with contextlib.suppress(Exception):
                await handle.stop()
            with contextlib.suppress(Exception):
                await host.commit(replicas=host.state.without_replicas({name}))
            if not isinstance(exc, asyncio.CancelledError):
                host.audit.record("autoscaler", "scale_out_failed", replica=name, error=f"{type(exc).__name__}: {exc}")
            raise
        record = host.state.replica(name)
        assert record is not None
        await host.commit(replicas=host.state.with_replica(dataclasses.replace(record, rotation="")))
        cold_start = round(self.clock() - started, 2)
        host.audit.record("autoscaler", "replica_added", replica=name, cold_start_s=cold_start)
        self.status.last_change = {"direction": "out", "replica": name, "cold_start_s": cold_start}
        return True

    def pick_to_remove(self, deployment: str | None) -> ReplicaRecord | None:
        """The replica whose loss costs least: fewest requests in flight (here and elsewhere), then the coldest
        cache (the one that sent a byte least recently)."""
        by_name = {r.name: r for r in self.host.pool.replicas}
        records = [
            r for r in self.host.state.replicas if r.deployment == deployment and r.rotation not in (DRAINING, SLEEPING)
        ]

        def cost(record: ReplicaRecord) -> tuple[int, int, float]:
            replica = by_name.get(record.name)
            if replica is None:
                return (0, 0, 0.0)
            starting = 0 if record.rotation == STARTING else 1  # one not serving yet goes first
            return (starting, replica.in_flight + replica.elsewhere_in_flight, replica.last_byte_at)

        return min(records, key=cost, default=None)

    async def _remove(self, deployment: str | None) -> bool:
        host = self.host
        record = self.pick_to_remove(deployment)
        if record is None:
            return False
        if len(self.counted(deployment)) == 1:  # the last one: what a start from zero serves is kept
            template = {"deployment": record.deployment, "version": record.version, "target": record.target}
            await host.commit(scale={**host.state.scale, "template": template, "deployment": record.deployment})
        await host.commit(replicas=host.state.with_replica(dataclasses.replace(record, rotation=DRAINING)))
        await host.settle()
        in_flight = await self._drained(record.name)
        if self.idle == "sleep" and await self._sleep(record):
            host.audit.record("autoscaler", "replica_slept", replica=record.name, cut_in_flight=in_flight)
            return True
        await host.supervisor.stop_process(record.name)
        await host.commit(replicas=host.state.without_replicas({record.name}))
        host.audit.record("autoscaler", "replica_removed", replica=record.name, cut_in_flight=in_flight)
        return True

    async def _sleep(self, record: ReplicaRecord) -> bool:
        """Put a drained replica's engine to sleep (level 1); False when it would not (it is stopped instead)."""
        try:
            response = await self.host.client.post(f"{record.url}/sleep", params={"level": "1"}, timeout=120)
        except httpx.HTTPError:
            return False
        if response.status_code != 200:
            return False
        latest = self.host.state.replica(record.name) or record
        await self.host.commit(replicas=self.host.state.with_replica(dataclasses.replace(latest, rotation=SLEEPING)))
        return True


async def _engine_load(client: httpx.AsyncClient, replica: Replica) -> EngineLoad | None:
    return await engine_load(client, replica)
