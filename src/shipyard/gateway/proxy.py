"""The OpenAI passthrough: validate, pick a replica, forward, account. One instance per gateway."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from fastapi import Request
from starlette.responses import Response

from shipyard.control.store import MemoryStateStore, StateStore
from shipyard.gateway.ejection import ReplicaEjected, until_ejected
from shipyard.gateway.errors import OpenAIError
from shipyard.gateway.limits import (
    KeyLimiter,
    LimitExceeded,
    LimitsUnavailable,
    Reservation,
    caller,
    prompt_estimate,
    reservation,
)
from shipyard.gateway.metrics import GatewayMetrics
from shipyard.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    CountTokensRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    MessagesRequest,
    PoolingRequest,
    ResponsesRequest,
    TokenizeRequest,
    parse_json_object,
    reject_removed_fields,
    validate,
)
from shipyard.gateway.sse import StreamScan, find_response_id, usage_tokens
from shipyard.gateway.stream import UpstreamStream
from shipyard.gateway.transport import UpstreamTransport, aiohttp_timeout, read_whole
from shipyard.router import NoReplicaError, Replica, RouteRequest, UnknownModelError, route_request
from shipyard.router.admission import Overloaded, QueueTicket
from shipyard.router.fleet import Fleet
from shipyard.router.replica import InFlight, NoRoomError

_JSON = "application/json"


# Failures that mean the replica never answered (refused, closed, or half-open socket): safe to send elsewhere.
# AttributeError: httpcore/anyio read the peer name of a socket the dying server had already closed (seen here
# when an engine was SIGKILLed under load); it is the same event as a refused connection.
_NOTHING_ANSWERED = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
    AttributeError,
)


T = TypeVar("T")

_OPENAI_END = (b"data: [DONE]",)


@dataclass(frozen=True)
class ApiRoute:
    """One OpenAI/Anthropic/vLLM route the gateway forwards: its metrics name, the engine's path, the body schema,
    whether ``stream_options.include_usage`` can be asked for, and the events that end a whole stream."""

    name: str
    path: str
    schema: type[Any]
    usage_option: bool = False
    stream_end: tuple[bytes, ...] = _OPENAI_END
    scheduled: bool = False
    """The engine schedules it by the body's ``priority`` (vLLM's generation routes)."""


CHAT = ApiRoute("chat", "/v1/chat/completions", ChatCompletionRequest, usage_option=True, scheduled=True)
COMPLETIONS = ApiRoute("completions", "/v1/completions", CompletionRequest, usage_option=True, scheduled=True)
RESPONSES = ApiRoute(
    "responses",
    "/v1/responses",
    ResponsesRequest,
    stream_end=(b"response.completed", b"response.incomplete", b"response.failed"),
)
MESSAGES = ApiRoute("messages", "/v1/messages", MessagesRequest, stream_end=(b"message_stop",))
COUNT_TOKENS = ApiRoute("count_tokens", "/v1/messages/count_tokens", CountTokensRequest)
TOKENIZE = ApiRoute("tokenize", "/tokenize", TokenizeRequest)
DETOKENIZE = ApiRoute("detokenize", "/detokenize", DetokenizeRequest)
EMBEDDINGS = ApiRoute("embeddings", "/v1/embeddings", EmbeddingRequest)
POOLING = ApiRoute("pooling", "/pooling", PoolingRequest)
SCORE = ApiRoute("score", "/score", PoolingRequest)
RERANK = ApiRoute("rerank", "/rerank", PoolingRequest)
API_ROUTES = {
    route.name: route
    for route in (
        CHAT,
        COMPLETIONS,
        RESPONSES,
        MESSAGES,
        COUNT_TOKENS,
        TOKENIZE,
        DETOKENIZE,
        EMBEDDINGS,
        POOLING,
        SCORE,
        RERANK,
    )
}

RESPONSE_TTL_S = 24 * 3600.0
"""How long the replica of a response id is remembered (for ``previous_response_id``)."""
SHED_RETRY_AFTER_S = 1
"""``Retry-After`` of a request refused because its model is at capacity (the overload may pass in a second)."""
STORE_WAIT_S = 5.0
"""Longest a request waits on the state store for a response id's replica (then the engine decides)."""


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


@dataclass
class Outcome:
    model: str = "-"
    status: int = 500
    replica: Replica | None = None


