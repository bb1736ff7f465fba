"""The control plane: the persisted deployment state, applied to this gateway's pool, and the rollout executor.

Every change is saved to the :class:`StateStore` before it takes effect here; other gateways on the same store
apply it within ``watch_interval_s``. One rollout at a time across them all: the gateway running it holds the
store's lease and renews it; a rollout whose owner died (its lease expired) is resolved by whichever gateway
notices, by the rule of :func:`~shipyard.control.rollout.next_action` (written in docs/guides/update.md).

>>> control = ControlPlane(pool, client, MemoryStateStore(), UrlLauncher(), audit=AuditLog(None))  # doctest: +SKIP
>>> await control.start(); rollout = await control.request(RolloutCommand("http://10.0.0.7:8000"))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from shipyard.control.audit import AuditLog
from shipyard.control.autoscale import AutoscalePolicy
from shipyard.control.checks import NoGate, PlainWarmUp, QualityGate, WarmUp
from shipyard.control.commands import RolloutCommand
from shipyard.control.executor import RolloutExecutor
from shipyard.control.inplace import InPlace
from shipyard.control.launcher import Launcher, ReplicaHandle
from shipyard.control.rollout import Rollout, Strategy
from shipyard.control.scaler import LeaseBusy, Scaler, ScaleRejected
from shipyard.control.state import DeploymentState, ReplicaRecord, rebase
from shipyard.control.store import Fence, LeaseLost, LoadReport, StateConflict, StateStore
from shipyard.control.strategies import BlueGreen, LoraAlias, RolloutStrategy, reload_adapters
from shipyard.control.supervisor import Supervisor
from shipyard.router.health import probe
from shipyard.router.replica import Replica, ReplicaPool

log = logging.getLogger("shipyard.control")

WAITING_KEY = "waiting"
"""A load report's count of requests waiting at a gateway for the first replica of a model scaled to zero."""


@dataclass
class ControlConfig:
    drain_timeout_s: float = 120.0
    ready_timeout_s: float = 600.0
    warmup_requests: int = 3
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    hung_restart_s: float | None = 60.0
    watch_interval_s: float = 0.2
    """How often the store is read for other gateways' changes (and this gateway's load reported)."""
    lease_ttl_s: float = 10.0
    lease_renew_deadline_s: float | None = None
    """How long after its last successful renewal the owner may go on acting (default: two thirds of the TTL).
    Shorter than the TTL, so an owner cut off from the store stops before anyone else can take the lease
    (client-go's leader election: LeaseDuration 15 s, RenewDeadline 10 s)."""
    reload_timeout_s: float = 300.0
    """Longest an in-place weight reload may take before the previous weights are put back."""
    gateway_id: str = ""
    """This gateway's name in leases, load reports and the state's ``updated_by`` (default: host-pid-random)."""
    model: str = ""
    """The fleet model this control plane changes (its name in status, the audit log and errors)."""
    kind: str = "generate"
    """``generate`` (chat/completions) or ``embed`` (a pooling model): what warm-up requests it is sent."""
    autoscale: AutoscalePolicy | None = None
    """The model's ``autoscale:`` policy (None: its replica count changes only by ``shipyard scale``)."""
    autoscale_interval_s: float = 1.0
    autoscale_idle: str = "stop"
    """What scaling in does to a replica: ``stop`` its engine or put it to ``sleep`` (vLLM's sleep mode, GPU)."""
    shutdown_grace_s: float = 120.0
    """How long a replica being scaled in waits for its requests before its engine stops."""
    follower: bool = False
    """A serving worker of a gateway of several processes: it applies the state and reports its load, but never
    saves a state nor runs or takes over a rollout (its primary process does; the admin API is forwarded there)."""


def default_strategies() -> dict[Strategy, RolloutStrategy]:
    return {s.kind: s for s in (BlueGreen(), LoraAlias(), InPlace())}


def default_gateway_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


