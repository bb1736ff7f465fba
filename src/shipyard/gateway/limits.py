"""Per-key limits: requests per minute, tokens per minute and concurrent requests, each in a sliding window.

``KeyLimiter.admit`` decides over the key's counters in the last minute (``gateway.counters``: this process's,
the host's SQLite file, or Redis for every gateway); ``LimitMiddleware`` is the edge: it names the caller from
its key, admits (or answers 429 in OpenAI's shape with ``Retry-After``), sends OpenAI's ``x-ratelimit-*``
headers on every answer, and counts the request per key when its answer is complete. Tokens are admitted
*before* a request runs: the proxy reserves what it may cost (prompt + prompts × n × max_tokens, ``reserve``)
and settles the reservation with the usage the answer reports (``Reservation.settle``), also when the client
goes away.

>>> limiter = KeyLimiter(lambda name: KeyLimits(rpm=2))
>>> (await limiter.admit("team-a")).release(); (await limiter.admit("team-a")).release()   # doctest: +SKIP
>>> await limiter.admit("team-a")                                                            # doctest: +SKIP
Traceback (most recent call last):
    ...
shipyard.gateway.limits.LimitExceeded: key 'team-a' is over its limit of 2 requests per minute; retry in 60 s
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shipyard.gateway.auth import KeyChecker
from shipyard.gateway.counters import (
    LEASE_TTL_S,
    RENEW_EVERY_S,
    WINDOW_S,
    Decision,
    LimitCounters,
    MemoryCounters,
    Window,
    new_id,
)
from shipyard.gateway.errors import error_body
from shipyard.gateway.metrics import GatewayMetrics
from shipyard.settings import KeyLimits

log = logging.getLogger("shipyard.gateway")

caller: ContextVar[str | None] = ContextVar("shipyard_caller", default=None)
"""The name of the key the request being answered was sent with (set by ``LimitMiddleware``)."""


class LimitExceeded(Exception):
    def __init__(self, message: str, retry_after_s: int, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.headers = headers


class LimitsUnavailable(Exception):
    """The shared counters do not answer and ``limits_fallback`` is ``refuse``."""


class _BreakerOpen(Exception):
    """The shared counters failed less than ``breaker_s`` ago: not asked again yet."""


@dataclass
class Lease:
    """One admitted request; ``release`` when its answer is complete (idempotent)."""

    limiter: KeyLimiter | None = None
    name: str = ""
    id: str = ""
    counters: LimitCounters | None = None
    released: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    """OpenAI's ``x-ratelimit-*`` headers as they stood once this request was counted (sent on its answer)."""

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self.limiter is not None and self.counters is not None:
                self.limiter.running.pop(self.id, None)
                self.limiter.after(self.counters, self.name, self.id, release=True)


@dataclass
class Reservation:
    """Tokens a request may use, counted against its key's tokens per minute before it runs; ``settle`` puts
    what it really used in their place (once)."""

    reserved: int
    prompt_estimate: int = 0
    limiter: KeyLimiter | None = None
    name: str = ""
    id: str = ""
    counters: LimitCounters | None = None
    settled: bool = False

    def settle(self, used: int) -> None:
        if not self.settled:
            self.settled = True
            if self.limiter is not None and self.counters is not None:
                self.limiter.after(self.counters, self.name, self.id, tokens=max(0, used))


def prompt_estimate(body: bytes) -> int:
    """Prompt tokens a request body may hold, before any tokenizer saw it (about 4 bytes a token)."""
    return len(body) // 4 + 1


reservation: ContextVar[Reservation | None] = ContextVar("shipyard_reservation", default=None)
"""The token reservation of the request being answered (set by the proxy; settled from its usage)."""


