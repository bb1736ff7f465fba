"""The gateway's app factory: OpenAI-compatible API in front of a pool of vLLM replicas."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path as PathLib
from typing import Annotated, Any

import httpx
from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from shipyard import __version__
from shipyard.control.audit import AuditLog
from shipyard.control.autoscale import AutoscalePolicy
from shipyard.control.launcher import Launcher, ReplicaHandle, UrlLauncher
from shipyard.control.plane import ControlConfig, ControlPlane
from shipyard.control.scaler import HistogramWindow
from shipyard.control.store import MemoryStateStore, StateStore, is_redis, redis_location
from shipyard.gateway.admin import install_admin_routes
from shipyard.gateway.auth import KeyChecker
from shipyard.gateway.counters import LimitCounters, RedisCounters, SqliteCounters
from shipyard.gateway.errors import HotRoutes, OpenAIError, install_error_handlers
from shipyard.gateway.limits import KeyLimiter, LimitMiddleware
from shipyard.gateway.metrics import GatewayMetrics, PoolCollector
from shipyard.gateway.openapi import ROUTE_SUMMARIES, document_api
from shipyard.gateway.proxy import ApiRoute, Proxy
from shipyard.gateway.tasks import install_task_routes
from shipyard.gateway.transport import UpstreamTransport
from shipyard.gateway.workers import install_forwarding
from shipyard.prepare.registry import resolve_input
from shipyard.router import HealthMonitor, Replica, ReplicaPool, routing_policy
from shipyard.router.admission import admission_policy
from shipyard.router.discovery import UpstreamDiscovery
from shipyard.router.fleet import Fleet
from shipyard.settings import Settings
from shipyard.tasks import IntentDecode, load_labels, load_templates
from shipyard.tasks.warmup import TaskWarmUp
from shipyard.upstreams import is_discovery, parse_target


def upstream_client(settings: Settings) -> httpx.AsyncClient:
    """The pooled client the gateway talks to replicas with: no connection cap (vLLM queues for us), aiohttp
    underneath (see ``shipyard.gateway.transport``)."""
    timeout = httpx.Timeout(
        connect=settings.upstream_connect_timeout_s,
        read=settings.upstream_read_timeout_s,
        write=settings.upstream_read_timeout_s,
        pool=settings.upstream_connect_timeout_s,
    )
    headers = {"authorization": f"Bearer {key}"} if (key := settings.engine_key_value()) else {}
    return httpx.AsyncClient(
        timeout=timeout, transport=UpstreamTransport(settings.upstream_keepalive_s), headers=headers
    )


@dataclass
class ServedModel:
    """One model of the fleet as the gateway is given it: its replicas now, how to start more (``launcher``),
    the engine processes behind them (``managed``), where its deployment state lives (``store``), and whether
    it generates text or embeddings (``kind``, for warm-up requests)."""

    name: str
    replicas: Sequence[Replica] = ()
    launcher: Launcher | None = None
    managed: Mapping[str, ReplicaHandle] | None = None
    store: StateStore | None = None
    kind: str = "generate"
    discover: Sequence[str] = ()
    """``dns+http://NAME:PORT[#deployment]`` targets whose addresses are this model's replicas."""
    routing: str | None = None
    """Its routing policy (``router.Routing``); None: the settings' ``routing``."""


def limit_counters(settings: Settings) -> LimitCounters | None:
    """Where the limits are counted: Redis for gateways sharing a Redis state, the host's SQLite file for a
    gateway of several processes, else this process (None). Nothing is opened while no limit is set."""
    if not settings.limits:
        return None
    if is_redis(settings.state_url):
        assert settings.state_url is not None
        return RedisCounters(*redis_location(settings.state_url))
    if settings.workers > 1:
        return SqliteCounters(settings.data_dir / "limits.sqlite")
    return None


def autoscale_policy(settings: Settings, model: str) -> AutoscalePolicy | None:
    """The ``autoscale:`` of fleet model ``model`` as the decision's policy (None: it has none)."""
    a = settings.autoscale_of(model)
    if a is None:
        return None
    return AutoscalePolicy(
        min_replicas=a.min_replicas,
        max_replicas=a.max_replicas,
        target_waiting=a.target_waiting,
        target_kv_cache=a.target_kv_cache,
        ttft_p90_ms=a.ttft_p90_ms,
        target_in_flight=a.target_in_flight,
        scale_out_after_s=a.scale_out_after_s,
        scale_in_after_s=a.scale_in_after_s,
        tolerance=a.tolerance,
        panic_ratio=a.panic_ratio,
    )