class ControlPlane:
    def __init__(
        self,
        pool: ReplicaPool,
        client: httpx.AsyncClient,
        store: StateStore,
        launcher: Launcher,
        *,
        audit: AuditLog,
        warm_up: WarmUp | None = None,
        gate: QualityGate | None = None,
        config: ControlConfig | None = None,
        managed: Mapping[str, ReplicaHandle] | None = None,
        strategies: Mapping[Any, RolloutStrategy] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        on_pause: Callable[[float, str], None] | None = None,
        ttft_p90_ms: Callable[[], float | None] | None = None,
        busy_elsewhere: Callable[[], set[str]] | None = None,
        on_scale: Callable[[dict[str, Any], str | None], None] | None = None,
    ) -> None:
        self.pool = pool
        self.client = client
        self.store = store
        self.launcher = launcher
        self.audit = audit
        self.warm_up = warm_up or PlainWarmUp()
        self.gate = gate or NoGate()
        self.config = config or ControlConfig()
        self.gateway_id = self.config.gateway_id or default_gateway_id()
        self.strategies: dict[Strategy, RolloutStrategy] = dict(strategies or default_strategies())
        self.clock = clock
        self.sleep = sleep
        self.supervisor = Supervisor(
            pool,
            audit,
            on_restart=self._restarted,
            backoff_s=self.config.restart_backoff_s,
            backoff_max_s=self.config.restart_backoff_max_s,
            hung_restart_s=self.config.hung_restart_s,
            interval_s=self.config.watch_interval_s,
            sleep=sleep,
        )
        for name, handle in (managed or {}).items():
            self.supervisor.manage(name, handle)
        self.drain_timeout_s = self.config.drain_timeout_s
        self.ready_timeout_s = self.config.ready_timeout_s
        self.reload_timeout_s = self.config.reload_timeout_s
        self.on_pause = on_pause
        self.current: Rollout | None = None
        self._state = DeploymentState()
        self.applied_at = 0.0
        """When this gateway applied the current revision (wall clock)."""
        self._from_state: set[str] = set()
        self.executor = RolloutExecutor(self)
        self.scaler = Scaler(
            self,
            self.config.autoscale,
            model=self.config.model,
            interval_s=self.config.autoscale_interval_s,
            shutdown_grace_s=self.config.shutdown_grace_s,
            ttft_p90_ms=ttft_p90_ms,
            busy_elsewhere=busy_elsewhere,
            idle=self.config.autoscale_idle,
            on_change=(lambda direction: on_scale(self.scale_status(), direction)) if on_scale else None,
        )
        if on_scale is not None:
            self.scaler.on_tick = lambda: on_scale(self.scale_status(), None)
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._lease_token: int | None = None
        self.lease_user: str | None = None
        """Who on this gateway uses the model's lease now (``scaler``, ``rollout``): one at a time, set before the
        first await (the store lets this gateway take its own lease twice)."""
        self.lease_error = ""
        self._lease_until = 0.0
        """Monotonic time until which this gateway may act under its lease (last renewal + renew deadline)."""

    # ----- the state ---------------------------------------------------------------------------------------

    @property
    def state(self) -> DeploymentState:
        return self._state

    @property
    def restarts(self) -> dict[str, int]:
        return self.supervisor.restarts

    async def start(self) -> None:
        """Read the state (or seed it from the pool), apply it, resolve an interrupted rollout, start watching."""
        stored = await self.store.load()
        if self.config.follower:
            if stored is not None:
                self._apply(stored, adopt_rollout=False)
            # the probes of the replicas the state added (the only tasks yet): known ready before serving
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.spawn(self._follow())
            return
        if stored is None:
            replicas = [self._seed_record(r) for r in self.pool.replicas]
            stored = DeploymentState().evolve(
                by=self.gateway_id, at=self.clock(), replicas=replicas, weights=self.pool.weights
            )
            with contextlib.suppress(StateConflict):  # another gateway seeded it first: take theirs
                await self.store.save(stored)
            stored = await self.store.load() or stored
        self._apply(stored)
        self.supervisor.start()
        if self.current is not None and self.current.active and await self.acquire_lease():
            self.executor.resume(self.current)
        self.spawn(self._follow())
        self.spawn(self.scaler.run(), name="shipyard-scaler")

    def _seed_record(self, replica: Replica) -> ReplicaRecord:
        handle = self.supervisor.handles.get(replica.name)
        if handle is None:  # a server someone else runs
            return ReplicaRecord(replica.name, replica.url, replica.deployment, replica.version, target=replica.url)
        engine = handle.identity().get("engine") or {}
        target = str(engine.get("model", replica.url))
        return self.record(replica.name, handle, deployment=replica.deployment, version=replica.version, target=target)

    def record(self, name: str, handle: ReplicaHandle, **fields: Any) -> ReplicaRecord:
        identity = handle.identity()  # a replica on a cluster node names its own url and host
        base = {"name": name, "url": handle.url, "host": socket.gethostname() if identity else ""}
        return ReplicaRecord(**{**base, **fields, **identity})

    async def commit(self, **changes: Any) -> DeploymentState:
        """Save the current state with ``changes`` as the next revision, then apply it. The rollout is written
        only by the gateway that holds the rollout lease (from its ``current``); any other keeps the rollout of
        the latest state, re-read after a conflict, so it never puts the owner's rollout back a phase."""
        async with self._lock:
            base = self._state
            for _ in range(5):
                these = dict(changes)
                if "rollout" not in these and self.current is not None and self._lease_token is not None:
                    these["rollout"] = self.current.to_record()
                state = self._state.evolve(by=self.gateway_id, at=self.clock(), **rebase(these, base, self._state))
                try:
                    await self.store.save(state, fence=self._fence())
                except LeaseLost:
                    raise
                except StateConflict:
                    latest = await self.store.load()
                    if latest is not None:
                        self._apply(latest, adopt_rollout=False)
                    continue
                self._apply(state, adopt_rollout=False)
                return state
            raise StateConflict("the state kept changing under this gateway; try again")

    def _apply(self, state: DeploymentState, adopt_rollout: bool = True) -> None:
        """Make this gateway's pool what ``state`` says: replicas, weights, aliases."""
        self._state = state
        self.applied_at = self.clock()
        by_name = {r.name: r for r in self.pool.replicas}
        wanted = {record.name: record for record in state.replicas}
        for name in self._from_state - set(wanted):  # gone from the state (replicas found by DNS are not in it)
            if name in by_name:
                self.pool.remove(by_name[name])
        for name, record in wanted.items():
            replica = by_name.get(name)
            if replica is None:
                replica = Replica(record.url, name=name, deployment=record.deployment, version=record.version)
                self.pool.add(replica)
                self.spawn(probe(self.client, replica))
            if replica.url != record.url:  # its engine moved (a cluster node died): the new address, probed anew
                replica.url, replica.ready = record.url, False
                self.spawn(probe(self.client, replica))
            replica.version = record.version
            replica.quarantined = record.quarantined
            replica.rotation = record.rotation
            if record.held:
                self.pool.hold(replica)
            else:
                self.pool.release_hold(replica)
        self._from_state = set(wanted)
        self.pool.set_weights(state.weights)
        for alias in set(self.pool.aliases) - set(state.aliases):
            self.pool.set_alias(alias, None)
        for alias, target in state.aliases.items():
            self.pool.set_alias(alias, target)
        if adopt_rollout and state.rollout is not None:
            self.current = Rollout.from_record(state.rollout, clock=self.clock)

    async def _follow(self) -> None:
        """Apply other gateways' changes, report this gateway's load, take over a rollout whose owner died."""
        while True:
            with contextlib.suppress(Exception):
                stored = await self.store.load()
                if stored is not None and stored.revision > self._state.revision:
                    running_here = self.running_here()
                    self._apply(stored, adopt_rollout=not running_here and not self.config.follower)
                await self.store.report_load(
                    LoadReport(self.gateway_id, self._state.revision, self._local_load(), self.clock()),
                    ttl_s=max(self.config.watch_interval_s * 10, 2.0),
                )
                self._see_load_elsewhere(await self.store.load_reports())
                rollout = self.current
                if self.config.follower:
                    pass  # the primary process runs every rollout; a follower never holds the lease
                elif rollout is not None and rollout.active and not self.running_here():
                    if await self.store.lease_owner() is None and await self.acquire_lease():
                        latest = await self.store.load()  # the dead owner's last step, saved before the lease ran out
                        if latest is not None and latest.revision > self._state.revision:
                            self._apply(latest)
                        rollout = self.current or rollout
                        self.audit.record(self.gateway_id, "rollout_taken_over", rollout=rollout.id)
                        self.executor.resume(rollout)
            await self.sleep(self.config.watch_interval_s)

    # ----- the rollout lease -------------------------------------------------------------------------------

    @property
    def renew_deadline_s(self) -> float:
        return self.config.lease_renew_deadline_s or self.config.lease_ttl_s * 2 / 3

    async def acquire_lease(self) -> bool:
        """Take the rollout lease (bounded by the renew deadline); its token fences every save from now on.
        False when another gateway holds it, or the store does not answer (``lease_error`` says why)."""
        sent = time.monotonic()
        self.lease_error = ""
        try:
            token = await self._ask_lease(self.renew_deadline_s)
        except Exception as exc:  # unreachable, timed out: no lease
            self.lease_error = f"{type(exc).__name__}: {exc}".rstrip(": ")
            log.warning("the rollout lease could not be taken: %s", self.lease_error)
            return False
        if token is None:
            return False
        self._lease_token, self._lease_until = token, sent + self.renew_deadline_s
        return True

    async def _ask_lease(self, timeout_s: float) -> int | None:
        """Take or renew the lease in the store, waiting at most ``timeout_s``."""
        return await asyncio.wait_for(self.store.acquire_lease(self.gateway_id, self.config.lease_ttl_s), timeout_s)

    async def release_lease(self, lost: bool = False) -> None:
        """Give the lease back (``lost``: it is gone already; nothing to ask the store)."""
        self._lease_token = None
        if lost:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.store.release_lease(self.gateway_id), self.renew_deadline_s)

    def _fence(self) -> Fence | None:
        return Fence(self.gateway_id, self._lease_token) if self._lease_token is not None else None

    async def keep_lease(self, on_lost: Callable[[str], object]) -> None:
        """Renew the lease until cancelled; when a renewal does not succeed before the renew deadline (the store
        is unreachable, or another gateway holds the lease), call ``on_lost`` and return: stop acting."""
        period = max(min(self.config.lease_ttl_s / 5, 2.0), 0.01)
        while True:
            await asyncio.sleep(period)
            sent = time.monotonic()
            try:
                renewed = await self._ask_lease(max(self._lease_until - sent, 0.001))
            except asyncio.TimeoutError:
                why = f"no renewal within the {self.renew_deadline_s:g} s renew deadline"
            except Exception as exc:  # the store is unreachable: retry until the deadline
                if time.monotonic() < self._lease_until:
                    continue
                why = f"the store did not answer ({type(exc).__name__}: {exc})"
            else:
                if renewed is not None and renewed == self._lease_token:
                    self._lease_until = sent + self.renew_deadline_s
                    continue
                why = "another gateway holds the lease" if renewed is None else "the lease was taken anew"
            self.audit.record(self.gateway_id, "lease_lost", reason=why)
            log.warning("gateway %s stops acting on its rollout: %s", self.gateway_id, why)
            on_lost(why)
            return

    @contextlib.asynccontextmanager
    async def leased(self) -> AsyncIterator[None]:
        """Hold the model's lease for the body (each save fenced by its token); the body is cancelled when the
        lease is lost. LeaseBusy, with the reason, when it cannot be taken (a rollout here or elsewhere, another
        gateway's scaler, the store not answering)."""
        if self.running_here() or self.lease_user is not None:
            raise LeaseBusy(f"the model's lease is in use on this gateway ({self.lease_user or 'a rollout'})")
        self.lease_user = "scaler"  # before the first await: a rollout asked for meanwhile is refused
        try:
            acquired = await self.acquire_lease()
        except BaseException:
            self.lease_user = None
            raise
        if not acquired:
            self.lease_user = None
            if self.lease_error:
                raise LeaseBusy(f"the state store did not answer ({self.lease_error})")
            raise LeaseBusy(f"gateway {await self.store.lease_owner()} holds the model's lease")
        body = asyncio.current_task()
        assert body is not None
        keeper = asyncio.get_running_loop().create_task(self.keep_lease(lambda why: body.cancel(why)))
        try:
            yield
        finally:
            lost = keeper.done()
            keeper.cancel()
            try:
                await self.release_lease(lost=lost)
            finally:
                self.lease_user = None

    @property
    def model_name(self) -> str:
        return self.config.model

    def scaling_here(self) -> str | None:
        if not self.scaler.acting():
            return None
        status = self.scaler.status
        return f"to {status.desired} replicas: {status.reason}" if status.desired is not None else "a change runs"

    def running_here(self) -> bool:
        return any(t.get_name() == "shipyard-rollout" and not t.done() for t in self._tasks)

    def _local_load(self) -> dict[str, int]:
        load = {f"replica:{r.name}": r.in_flight for r in self.pool.replicas if r.in_flight}
        load.update({f"model:{m}": n for m, n in self.pool.model_load().items() if n})
        if self.pool.waiting_for_replicas:  # requests for a model at zero, waiting for its first replica
            load[WAITING_KEY] = self.pool.waiting_for_replicas
        return load

    def _others_load(self, reports: list[LoadReport]) -> dict[str, int]:
        """What the other gateways reported in flight, summed by key (``replica:NAME``, ``model:NAME``)."""
        load: dict[str, int] = {}
        for report in reports:
            if report.gateway != self.gateway_id:
                for key, n in report.in_flight.items():
                    load[key] = load.get(key, 0) + max(int(n), 0)
        return load

    def _see_load_elsewhere(self, reports: list[LoadReport]) -> None:
        """Each replica's requests in flight at the other gateways, for the routing guard."""
        elsewhere = self._others_load(reports)
        for replica in self.pool.replicas:
            replica.elsewhere_in_flight = elsewhere.get(f"replica:{replica.name}", 0)

    async def in_flight(
        self,
        replicas: set[str] = frozenset(),  # type: ignore[assignment]
        model: str | None = None,
        waiting: bool = False,
    ) -> int:
        """Requests in flight on this gateway and on every other one that reported recently (``waiting``: and
        those waiting for a first replica of the model, at zero)."""
        keys = {f"replica:{n}" for n in replicas} | ({f"model:{model}"} if model else set())
        keys |= {WAITING_KEY} if waiting else set()
        total = sum(max(n, 0) for k, n in self._local_load().items() if k in keys)
        try:
            reports = await asyncio.wait_for(self.store.load_reports(), self.renew_deadline_s)
        except Exception as exc:  # unknown is not idle: a drain waits (up to its deadline) rather than stop early
            log.warning("load reports unreadable (%s); counting the other gateways as busy", exc)
            return total + 1
        return total + sum(n for k, n in self._others_load(reports).items() if k in keys)

    async def pause(self, seconds: float) -> None:
        await self.sleep(seconds)

    async def settle(self, timeout_s: float = 3.0) -> None:
        """Wait until every gateway that reported recently has applied this gateway's current revision."""
        deadline = self.monotonic() + timeout_s
        while self.monotonic() < deadline:
            try:
                reports = await self.store.load_reports()
            except Exception:
                return
            fresh = [r for r in reports if r.gateway != self.gateway_id and self.clock() - r.at < timeout_s]
            if all(r.revision >= self._state.revision for r in fresh):
                return
            await self.sleep(self.config.watch_interval_s / 2)

    def paused(self, seconds: float, strategy: str) -> None:
        self.audit.record("rollout", "replica_paused", seconds=seconds, strategy=strategy)
        if self.on_pause is not None:
            self.on_pause(seconds, strategy)

    def now(self) -> float:
        return self.clock()

    def monotonic(self) -> float:
        return time.monotonic()

    async def stop(self, *, stop_engines: bool = False) -> None:
        await self.scaler.stop()
        for task in list(self._tasks):
            while not task.done():  # again while it runs: a client library may swallow one cancellation
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if stop_engines:
            await self.supervisor.stop_all()
        else:
            await self.supervisor.stop()
        with contextlib.suppress(Exception):
            await self.store.release_lease(self.gateway_id)
        with contextlib.suppress(Exception):  # the load report goes with the gateway (it expires at once): the
            # others neither wait for it to apply their next revision nor count requests it no longer has
            await asyncio.wait_for(
                self.store.report_load(
                    LoadReport(self.gateway_id, self._state.revision, {}, self.clock()), ttl_s=0.001
                ),
                self.renew_deadline_s,
            )

    def spawn(self, coro: Any, name: str | None = None) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restarted(self, name: str, handle: ReplicaHandle) -> None:
        record = self._state.replica(name)
        if record is not None and (handle.identity() or record.quarantined):
            # started again from the folder its record names: its weights are known again
            restarted = dataclasses.replace(record, **handle.identity(), quarantined="")
            await self.commit(replicas=self._state.with_replica(restarted))
        replica = next((r for r in self.pool.replicas if r.name == name), None)
        if replica is not None:
            await reload_adapters(self.client, replica, self._state.adapters)
            await probe(self.client, replica)

    # ----- commands (carried out by the executor) -----------------------------------------------------------

    async def request(self, command: RolloutCommand) -> Rollout:
        """Validate and start a rollout in the background; RolloutRejected with nothing changed."""
        return await self.executor.request(command)

    async def promote(self, who: str) -> Rollout:
        return await self.executor.promote(who)

    async def rollback(self, who: str) -> Rollout:
        return await self.executor.rollback(who)

    async def scale(self, replicas: int | None, who: str) -> dict[str, Any]:
        """Set the model's replica count by hand (``None``: hand it back to the autoscaler); the scaler carries it
        out within ``autoscale_interval_s``. ScaleRejected with nothing changed."""
        if self.config.follower:
            raise ScaleRejected(409, "a serving worker does not scale; its primary process does")
        if replicas is not None:
            if not 0 <= replicas <= 16:
                raise ScaleRejected(400, f"replicas must be 0..16, not {replicas}")
            policy = self.config.autoscale
            if replicas == 0 and (policy is None or policy.min_replicas > 0):
                raise ScaleRejected(
                    400,
                    "0 replicas is allowed only for a model whose autoscale has min_replicas: 0 (its requests "
                    "then wait for a cold start)",
                )
        elif self.config.autoscale is None:
            raise ScaleRejected(400, f"{self.config.model or 'this model'} has no autoscale: settings to hand back to")
        scale = {k: v for k, v in self._state.scale.items() if k not in ("manual", "by")}
        if replicas is not None:
            scale.update(manual=replicas, by=who)
        try:
            await self.commit(scale=scale)
        except Exception as exc:
            raise ScaleRejected(503, f"the scale was not saved: {type(exc).__name__}: {exc}") from exc
        self.audit.record(who, "scale_set", replicas=replicas if replicas is not None else "auto")
        if replicas is not None:  # what the answer shows; the scaler's next tick carries it out
            status = self.scaler.status
            status.mode, status.desired, status.reason = "manual", replicas, f"set to {replicas} by {who}"
        return self.scale_status()

    def scale_status(self) -> dict[str, Any]:
        serving = self.scaler.serving_deployment()
        records = [r for r in self._state.replicas if r.deployment == serving]
        return {
            **self.scaler.status.to_dict(),
            "deployment": serving,
            "replicas": {
                "serving": sum(not r.rotation for r in records),
                "starting": sum(r.rotation == "starting" for r in records),
                "draining": sum(r.rotation == "draining" for r in records),
                "sleeping": sum(r.rotation == "sleeping" for r in records),
            },
            "policy": dataclasses.asdict(self.config.autoscale) if self.config.autoscale else None,
            "deployments": {
                name: len(self.scaler.counted(name)) for name in {*self._state.deployments(), *self.pool.deployments()}
            },
        }

    # ----- what strategies use ------------------------------------------------------------------------------

    async def wait_ready(self, replica: Replica, deadline_s: float) -> None:
        deadline = self.monotonic() + deadline_s
        while not replica.ready:
            await probe(self.client, replica)
            if replica.ready:
                return
            if self.monotonic() > deadline:
                raise TimeoutError(f"new replica not ready after {deadline_s}s: {replica.last_error}")
            await self.sleep(0.2)

    async def warm(self, replicas: list[Replica], model: str, light: bool) -> None:
        """Real requests so first users do not pay for warm-up; ``light``: one 1-token request each (a LoRA
        adapter runs in an engine whose kernels and grammars are already warm)."""
        route, light_body = (
            "/v1/chat/completions",
            {
                "model": model,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 1,
            },
        )
        if self.config.kind == "embed":
            route, light_body, light = "/v1/embeddings", {"model": model, "input": ["warm-up"]}, True
        bodies = [light_body] if light else self.warm_up.bodies(model)
        count = 1 if light else max(self.config.warmup_requests, 1)
        for replica in replicas:
            for i in range(count):
                response = await self.client.post(f"{replica.url}{route}", json=bodies[i % len(bodies)], timeout=300)
                if response.status_code != 200:
                    what = "does not answer" if light else "warm-up request failed"
                    raise RuntimeError(
                        f"{model} {what} on {replica.name}: HTTP {response.status_code} {response.text[:200]}"
                    )

    # ----- status ------------------------------------------------------------------------------------------

    def history(self) -> list[dict[str, Any]]:
        finished = [Rollout.from_record(h, clock=self.clock).to_dict() for h in self._state.history]
        current = self.current
        if current is not None and not any(h["id"] == current.id for h in finished):
            finished.append(current.to_dict())
        return [{**h, "model": self.config.model} for h in finished] if self.config.model else finished

    def describe(self) -> dict[str, Any]:
        deployments = {
            name: {
                "weight": self.pool.weights.get(name, 0.0),
                "replicas": [
                    {
                        "name": r.name,
                        "url": r.url,
                        "version": r.version,
                        "ready": r.ready,
                        "in_flight": r.in_flight,
                        "restarts": self.restarts.get(r.name, 0),
                        "models": sorted(r.models),
                        "error": r.last_error or None,
                        "pid": getattr(self._state.replica(r.name), "pid", None),
                        "devices": getattr(self._state.replica(r.name), "devices", None),
                        "cpu_bind": getattr(self._state.replica(r.name), "cpu_bind", None),
                        "host": getattr(self._state.replica(r.name), "host", None) or None,
                        "rotation": r.rotation or None,
                    }
                    for r in replicas
                ],
            }
            for name, replicas in self.pool.deployments().items()
        }
        return {
            "model": self.config.model,
            "deployments": deployments,
            "aliases": self.pool.aliases,
            "rollout": self.current.to_dict() if self.current else None,
            "scale": self.scale_status(),
            "state": {
                "store": self.store.description,
                "degraded": getattr(self.store, "degraded", None),
                "revision": self._state.revision,
                "updated_by": self._state.updated_by,
                "updated_at": self._state.updated_at,
                "applied_at": self.applied_at,
                "gateway": self.gateway_id,
            },
        }