@dataclass
class Attempt:
    """One client request as sent upstream, and the replicas already tried for it."""

    model: str
    path: str
    body: bytes
    upstream_model: str
    routing: RouteRequest = field(default_factory=RouteRequest)
    """What the routing policy looks at (``router.route_request``): session, the prefix the request shares with
    its conversation's other turns (the replica holding it in its KV cache), whether it is a first turn."""
    tried: set[str] = field(default_factory=set)
    pinned: str | None = None
    """The replica this request must go to (the one holding its ``previous_response_id``)."""
    ticket: InFlight | None = None
    """The in-flight count of the replica it was last sent to (released once, by whichever path ends it)."""
    reconnected: set[str] = field(default_factory=set)
    """Replicas this request was sent to again on a fresh connection after one closed under it."""
    queued: QueueTicket | None = None
    """Its place in the model's admission queue, once it had to wait for a replica with room."""
    admitted: bool = False

    def release(self) -> None:
        if self.ticket is not None:
            self.ticket.release()


def served_by(replica: Replica) -> dict[str, str]:
    return {
        "x-shipyard-deployment": replica.deployment,
        "x-shipyard-version": replica.version,
        "x-shipyard-replica": replica.name,
    }


WATCH_AFTER_S = 0.2
"""A request still waiting for its engine after this long gets a watcher of its client's connection."""


def _version_labels(replica: Replica | None) -> tuple[str, str]:
    """The (deployment, version) metric labels of the replica that served a request."""
    if replica is None:
        return "-", "-"
    return replica.deployment, replica.version or "-"


