"""A gateway of several processes on one port: the primary and its serving workers.

One Python process runs out of CPU long before one GPU does: every classification costs the gateway ~2 ms of
CPU (HTTP in and out, validation, routing, metrics), and the engine's batched steps hand back their answers
together, so the last one of a batch waits for all the others. ``workers`` = N spreads that over N processes,
as vLLM's ``--api-server-count`` does for its own API server:

- the **primary** is ``shipyard serve`` as ever (engines, the deployment state, rollouts, the admin API); it
  binds the port and a private Unix socket (``DATA_DIR/gateway.sock``) only it listens on;
- N - 1 **serving workers** accept connections on the same listening socket, follow the state from the store
  (file or Redis: replicas, weights, aliases, held replicas) within ``state_watch_interval_s``, report their
  requests in flight (so drains and in-place holds wait for theirs too), and forward the admin API, ``/docs`` and
  ``/openapi.json`` to the primary over its socket. They die with the primary (a crash leaves the engines to the
  next start, as before) and the primary starts again a worker that dies;
- metrics are counted in prometheus_client's multiprocess mode, so ``/metrics`` adds up every process.

>>> workers = Workers(settings, count=4)                          # doctest: +SKIP
>>> run_gateway(app, settings.host, settings.port, workers=workers)   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from prometheus_client import multiprocess
from starlette.responses import Response

from shipyard.engine.process import set_parent_death_signal
from shipyard.gateway.auth import KeyChecker
from shipyard.gateway.errors import OpenAIError
from shipyard.gateway.metrics import multiprocess_dir
from shipyard.settings import Settings

log = logging.getLogger("shipyard.gateway")

FORWARDED_PREFIXES = ("/admin/", "/docs", "/openapi.json", "/redoc")
"""What a serving worker hands to the primary: the admin API (rollouts run in the primary) and the API's
documentation (the primary's lists the admin routes)."""
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def admin_socket_path(settings: Settings) -> Path:
    return settings.data_dir / "gateway.sock"


@dataclass(frozen=True)
class WorkerSpec:
    """What a serving worker needs, pickled to the spawned process (its listening socket travels beside it)."""

    settings: Settings
    index: int
    primary_socket: str
    models: tuple[tuple[str, str], ...] = ()
    """(name, store scope) of each model of the primary's fleet (scope "": the store of a fleet of one)."""


def install_forwarding(
    app: FastAPI,
    primary_socket: str,
    read_body: Callable[[Request], Awaitable[bytes]],
    admin_keys: KeyChecker | None,
) -> httpx.AsyncClient:
    """Routes that hand a request to the primary over its Unix socket and pass its answer back unchanged;
    returns the client they use (the app closes it). Nothing is read before it is allowed: an admin route needs
    an admin key (404 when the gateway has none, as on the primary), and a body is read up to the size limit."""
    client = httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=primary_socket), base_url="http://primary", timeout=60.0
    )

    async def forward(request: Request) -> Response:
        if request.url.path.startswith("/admin/"):
            if admin_keys is None:
                raise OpenAIError(404, "Not Found: no such route (see /docs for the API)")
            admin_keys.check(request.headers.get("authorization"))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        try:
            answer = await client.request(
                request.method,
                request.url.path,
                params=request.query_params,
                headers=headers,
                content=await read_body(request),
            )
        except httpx.HTTPError as exc:
            raise OpenAIError(
                503,
                f"the gateway's primary process does not answer ({type(exc).__name__}); retry shortly",
                code="primary_unavailable",
                headers={"Retry-After": "1"},
            ) from None
        passed = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS}
        return Response(answer.content, status_code=answer.status_code, headers=passed)

    for prefix in FORWARDED_PREFIXES:
        path = f"{prefix}{{rest:path}}" if prefix.endswith("/") else prefix
        app.add_api_route(path, forward, methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False)
    return client


