"""The gateway's app factory: OpenAI-compatible API in front of a pool of vLLM replicas."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path as PathLib
from typing import Annotated, Any

import httpx
from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from shipyard import __version__
from shipyard.control.audit import AuditLog
from shipyard.control.launcher import Launcher, ReplicaHandle, UrlLauncher
from shipyard.control.plane import ControlConfig, ControlPlane
from shipyard.control.store import MemoryStateStore, StateStore
from shipyard.gateway.admin import install_admin_routes
from shipyard.gateway.auth import KeyChecker
from shipyard.gateway.errors import OpenAIError, install_error_handlers
from shipyard.gateway.limits import KeyLimiter, LimitMiddleware
from shipyard.gateway.metrics import GatewayMetrics, PoolCollector
from shipyard.gateway.openapi import ROUTE_SUMMARIES, document_api
from shipyard.gateway.proxy import ApiRoute, Proxy
from shipyard.gateway.tasks import install_task_routes
from shipyard.gateway.transport import UpstreamTransport
from shipyard.gateway.workers import install_forwarding
from shipyard.prepare.registry import resolve_input
from shipyard.router import HealthMonitor, Replica, ReplicaPool
from shipyard.router.discovery import UpstreamDiscovery
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
    return httpx.AsyncClient(timeout=timeout, transport=UpstreamTransport(), headers=headers)


def create_app(
    settings: Settings,
    upstreams: Sequence[Replica],
    *,
    client: httpx.AsyncClient | None = None,
    launcher: Launcher | None = None,
    managed: Mapping[str, ReplicaHandle] | None = None,
    store: StateStore | None = None,
    primary_socket: str | None = None,
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
    """
    keys = KeyChecker(settings.named_keys())
    if set(settings.admin_key_values()) & set(settings.key_values()):
        raise ValueError("admin keys must differ from API keys")
    limiter = KeyLimiter(settings.limits_for)
    labels = load_labels(settings.intent_labels_file)
    templates = load_templates(settings.reply_templates_file)
    pool = ReplicaPool(upstreams)
    metrics = GatewayMetrics()
    metrics.add_collector(PoolCollector(pool))
    own_client = client is None
    http = client or upstream_client(settings)
    store = store or MemoryStateStore()
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
    discovery = UpstreamDiscovery(
        pool, [parse_target(u) for u in settings.upstreams if is_discovery(u)], settings.discovery_interval_s
    )
    from shipyard.evaluate.gate import IntentGate

    for name in managed or {}:
        if not any(r.name == name for r in upstreams):
            raise ValueError(f"managed replica {name!r} is not among the upstreams")
    control = ControlPlane(
        pool,
        http,
        store,
        launcher or UrlLauncher(),
        audit=AuditLog(settings.data_dir / "audit.jsonl"),
        warm_up=TaskWarmUp(labels, templates),
        gate=IntentGate(settings.gate_dataset, labels),
        managed=managed,
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
        ),
        on_pause=lambda seconds, strategy: metrics.rollout_pause.labels(strategy).observe(seconds),
    )

    forwarding: list[httpx.AsyncClient] = []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await discovery.refresh()
        await monitor.check_all()
        await control.start()
        monitor.start()
        discovery.start()
        try:
            yield
        finally:
            await control.stop()
            await discovery.stop()
            await monitor.stop()
            if own_client:
                await http.aclose()
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
    app.add_middleware(LimitMiddleware, keys=keys, limiter=limiter, metrics=metrics)
    app.state.pool = pool
    app.state.settings = settings
    app.state.limiter = limiter
    app.state.metrics = metrics
    app.state.monitor = monitor
    app.state.discovery = discovery
    app.state.control = control
    install_error_handlers(app)

    def authorize(request: Request) -> None:
        keys.check(request.headers.get("authorization"), request.headers.get("x-api-key"))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        replicas = [
            {
                "name": r.name,
                "deployment": r.deployment,
                "version": r.version,
                "ready": r.ready,
                "in_flight": r.in_flight,
                "models": sorted(r.models),
                "error": r.last_error or None,
            }
            for r in pool.replicas
        ]
        is_ready = bool(pool.ready())
        body: dict[str, Any] = {"status": "ready" if is_ready else "unavailable", "replicas": replicas}
        degraded = getattr(control.store, "degraded", None)
        if degraded:
            body["state"] = {"degraded": degraded}
        headers = None if is_ready else {"Retry-After": str(settings.retry_after_s)}
        return JSONResponse(body, status_code=200 if is_ready else 503, headers=headers)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.exposition()), media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str, max_len: int | None) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "shipyard", "max_model_len": max_len}

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
        app.add_api_route(
            route.path, forward(route), methods=["POST"], summary=summary, name=route.name, response_class=Response
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
        install_admin_routes(app, proxy, KeyChecker(settings.named_admin_keys()), control, resolve_target)
    document_api(app)
    return app


__all__ = ["OpenAIError", "create_app", "upstream_client"]