def _reset(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``."""
    whole = max(0, math.ceil(seconds))
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


def _left(age_s: float | None) -> float:
    """Seconds until the oldest entry (``age_s`` old) leaves the window; the whole window when there is none."""
    return WINDOW_S - age_s if age_s is not None else WINDOW_S


class KeyLimiter:
    """Admits requests against their key's limits on ``counters`` (this process's by default; shared ones for a
    gateway of several processes or several gateways, see ``gateway.counters``). ``fallback``: what happens
    while shared counters do not answer — ``local`` (this process counts alone) or ``refuse`` (503); after a
    failure they are not asked again for ``breaker_s`` (a breaker: an outage costs one timeout, not one per
    request). Keys without ``rpm``, ``tpm`` or ``concurrent`` are never counted."""

    def __init__(
        self,
        limits_for: Callable[[str], KeyLimits],
        clock: Callable[[], float] = time.monotonic,
        counters: LimitCounters | None = None,
        fallback: str = "local",
        prioritized: bool = False,
        breaker_s: float = 5.0,
    ) -> None:
        self.limits_for = limits_for
        self.prioritized = prioritized
        """Some key has a ``priority``: every generation request is sent with its key's (0 for keys without)."""
        self.local = MemoryCounters(clock)
        self.counters = counters or self.local
        self.fallback = fallback
        self.shared_error = ""
        """Why the shared counters were last left for this process's (empty while they answer)."""
        self._limits: dict[str, KeyLimits] = {}
        """Each key's limits, looked up once (a lookup builds settings objects: a quarter of the gateway's CPU
        per request when it ran on every request)."""
        self._pending: set[asyncio.Task[None]] = set()
        self.running: dict[str, Lease] = {}
        """The leases on shared counters whose requests still run, by id: renewed every ``RENEW_EVERY_S`` so
        their in-flight entries outlive them only by the counters' short TTL."""
        self._renewing: asyncio.Task[None] | None = None
        self.breaker_s = breaker_s
        self._shared_down_until = 0.0

    def _limits_of(self, name: str) -> KeyLimits:
        return self._limits.get(name) or self._limits.setdefault(name, self.limits_for(name))

    def priority_of(self, name: str) -> int:
        return self._limits_of(name).priority or 0

    async def _decide(self, ask: Callable[[LimitCounters], Awaitable[Decision]]) -> tuple[Decision, LimitCounters]:
        if self.counters is self.local:
            return await ask(self.local), self.local
        try:
            if time.monotonic() < self._shared_down_until:
                raise _BreakerOpen
            decision = await ask(self.counters)
        except Exception as exc:  # unreachable, timed out, or not asked again yet
            if not isinstance(exc, _BreakerOpen):
                why = _why(exc)
                if why != self.shared_error:
                    log.warning("limit counters %s do not answer (%s); %s", self.counters.description, why,
                                self.fallback)  # fmt: skip
                self.shared_error = why
                self._shared_down_until = time.monotonic() + self.breaker_s
            why = self.shared_error
            if self.fallback == "refuse":
                raise LimitsUnavailable(f"the rate-limit counters cannot be reached ({why}); retry shortly") from None
            return await ask(self.local), self.local
        self.shared_error = ""
        return decision, self.counters

    async def admit(self, name: str) -> Lease:
        """Count one request of key ``name`` or raise LimitExceeded (nothing counted) when it is over a limit."""
        limits = self._limits_of(name)
        if limits.rpm is None and limits.tpm is None and limits.concurrent is None:
            return Lease()  # nothing to count (a key with a priority only)
        id = new_id()
        decision, counters = await self._decide(lambda c: c.admit(name, limits, id))
        headers = self._headers(limits, decision.window)
        window = decision.window
        if decision.refused_by == "concurrent":
            raise LimitExceeded(
                f"key '{name}' is over its limit of {limits.concurrent} concurrent requests; retry when one ends",
                1,
                headers,
            )
        if decision.refused_by == "rpm":
            wait = math.ceil(_left(window.oldest_request_s))
            raise LimitExceeded(
                f"key '{name}' is over its limit of {limits.rpm} requests per minute; retry in {wait} s", wait, headers
            )
        if decision.refused_by == "tpm":
            wait = math.ceil(_left(window.oldest_tokens_s))
            raise LimitExceeded(
                f"key '{name}' is over its limit of {limits.tpm} tokens per minute; retry in {wait} s", wait, headers
            )
        lease = Lease(self, name, id, counters, headers=headers)
        if counters is not self.local:
            self.running[id] = lease
            loop = asyncio.get_running_loop()
            if self._renewing is None or self._renewing.done() or self._renewing.get_loop() is not loop:
                self._renewing = loop.create_task(self._renew())
        return lease

    async def _renew(self) -> None:
        """Every ``RENEW_EVERY_S`` while requests on shared counters run: keep their in-flight entries."""
        while self.running:
            await asyncio.sleep(RENEW_EVERY_S)
            by_counters: dict[LimitCounters, dict[str, list[str]]] = {}
            for lease in list(self.running.values()):
                assert lease.counters is not None
                by_counters.setdefault(lease.counters, {}).setdefault(lease.name, []).append(lease.id)
            for counters, running in by_counters.items():
                try:
                    await counters.renew(running)
                except Exception as exc:  # the entries expire unless a later renewal gets through
                    log.warning("renewing %d requests in flight on %s failed: %s", len(self.running),
                                counters.description, _why(exc))  # fmt: skip

    async def reserve(self, name: str, tokens: int, prompt: int = 0) -> Reservation | None:
        """Count ``tokens`` (what a request may use at most; ``prompt`` of them its prompt) against key ``name``'s
        tokens per minute before it runs; LimitExceeded when they do not fit (nothing counted). None when the key
        has no ``tpm``."""
        limits = self._limits_of(name)
        if limits.tpm is None:
            return None
        id = new_id()
        decision, counters = await self._decide(lambda c: c.reserve(name, limits, id, tokens))
        window = decision.window
        if decision.refused_by == "tpm_request":
            raise LimitExceeded(
                f"this request may use up to {tokens} tokens (prompt + prompts x n x max_tokens), more than key "
                f"'{name}' may use in a minute ({limits.tpm}); ask for fewer max_tokens or a smaller n",
                int(WINDOW_S),
                self._headers(limits, window),
            )
        if decision.refused_by:
            wait = math.ceil(_left(window.oldest_tokens_s))
            raise LimitExceeded(
                f"key '{name}' has {max(0, limits.tpm - window.tokens)} of its {limits.tpm} tokens per minute "
                f"left and this request may use up to {tokens}; retry in {wait} s or ask for fewer max_tokens",
                wait,
                self._headers(limits, window),
            )
        return Reservation(tokens, min(tokens, prompt), self, name, id, counters)

    def record_tokens(self, name: str, tokens: int) -> None:
        """Charge an answer's tokens that no reservation covered (sent without waiting); nothing to count for a
        key without a tokens-per-minute limit."""
        if self._limits_of(name).tpm is None:
            return
        if tokens > 0 and self.counters is self.local:
            self.local.apply(name, new_id(), tokens=tokens, record=True)
        elif tokens > 0:
            self._later(self.counters.record(name, new_id(), tokens))

    def after(
        self, counters: LimitCounters, name: str, id: str, *, tokens: int | None = None, release: bool = False
    ) -> None:
        """A reservation's real usage, or the end of a request in flight (sent without waiting)."""
        if isinstance(counters, MemoryCounters):
            counters.apply(name, id, tokens=tokens, release=release)
        elif release:
            self._later(self._release(counters, name, id, tokens))
        else:
            self._later(counters.update(name, id, tokens=tokens))

    async def _release(self, counters: LimitCounters, name: str, id: str, tokens: int | None) -> None:
        """End a request's in-flight entry, again every ``RENEW_EVERY_S`` while the counters do not answer (its
        entry would expire by itself ``LEASE_TTL_S`` after its last renewal: no use trying past that)."""
        give_up = time.monotonic() + LEASE_TTL_S
        while True:
            try:
                await counters.update(name, id, tokens=tokens, release=True)
                return
            except Exception:
                if time.monotonic() + RENEW_EVERY_S > give_up:
                    raise
            await asyncio.sleep(RENEW_EVERY_S)

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): do it now
            asyncio.run(work)
            return
        task = loop.create_task(_quietly(work))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def flush(self) -> None:
        """Wait for the updates sent without waiting (tests; a stopping gateway)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        if self._renewing is not None and not self.running:
            self._renewing.cancel()

    @staticmethod
    def _headers(limits: KeyLimits, window: Window) -> dict[str, str]:
        headers: dict[str, str] = {}
        if limits.rpm is not None:
            headers["x-ratelimit-limit-requests"] = str(limits.rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, limits.rpm - window.requests))
            headers["x-ratelimit-reset-requests"] = _reset(_left(window.oldest_request_s))
        if limits.tpm is not None:
            headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, limits.tpm - window.tokens))
            headers["x-ratelimit-reset-tokens"] = _reset(_left(window.oldest_tokens_s))
        return headers


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


async def _quietly(work: Coroutine[Any, Any, None]) -> None:
    try:
        await work
    except Exception as exc:  # an update lost with the counters: the window forgets it within a minute
        log.warning("a rate-limit counter update was lost: %s: %s", type(exc).__name__, exc)


LIMITED_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/predict", "/pooling", "/score", "/rerank")
"""The API routes limits apply to (not health, readiness, metrics, the admin API or the OpenAPI document)."""


class LimitMiddleware:
    """Names the caller, admits it against its key's limits, counts its requests per key name."""

    def __init__(self, app: ASGIApp, keys: KeyChecker, limiter: KeyLimiter, metrics: GatewayMetrics) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(LIMITED_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        name = self.keys.name_of(headers.get("authorization"), headers.get("x-api-key"))
        if name is None:  # the route answers 401 itself
            await self.app(scope, receive, send)
            return
        try:
            lease = await self.limiter.admit(name)
        except LimitExceeded as exc:
            self.metrics.key_requests.labels(name, "429").inc()
            await _refuse(send, str(exc), {"Retry-After": str(exc.retry_after_s), **exc.headers})
            return
        except LimitsUnavailable as exc:
            self.metrics.key_requests.labels(name, "503").inc()
            await _refuse(send, str(exc), {"Retry-After": "5"}, status=503)
            return
        token = caller.set(name)
        status = "500"

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
                if lease.headers:  # as OpenAI does: on every answer, not only on a 429
                    sent = {k for k, _ in message.get("headers", [])}
                    extra = [(k.encode(), v.encode()) for k, v in lease.headers.items() if k.encode() not in sent]
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                lease.release()
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            lease.release()
            caller.reset(token)
            self.metrics.key_requests.labels(name, status).inc()


async def _refuse(send: Send, message: str, headers: dict[str, str], status: int = 429) -> None:
    code = "rate_limit_exceeded" if status == 429 else "limits_unavailable"
    body = json.dumps(error_body(status, message, code=code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