class Proxy:
    def __init__(
        self,
        pool: Fleet,
        client: httpx.AsyncClient,
        metrics: GatewayMetrics,
        *,
        max_body_bytes: int,
        max_tokens_limit: int | None,
        retry_after_s: int,
        upstream_headers: dict[str, str] | None = None,
        limiter: KeyLimiter | None = None,
        hold_timeout_s: float = 300.0,
        max_sequences: int = 256,
        body_timeout_s: float = 30.0,
        write_timeout_s: float = 30.0,
        responses: StateStore | None = None,
    ) -> None:
        self.body_timeout_s = body_timeout_s
        self.write_timeout_s = write_timeout_s
        self.pool = pool
        self.max_sequences = max_sequences
        """Most sequences (prompts x n) one request may ask for (vLLM takes up to 1,024 prompts x 16)."""
        self.hold_timeout_s = hold_timeout_s
        """Longest a request waits for a replica whose weights are being replaced (then 503)."""
        self.limiter = limiter
        self.responses = responses or MemoryStateStore()
        """Where response id -> (replica, key name) is kept: the state store every gateway shares."""
        self._background: set[asyncio.Task[None]] = set()
        self.client = client
        self.metrics = metrics
        self._children: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}
        """Metric children of each (route, model, status, deployment, version): looked up once."""
        self.max_body_bytes = max_body_bytes
        self.max_tokens_limit = max_tokens_limit
        self.retry_after_s = retry_after_s
        self.upstream_headers = {"content-type": _JSON, **(upstream_headers or {})}
        # The transport the gateway made for its own client (``upstream_client``): requests skip httpx's
        # client layers. Any other client (a test's) is used as a client.
        transport = getattr(client, "_transport", None)
        self._transport = transport if isinstance(transport, UpstreamTransport) else None
        if self._transport is not None:
            self.upstream_headers = {**{k: v for k, v in client.headers.items() if k == "authorization"},
                                     **self.upstream_headers}  # fmt: skip
        self._timeout = aiohttp_timeout(client.timeout)

    async def read_body(self, request: Request) -> bytes:
        """The request's body: refused (413) before reading when it says it is too large, cut off when it turns
        out to be, and 408 when it does not arrive within ``body_timeout_s``."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        chunks: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise self._too_large()
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.body_timeout_s)
        except asyncio.TimeoutError:
            raise OpenAIError(
                408, f"the request body did not arrive within {self.body_timeout_s:g} s", code="request_timeout"
            ) from None
        return b"".join(chunks)

    def _too_large(self) -> OpenAIError:
        return OpenAIError(
            413, f"request body is larger than the {self.max_body_bytes} byte limit", code="request_too_large"
        )

    def unavailable(self, why: str) -> OpenAIError:
        return OpenAIError(503, why, code="no_replica_ready", headers={"Retry-After": str(self.retry_after_s)})

    async def woken(self, model: str) -> None:
        """A model scaled to zero: wait (up to its ``cold_start_wait_s``) while its scaler starts a replica,
        counted in the load the scaler sees; past the bound a 503 with ``Retry-After``."""
        pool = self.pool.pools.get(model)
        if pool is None or not pool.cold_start_wait_s or model in pool.models():
            return
        pool.waiting_for_replicas += 1
        try:
            deadline = time.monotonic() + pool.cold_start_wait_s
            while model not in pool.models():
                if time.monotonic() > deadline:
                    raise OpenAIError(
                        503,
                        f"'{model}' is scaled to zero and its first replica did not start within "
                        f"{pool.cold_start_wait_s:g} s; retry shortly",
                        code="cold_start",
                        headers={"Retry-After": str(self.retry_after_s)},
                    )
                await asyncio.sleep(0.1)
        finally:
            pool.waiting_for_replicas -= 1

    def check_model(self, model: str, output_limit: int | None) -> None:
        models = self.pool.models()
        if model not in models:
            if not self.pool.knows_any_model() or any(model in r.models for r in self.pool.replicas):
                raise self.unavailable(f"no replica serving '{model}' is ready; retry shortly")
            available = ", ".join(sorted(models)) or "none"
            raise OpenAIError(
                404,
                f"model '{model}' is not served here; available: {available}",
                param="model",
                code="model_not_found",
            )
        limit = self.max_tokens_limit or models[model]
        if limit is not None and output_limit is not None and output_limit > limit:
            raise OpenAIError(
                400,
                f"max_tokens={output_limit} is more than this model allows ({limit}); ask for fewer",
                param="max_tokens",
                code="max_tokens_too_large",
            )

    async def handle(self, request: Request, route: ApiRoute) -> Response:
        started = time.perf_counter()
        self.metrics.in_flight.labels(route.name).inc()
        model_label = "-"
        status = 500
        streaming = False
        served: Replica | None = None
        try:
            body = await self.read_body(request)
            data = parse_json_object(body)
            reject_removed_fields(data)
            parsed = validate(route.schema, data)
            if parsed.model is None:  # tokenize/detokenize may leave it out: the only model served
                data["model"] = parsed.model = self.resolve_model(None)
                body = json.dumps(data).encode()
            await self.woken(parsed.model)
            self.check_model(parsed.model, parsed.output_limit())
            model_label = parsed.model
            stream = bool(getattr(parsed, "stream", False))
            reserved = await self._reserve(parsed, body)
            drop_usage = False
            upstream_model = self.pool.upstream_model(parsed.model)
            if upstream_model != parsed.model:
                data["model"] = upstream_model
            asked_options = getattr(parsed, "stream_options", None) or {}
            options = dict(asked_options)
            if route.usage_option and stream and not options.get("include_usage"):
                options["include_usage"] = drop_usage = True
            if route.usage_option and stream and reserved is not None and not options.get("continuous_usage_stats"):
                options["continuous_usage_stats"] = True  # a stream cut short is charged what it had used
            if options != asked_options:
                data["stream_options"] = options
            priority = self._priority(route)
            if priority is not None:
                data["priority"] = priority  # the key's, never the client's own: no key jumps the queue
            if options != asked_options or upstream_model != parsed.model or priority is not None:
                body = json.dumps(data).encode()
            session = request.headers.get("x-session-id") or (
                data.get("user") if isinstance(data.get("user"), str) else None
            )
            attempt = Attempt(parsed.model, route.path, body, upstream_model, route_request(data, session))
            if route is RESPONSES and parsed.previous_response_id:
                attempt.pinned = await self._replica_of_response(parsed.previous_response_id)
            replica, upstream = await self._until_disconnect(request, self._send(attempt))
            served = replica
            if stream and upstream.status_code == 200:
                streaming = True
                status = 200
                return self._stream(route, model_label, attempt, replica, upstream, drop_usage, started)
            content = await self._until_disconnect(request, self._read_all(replica, upstream, attempt))
            status = upstream.status_code
            if status == 200:
                self._count_usage(model_label, content)
                if route is RESPONSES and (response_id := find_response_id(content[:4096])):
                    await self._remember_response(response_id, replica, caller.get() or "")
            return Response(content, status_code=status, media_type=_JSON, headers=served_by(replica))
        except ClientGone:
            status = 499  # nobody to answer; the engine's request was aborted with the connection
            return Response(status_code=499)
        except OpenAIError as exc:
            status = exc.status
            raise
        finally:
            if not streaming:
                self._settle_unreported(0 if status >= 400 and status != 499 else None)
                self._finish(route.name, model_label, status, started, served)

    def _priority(self, route: ApiRoute) -> int | None:
        """The engine queue priority of the caller's key (lower first, as vLLM's), when any key has one."""
        name = caller.get()
        if not route.scheduled or self.limiter is None or name is None or not self.limiter.prioritized:
            return None
        return self.limiter.priority_of(name)

    async def _reserve(self, parsed: Any, body: bytes) -> Reservation | None:
        """Charge the caller's tokens per minute with what this request may use, before it reaches an engine."""
        sequences = parsed.sequences()
        if sequences > self.max_sequences:
            raise OpenAIError(
                400,
                f"this request asks for {sequences} sequences (prompts x n); at most {self.max_sequences} per request",
                param="n",
                code="too_many_sequences",
            )
        name = caller.get()
        if self.limiter is None or name is None:
            return None
        per_sequence = parsed.output_limit() or self.max_tokens_limit or self.pool.models().get(parsed.model) or 0
        try:
            prompt = prompt_estimate(body)
            reserved = await self.limiter.reserve(name, prompt + sequences * per_sequence, prompt)
        except LimitExceeded as exc:
            headers = {"Retry-After": str(exc.retry_after_s), **exc.headers}
            raise OpenAIError(429, str(exc), code="rate_limit_exceeded", headers=headers) from None
        except LimitsUnavailable as exc:
            raise OpenAIError(503, str(exc), code="limits_unavailable", headers={"Retry-After": "5"}) from None
        reservation.set(reserved)
        return reserved

    @staticmethod
    def _settle_unreported(used: int | None) -> None:
        """An answer that reported no usage: charge ``used`` (None: the prompt, which the engine may have read)."""
        reserved = reservation.get()
        if reserved is not None:  # settle() keeps the first settlement
            reserved.settle(used if used is not None else reserved.prompt_estimate)

    async def _replica_of_response(self, response_id: str) -> str | None:
        """The replica holding ``response_id``, as any gateway sharing the state store noted it; None when none
        saw it (the engine decides). Made with another key: not found (a response is its key's alone). A replica
        that is gone or not ready is a 400: its stored state went with it or cannot be reached."""
        try:
            found = await asyncio.wait_for(self.responses.response_of(response_id), STORE_WAIT_S)
        except Exception:  # the store does not answer: let the engine decide
            found = None
        if found is None:
            return None
        name, key = found
        if key != (caller.get() or ""):
            raise OpenAIError(
                404,
                f"previous_response_id '{response_id}' not found",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        if not any(r.name == name and r.routable for r in self.pool.replicas):
            raise OpenAIError(
                400,
                f"previous_response_id '{response_id}' was answered by replica '{name}', which is not serving now; "
                "vLLM keeps a response's state in the replica that made it: send the conversation again without "
                "previous_response_id",
                param="previous_response_id",
                code="previous_response_unavailable",
            )
        return name

    async def _remember_response(self, response_id: str, replica: Replica, key: str) -> None:
        with contextlib.suppress(Exception):  # the store is down: the engine still holds it; routing may miss it
            await asyncio.wait_for(
                self.responses.remember_response(response_id, replica.name, key, RESPONSE_TTL_S), STORE_WAIT_S
            )

    def _remember_later(self, response_id: str, replica: Replica) -> None:
        task = asyncio.get_running_loop().create_task(self._remember_response(response_id, replica, caller.get() or ""))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
        """Await ``work`` unless the client disconnects first: then cancel it (closing the upstream connection
        makes vLLM abort the request) and raise ClientGone. Exceptions of ``work`` propagate unchanged.

        ``work`` runs in this task; a watcher task cancels it when the disconnect comes. The watcher starts only
        once ``work`` has taken :data:`WATCH_AFTER_S` (a timer, not a task, per short request: a task per request,
        made and cancelled, was a tenth of the gateway's CPU for one-token answers); a client gone sooner is seen
        then, having cost the engine at most that long."""
        current = asyncio.current_task()
        assert current is not None
        loop = asyncio.get_running_loop()
        gone = False
        watcher: asyncio.Task[None] | None = None

        async def disconnected() -> None:
            nonlocal gone
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone = True
            current.cancel()

        def watch() -> None:
            nonlocal watcher
            watcher = loop.create_task(disconnected())

        later = loop.call_later(WATCH_AFTER_S, watch)
        try:
            return await work
        except asyncio.CancelledError:
            # ours (the watcher's) unless someone else cancelled too (Python 3.11+ counts; 3.10 cannot tell)
            uncancel = getattr(current, "uncancel", None)
            if gone and (uncancel is None or uncancel() == 0):
                raise ClientGone() from None
            raise
        finally:
            later.cancel()
            if watcher is not None and not watcher.done():
                watcher.cancel()

    async def _read_all(self, replica: Replica, upstream: httpx.Response, attempt: Attempt) -> bytes:
        try:
            with until_ejected(replica) as watch:
                content = await read_whole(upstream)
            if watch.cancelled_caught:
                ejected = ReplicaEjected(replica)
                self._upstream_failed(replica, "hung", ejected)
                raise OpenAIError(502, f"upstream stopped answering: {ejected}", code="upstream_error")
            replica.last_byte_at = time.monotonic()
            return content
        except httpx.HTTPError as exc:
            self._upstream_failed(replica, "read", exc)
            raise self._upstream_error(exc, "upstream failed while answering") from None
        finally:
            await upstream.aclose()
            attempt.release()

    def resolve_model(self, model: str | None) -> str:
        """The model a task request runs on: the one it names, or the only one served."""
        if model is None:
            served = sorted(self.pool.models())
            if not served:
                raise self.unavailable("no replica is ready yet; retry shortly")
            if len(served) > 1:
                raise OpenAIError(
                    400,
                    f"several models are served ({', '.join(served)}); name one in 'model' (or set intent.model / "
                    "reply.model for the task endpoints)",
                    param="model",
                    code="model_required",
                )
            model = served[0]
        self.check_model(model, None)
        return model

    async def call_json(self, model: str, body: dict[str, Any]) -> tuple[Replica, dict[str, Any]]:
        """One non-streaming chat completion for a task endpoint; upstream errors become OpenAI errors."""
        upstream_model = self.pool.upstream_model(model)
        attempt = Attempt(
            model,
            "/v1/chat/completions",
            json.dumps({**body, "model": upstream_model}).encode(),
            upstream_model,
            route_request(body),
        )
        replica, upstream = await self._send(attempt)
        content = await self._read_all(replica, upstream, attempt)
        try:
            answer = json.loads(content)
        except ValueError:
            answer = None
        if upstream.status_code != 200 or not isinstance(answer, dict):
            detail = answer.get("error", {}).get("message") if isinstance(answer, dict) else None
            status = upstream.status_code if 400 <= upstream.status_code < 500 else 502
            raise OpenAIError(
                status, f"engine answered {upstream.status_code}: {detail or content[:200]!r}", code="upstream_error"
            )
        self._count_usage(model, content)
        return replica, answer

    @asynccontextmanager
    async def accounted(self, route: str) -> AsyncIterator[Outcome]:
        """Counts one task request in the metrics, whatever way it ends."""
        outcome = Outcome()
        started = time.perf_counter()
        self.metrics.in_flight.labels(route).inc()
        try:
            yield outcome
            outcome.status = 200
        except OpenAIError as exc:
            outcome.status = exc.status
            raise
        finally:
            self._finish(route, outcome.model, outcome.status, started, outcome.replica)

    async def _send(self, attempt: Attempt) -> tuple[Replica, httpx.Response]:
        """Send to a replica chosen by the pool; move on to another when one is down.

        Safe to resend: the connection was refused (nothing reached the engine), or the engine closed it
        without answering (it died, or its keep-alive timer closed the connection; vLLM aborts what it had not
        answered). Anything else is a 502.
        """
        while True:
            try:
                replica = self._pick(attempt)
            except NoRoomError:
                await self._wait_for_room(attempt)
                continue
            except (NoReplicaError, UnknownModelError):
                raise self.unavailable(f"no replica serving '{attempt.model}' is ready; retry shortly") from None
            if replica.hold is not None:  # its weights are being replaced: wait, then pick again
                try:
                    await asyncio.wait_for(replica.hold.wait(), timeout=self.hold_timeout_s)
                except asyncio.TimeoutError:
                    raise self.unavailable(f"'{attempt.model}' is being updated; retry shortly") from None
                continue
            attempt.ticket = self.pool.acquire(replica, attempt.upstream_model)
            try:
                with until_ejected(replica) as watch:
                    upstream = await self._post(replica.url + attempt.path, attempt.body)
                if not watch.cancelled_caught:
                    replica.last_byte_at = time.monotonic()
                    attempt.ticket.answered()
                    if attempt.ticket.pool.admission is not None and not attempt.admitted:
                        attempt.admitted = True
                        self.metrics.admitted.labels(attempt.model).inc()
                    return replica, upstream
                # hung: it sent nothing for this request, so another replica may answer it
                attempt.release()
                self._upstream_failed(replica, "hung", ReplicaEjected(replica))
                attempt.tried.add(replica.name)
                self.metrics.retries.labels("hung").inc()
            except _NOTHING_ANSWERED as exc:
                attempt.release()
                kind = "connect" if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)) else "died"
                if kind == "died" and replica.name not in attempt.reconnected:
                    # Closed without an answer: a kept-alive connection the engine's idle timer closed as the
                    # request went out (seen under load on an H100, 2026-12-06), or an engine dying. Once more on
                    # a fresh connection tells which: a dead engine refuses it and is taken out then, a live one
                    # answers and stays in rotation (taking the only replica out was a 503 for everyone).
                    attempt.reconnected.add(replica.name)
                    self.metrics.retries.labels("reconnect").inc()
                    continue
                self._upstream_failed(replica, kind, exc)
                self.pool.mark_unready(replica, f"{kind}: {type(exc).__name__}: {exc}")
                attempt.tried.add(replica.name)
                self.metrics.retries.labels(kind).inc()
            except httpx.HTTPError as exc:
                attempt.release()
                self._upstream_failed(replica, "request", exc)
                raise self._upstream_error(exc, "upstream failed") from None
            except BaseException:  # cancelled (the client went away while the engine worked): not in flight
                attempt.release()
                raise

    async def _wait_for_room(self, attempt: Attempt) -> None:
        """Every replica of the model is at its admission limit: wait in the model's queue (by the key's
        priority) for a slot, or be refused at once (503, ``Retry-After``) when the queue is full or the wait
        passes its deadline."""
        pool = self.pool.serving(attempt.model)
        assert pool.admission is not None
        if attempt.queued is None:
            attempt.queued = QueueTicket(priority=self._queue_priority())
            self.metrics.queued.labels(attempt.model).inc()
        try:
            await pool.admission.queue.wait(attempt.queued)
        except Overloaded as exc:
            self.metrics.shed.labels(attempt.model, exc.reason).inc()
            self.metrics.queue_wait.labels(attempt.model).observe(attempt.queued.waited_s)
            raise OpenAIError(
                503,
                f"'{attempt.model}' is at capacity: {exc}; retry shortly",
                code="overloaded",
                headers={"Retry-After": str(SHED_RETRY_AFTER_S)},
            ) from None
        self.metrics.queue_wait.labels(attempt.model).observe(attempt.queued.waited_s)

    def _queue_priority(self) -> int:
        """The caller's key's priority in the admission queue (lower first, as vLLM's; 0 without one)."""
        name = caller.get()
        if self.limiter is None or name is None or not self.limiter.prioritized:
            return 0
        return self.limiter.priority_of(name)

    async def _post(self, url: str, body: bytes) -> httpx.Response:
        """Send one request upstream, its answer left to stream: through the gateway's own transport when the
        client has it (the short path), else as any httpx client sends."""
        if self._transport is not None:
            return await self._transport.post(url, body, self.upstream_headers, self._timeout)
        request = self.client.build_request("POST", url, content=body, headers=self.upstream_headers)
        return await self.client.send(request, stream=True)

    def _pick(self, attempt: Attempt) -> Replica:
        if attempt.pinned is not None:
            for replica in self.pool.replicas:
                pinned = replica.name == attempt.pinned and replica.name not in attempt.tried
                if pinned and replica.routable:
                    return replica
            raise NoReplicaError(attempt.model)
        replica, reason = self.pool.route(attempt.model, frozenset(attempt.tried), attempt.routing)
        self.metrics.route_decisions.labels(attempt.model, reason).inc()
        return replica

    async def _resend(self, attempt: Attempt, failed: Replica, why: str) -> tuple[Replica, httpx.Response] | None:
        """Another replica for a stream whose replica failed before it produced a single byte."""
        attempt.release()
        self.pool.mark_unready(failed, why)
        attempt.tried.add(failed.name)
        self.metrics.retries.labels("stream_not_started").inc()
        try:
            replica, upstream = await self._send(attempt)
        except OpenAIError:
            return None
        if upstream.status_code != 200:
            await self._read_all(replica, upstream, attempt)
            return None
        return replica, upstream

    def _stream(
        self,
        route: ApiRoute,
        model: str,
        attempt: Attempt,
        replica: Replica,
        upstream: httpx.Response,
        drop_usage: bool,
        started: float,
    ) -> UpstreamStream:
        def on_first_chunk(stream: UpstreamStream) -> None:
            assert stream.first_chunk_at is not None
            self.metrics.ttft.labels(route.name, model, *_version_labels(stream.replica)).observe(
                stream.first_chunk_at - started
            )

        def on_close(stream: UpstreamStream) -> None:
            attempt.release()
            if stream.scan.completion_tokens is not None or stream.scan.prompt_tokens is not None:
                self._count_tokens(model, stream.scan.prompt_tokens or 0, stream.scan.completion_tokens or 0)
            self._settle_unreported(None)
            if stream.scan.response_id is not None:
                self._remember_later(stream.scan.response_id, stream.replica)
            status = 200
            if stream.client_gone:
                status = 499
            elif stream.error is not None:
                status = 502
                self.metrics.upstream_errors.labels(stream.replica.name, "stream").inc()
            self._finish(route.name, model, status, started, stream.replica)

        async def resend(failed: Replica, why: str) -> tuple[Replica, httpx.Response] | None:
            return await self._resend(attempt, failed, why)

        headers = {**served_by(replica), "cache-control": "no-cache", "x-accel-buffering": "no"}
        scan = StreamScan(drop_usage=drop_usage, end_markers=route.stream_end, find_response_id=route is RESPONSES)
        return UpstreamStream(replica, upstream, scan, headers, on_close, resend, self.write_timeout_s, on_first_chunk)

    def _finish(self, route: str, model: str, status: int, started: float, replica: Replica | None) -> None:
        key = (route, model, status, *_version_labels(replica))
        children = self._children.get(key)
        if children is None:  # prometheus_client's labels() locks and builds its key on every call
            in_flight = self.metrics.in_flight.labels(route)
            requests = self.metrics.requests.labels(route, model, str(status), *key[3:])
            latency = self.metrics.latency.labels(route, model, *key[3:])
            children = self._children[key] = (in_flight, requests, latency)
        children[0].dec()
        children[1].inc()
        children[2].observe(time.perf_counter() - started)

    def _count_usage(self, model: str, content: bytes) -> None:
        try:
            usage: Any = json.loads(content).get("usage") or {}
        except (ValueError, AttributeError):
            return
        if isinstance(usage, dict):
            self._count_tokens(model, *usage_tokens(usage))

    def _count_tokens(self, model: str, prompt: int, output: int) -> None:
        """Tokens of one answer: per model, per key name, and against the key's tokens-per-minute limit."""
        self.metrics.output_tokens.labels(model).inc(output)
        self.metrics.prompt_tokens.labels(model).inc(prompt)
        name = caller.get()
        if name is not None:
            self.metrics.key_prompt_tokens.labels(name).inc(prompt)
            self.metrics.key_output_tokens.labels(name).inc(output)
            reserved = reservation.get()
            if reserved is not None and not reserved.settled:
                reserved.settle(prompt + output)
            elif self.limiter is not None:
                self.limiter.record_tokens(name, prompt + output)

    def _upstream_error(self, exc: httpx.HTTPError, what: str) -> OpenAIError:
        """502 for an engine that failed; 504, naming the limit and the way out, for one still generating when
        the gateway stopped waiting (the engine aborts the request when the gateway hangs up)."""
        if isinstance(exc, httpx.ReadTimeout):
            return OpenAIError(
                504,
                f"the engine did not finish this answer within the gateway's upstream read timeout "
                f'({self.client.timeout.read:g} s, setting upstream_read_timeout_s): stream it ("stream": true) '
                "or ask for fewer tokens (max_tokens)",
                code="upstream_timeout",
            )
        return OpenAIError(502, f"{what}: {type(exc).__name__}: {exc}", code="upstream_error")

    def _upstream_failed(self, replica: Replica, kind: str, exc: Exception) -> None:
        self.metrics.upstream_errors.labels(replica.name, kind).inc()