def places_of_others(controls: Mapping[str, ControlPlane], model: str) -> set[str]:
    """The CPU sets and GPU sets the engines of the fleet's other models use (a new replica goes elsewhere)."""
    return {
        place
        for name, plane in controls.items()
        if name != model
        for r in plane.state.replicas
        for place in (r.cpu_bind, r.devices)
        if place
    }


def scale_metrics(metrics: GatewayMetrics, model: str, status: dict[str, Any], change: str | None) -> None:
    metrics.observe_scale(model, status)
    if change is not None:
        metrics.autoscale_changes.labels(model, change).inc()


def create_app(
    settings: Settings,
    upstreams: Sequence[Replica],
    *,
    client: httpx.AsyncClient | None = None,
    launcher: Launcher | None = None,
    managed: Mapping[str, ReplicaHandle] | None = None,
    store: StateStore | None = None,
    primary_socket: str | None = None,
    models: Sequence[ServedModel] | None = None,
) -> FastAPI:
    """Build the gateway.

    >>> app = create_app(load_settings(api_keys="sk-1"), [Replica("http://127.0.0.1:8001")])  # doctest: +SKIP
    >>> uvicorn.run(app, port=8080)                                                          # doctest: +SKIP

    ``client`` is the HTTP client used to reach the replicas (inject ``httpx.MockTransport`` or an
    ``ASGITransport`` in tests); by default one is created and closed with the app. ``launcher`` starts
    replicas for rollouts (default: only URLs of running servers are accepted); ``managed`` maps replica
    names to the processes behind them, which are restarted when they die. ``store`` holds the deployment
    state (default: in memory; ``shipyard serve`` passes the file or Redis store of ``settings.state_url``):
    when it already holds a state, that state says what is served and ``upstreams`` only seed an empty one.
    ``primary_socket``: this app is a serving worker of a gateway of several processes (see
    ``shipyard.gateway.workers``): it follows ``store``, never saves it, and forwards the admin API there.
    ``models``: a fleet, each model with its own replicas, launcher, engines and store (then ``launcher``,
    ``managed`` and ``store`` are not given, and ``upstreams`` join the first model's replicas).
    """
    if models is None:
        models = [ServedModel("", upstreams, launcher, managed, store)]
    elif launcher is not None or managed is not None or store is not None:
        raise ValueError("with models, each model gives its own launcher, engines and store")
    else:
        models = [dataclasses.replace(models[0], replicas=[*models[0].replicas, *upstreams]), *models[1:]]
    if len({m.name for m in models}) != len(models):
        raise ValueError("every model of the fleet needs its own name")
    keys = KeyChecker(settings.named_keys())
    if set(settings.admin_key_values()) & set(settings.key_values()):
        raise ValueError("admin keys must differ from API keys")
    limiter = KeyLimiter(
        settings.limits_for,
        counters=limit_counters(settings),
        fallback=settings.limits_fallback,
        prioritized=settings.prioritized(),
    )
    labels = load_labels(settings.intent_labels_file)
    templates = load_templates(settings.reply_templates_file)
    configured = {m.name: m.routing for m in settings.models}
    pool = Fleet(
        {
            m.name: ReplicaPool(
                m.replicas,
                routing=routing_policy(
                    m.routing or configured.get(m.name) or settings.routing,
                    settings.routing_balance_abs,
                    settings.routing_balance_rel,
                    settings.routing_opening_slack,
                ),
            )
            for m in models
        }
    )
    for m in models:
        pool.pool_of(m.name).admission = admission_policy(settings.admission_of(m.name))
    metrics = GatewayMetrics()
    metrics.add_collector(PoolCollector(pool))
    own_client = client is None
    http = client or upstream_client(settings)
    stores = {m.name: m.store or MemoryStateStore() for m in models}
    store = stores[models[0].name]
    proxy = Proxy(
        pool,
        http,
        metrics,
        max_body_bytes=settings.max_body_bytes,
        max_tokens_limit=settings.max_tokens_limit,
        retry_after_s=settings.retry_after_s,
        limiter=limiter,
        max_sequences=settings.max_sequences_per_request,
        body_timeout_s=settings.body_timeout_s,
        write_timeout_s=settings.write_timeout_s,
        responses=store,
    )
    monitor = HealthMonitor(pool, http, interval_s=settings.health_interval_s, timeout_s=settings.health_timeout_s)
    discoveries = [
        UpstreamDiscovery(pool.pool_of(m.name), [parse_target(u) for u in targets], settings.discovery_interval_s)
        for n, m in enumerate(models)
        if (targets := [*m.discover, *(u for u in settings.upstreams if is_discovery(u) and n == 0)])
    ]
    from shipyard.evaluate.gate import IntentGate

    controls: dict[str, ControlPlane] = {}
    for model in models:
        for name in model.managed or {}:
            if not any(r.name == name for r in model.replicas):
                raise ValueError(f"managed replica {name!r} is not among the upstreams")
        controls[model.name] = ControlPlane(
            pool.pool_of(model.name),
            http,
            stores[model.name],
            model.launcher or UrlLauncher(),
            audit=AuditLog(settings.data_dir / "audit.jsonl", model=model.name),
            warm_up=TaskWarmUp(labels, templates),
            gate=IntentGate(settings.gate_dataset, labels),
            managed=model.managed,
            config=ControlConfig(
                drain_timeout_s=settings.drain_timeout_s,
                ready_timeout_s=settings.engine.startup_timeout_s,
                warmup_requests=settings.warmup_requests,
                restart_backoff_s=settings.restart_backoff_s,
                hung_restart_s=settings.hung_restart_s,
                watch_interval_s=settings.state_watch_interval_s,
                lease_ttl_s=settings.lease_ttl_s,
                lease_renew_deadline_s=settings.lease_renew_deadline_s,
                reload_timeout_s=settings.reload_timeout_s,
                gateway_id=settings.gateway_id or "",
                follower=primary_socket is not None,
                model=model.name,
                kind=model.kind,
                autoscale=autoscale_policy(settings, model.name),
                autoscale_interval_s=getattr(settings.autoscale_of(model.name), "interval_s", 1.0),
                autoscale_idle=getattr(settings.autoscale_of(model.name), "idle", "stop"),
                shutdown_grace_s=settings.shutdown_grace_s,
            ),
            on_pause=lambda seconds, strategy: metrics.rollout_pause.labels(strategy).observe(seconds),
            ttft_p90_ms=HistogramWindow(functools.partial(metrics.ttft_buckets, model.name)).p90_ms,
            busy_elsewhere=functools.partial(places_of_others, controls, model.name),
            on_scale=functools.partial(scale_metrics, metrics, model.name),
        )
    control = controls[models[0].name]
    for entry in settings.models:  # a model that may scale to zero: its requests wait for a cold start
        if entry.autoscale is not None and entry.autoscale.min_replicas == 0 and entry.name in controls:
            pool.pool_of(entry.name).cold_start_wait_s = entry.autoscale.cold_start_wait_s

    forwarding: list[httpx.AsyncClient] = []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for discovery in discoveries:
            await discovery.refresh()
        await monitor.check_all()
        for plane in controls.values():
            await plane.start()
        monitor.start()
        for discovery in discoveries:
            discovery.start()
        try:
            yield
        finally:
            for plane in controls.values():
                await plane.stop()
            for discovery in discoveries:
                await discovery.stop()
            await monitor.stop()
            if own_client:
                await http.aclose()
            await limiter.flush()
            await limiter.counters.close()
            for forwarder in forwarding:
                await forwarder.aclose()

    documents = primary_socket is None  # a serving worker forwards the documents to its primary
    app = FastAPI(
        title="shipyard gateway",
        version=__version__,
        lifespan=lifespan,
        openapi_url="/openapi.json" if documents else None,
        docs_url="/docs" if documents else None,
        redoc_url="/redoc" if documents else None,
    )
    hot: dict[str, Callable[[Request], Awaitable[Response]]] = {}
    app.add_middleware(HotRoutes, routes=hot)  # inside the limits: a hot route is named and admitted as any
    app.add_middleware(LimitMiddleware, keys=keys, limiter=limiter, metrics=metrics)
    app.state.pool = pool
    app.state.settings = settings
    app.state.limiter = limiter
    app.state.metrics = metrics
    app.state.monitor = monitor
    app.state.discoveries = discoveries
    app.state.control = control
    """The first model's control plane (the only one of a fleet of one)."""
    app.state.controls = controls
    install_error_handlers(app)

    def authorize(request: Request) -> None:
        keys.check(request.headers.get("authorization"), request.headers.get("x-api-key"))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    def host_of(model: str, name: str) -> str | None:
        """The host a replica's engine runs on, as its state records it (a cluster node's address)."""
        plane = controls.get(model)
        record = plane.state.replica(name) if plane is not None else None
        return (record.host or None) if record is not None else None

    @app.get("/ready")
    async def ready() -> JSONResponse:
        replicas = [
            {
                "name": r.name,
                "model": model,
                "host": host_of(model, r.name),
                "rotation": r.rotation or None,  # starting (warming up) or draining (scaled in): not routed to
                "deployment": r.deployment,
                "version": r.version,
                "ready": r.ready,
                "in_flight": r.in_flight,
                "models": sorted(r.models),
                "error": r.last_error or None,
            }
            for model, model_pool in pool.pools.items()
            for r in model_pool.replicas
        ]
        # a model scaled to zero counts as ready: its requests wait while its first replica starts
        is_ready = bool(pool.ready()) or any(p.cold_start_wait_s and not p.replicas for p in pool.pools.values())
        body: dict[str, Any] = {"status": "ready" if is_ready else "unavailable", "replicas": replicas}
        degraded = next((d for c in controls.values() if (d := getattr(c.store, "degraded", None))), None)
        if degraded:
            body["state"] = {"degraded": degraded}
        headers = None if is_ready else {"Retry-After": str(settings.retry_after_s)}
        return JSONResponse(body, status_code=200 if is_ready else 503, headers=headers)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.exposition()), media_type=CONTENT_TYPE_LATEST)

    def kind_of(name: str) -> str:
        return next((m.kind for m in models if name in pool.pool_of(m.name).models()), "generate")

    def model_card(name: str, max_len: int | None) -> dict[str, Any]:
        """OpenAI's fields, vLLM's ``max_model_len``, and ``kind``: ``generate`` (chat, completions) or ``embed``
        (embeddings, score, rerank), so a chat client can leave embedding models out of its picker."""
        card = {"id": name, "object": "model", "created": 0, "owned_by": "shipyard", "max_model_len": max_len}
        return card | {"kind": kind_of(name)}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        """The models the ready replicas serve (and aliases to them)."""
        authorize(request)
        models = pool.models()
        if not models and not pool.ready():
            raise proxy.unavailable("no replica is ready yet; retry shortly")
        return {"object": "list", "data": [model_card(name, max_len) for name, max_len in sorted(models.items())]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(
        request: Request,
        model_id: Annotated[str, Path(pattern=r"^[^\r\n]+$", description="A served model's id (may hold '/')")],
    ) -> dict[str, Any]:
        """One served model (``client.models.retrieve``); 404 in OpenAI's shape for a model not served here."""
        authorize(request)
        proxy.check_model(model_id, None)
        return model_card(model_id, pool.models()[model_id])

    def forward(route: ApiRoute) -> Any:
        async def endpoint(request: Request) -> Response:
            authorize(request)
            return await proxy.handle(request, route)

        return endpoint

    for route, summary in ROUTE_SUMMARIES.items():
        hot[route.path] = endpoint = forward(route)
        app.add_api_route(
            route.path, endpoint, methods=["POST"], summary=summary, name=route.name, response_class=Response
        )

    install_task_routes(
        app,
        proxy,
        authorize,
        labels,
        templates,
        IntentDecode(settings.intent.decode),
        intent_model=settings.intent.model,
        reply_model=settings.reply.model,
        hot=hot,
    )

    def resolve_target(target: str) -> tuple[str, str | None]:
        """A registered ``NAME[:VERSION]`` -> its folder and version; anything else as it is."""
        if target.startswith(("http://", "https://")) or "/" in target or PathLib(target).exists():
            return target, None
        folder, ref = resolve_input(target, settings.models_dir)
        return str(folder), ref.partition(":")[2] if ref else None

    if primary_socket is not None:
        admin_keys = KeyChecker(settings.named_admin_keys()) if settings.admin_keys else None
        forwarding.append(install_forwarding(app, primary_socket, proxy.read_body, admin_keys))
    elif settings.admin_keys:
        install_admin_routes(app, proxy, KeyChecker(settings.named_admin_keys()), controls, resolve_target)
    document_api(app)
    return app


__all__ = ["OpenAIError", "ServedModel", "create_app", "upstream_client"]