def serve_worker(spec: WorkerSpec, sock: socket.socket) -> None:  # pragma: no cover - runs in the worker process
    """The body of one serving worker process."""
    from shipyard.control.store import open_store
    from shipyard.gateway.app import ServedModel, create_app
    from shipyard.gateway.server import serve_on

    set_parent_death_signal()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s[w{spec.index}]: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # a file store is read, never locked
    settings = spec.settings
    models = [
        ServedModel(name, store=open_store(settings.state_url, settings.data_dir, settings.state_key_value(), scope))
        for name, scope in spec.models or (("", ""),)
    ]
    app = create_app(settings, [], models=models, primary_socket=spec.primary_socket)
    serve_on(app, [sock], log_level="warning")


class Workers:
    """The serving workers of one gateway: spawned once the primary serves, started again when one dies
    (after ``restart_after_s``), stopped with the primary."""

    def __init__(self, settings: Settings, count: int, restart_after_s: float = 1.0) -> None:
        if count < 2:
            raise ValueError("a gateway with workers has at least 2 processes")
        self.settings = settings
        self.count = count
        self.restart_after_s = restart_after_s
        self.primary_socket = str(admin_socket_path(settings))
        self.processes: dict[int, BaseProcess] = {}
        self._context = multiprocessing.get_context("spawn")
        self._public: socket.socket | None = None
        self._stopping = threading.Event()
        self._shutting_down: Callable[[], bool] = lambda: False
        self._watcher: threading.Thread | None = None
        self.models: tuple[tuple[str, str], ...] = ()
        """The fleet the workers serve, (name, store scope) per model: set once the primary built it."""

    def sockets(self, public: socket.socket) -> list[socket.socket]:
        """The primary's sockets: ``public`` (shared with the workers) and its private Unix socket."""
        self._public = public
        path = Path(self.primary_socket)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by a crashed primary; the one-gateway lock says no other primary runs
        private = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        private.bind(str(path))
        os.chmod(path, 0o600)
        return [public, private]

    def start(self, shutting_down: Callable[[], bool] = lambda: False) -> None:
        """Spawn the workers and watch them, from one thread that lives until :meth:`stop`: a worker's
        parent-death signal fires when the *thread* that started it ends. ``shutting_down``: the primary is
        stopping (a worker that exits then, e.g. on the terminal's Ctrl-C, is not started again)."""
        self._shutting_down = shutting_down
        started = threading.Event()
        self._watcher = threading.Thread(target=self._watch, args=(started,), name="shipyard-workers", daemon=True)
        self._watcher.start()
        started.wait(60)
        log.info("%d serving workers started beside the primary (pids %s)", self.count - 1, self.pids())

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes.values() if p.pid is not None]

    def _spawn(self, index: int) -> None:
        gateway_id = f"{self.settings.gateway_id or socket.gethostname()}-{os.getpid()}-w{index}"
        # a plain Settings (the loaded one is of a class made per config file, which does not pickle)
        settings = Settings.model_validate({**self.settings.model_dump(), "gateway_id": gateway_id})
        spec = WorkerSpec(settings, index, self.primary_socket, self.models)
        process = self._context.Process(
            target=serve_worker, args=(spec, self._public), name=f"shipyard-worker-{index}", daemon=False
        )
        process.start()
        self.processes[index] = process

    def _watch(self, started: threading.Event) -> None:
        for index in range(1, self.count):
            self._spawn(index)
        started.set()
        while not self._stopping.wait(0.5):
            for index, process in list(self.processes.items()):
                if process.is_alive() or self._stopping.is_set() or self._shutting_down():
                    continue
                self._forget(process)
                log.warning("serving worker %d (pid %s) exited with %s; starting it again", index, process.pid,
                            process.exitcode)  # fmt: skip
                if self._stopping.wait(self.restart_after_s):
                    return
                self._spawn(index)

    def _forget(self, process: BaseProcess) -> None:
        """Its live gauges (requests in flight) end with it in the added-up metrics."""
        folder = multiprocess_dir()
        if folder is not None and process.pid is not None:
            multiprocess.mark_process_dead(process.pid, folder)  # type: ignore[no-untyped-call]

    def stop(self, grace_s: float = 10.0) -> None:
        self._stopping.set()
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + grace_s
        for process in self.processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)
            self._forget(process)
        with contextlib.suppress(FileNotFoundError):
            Path(self.primary_socket).unlink()
