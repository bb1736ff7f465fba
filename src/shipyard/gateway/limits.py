"""Per-key limits: requests per minute, tokens per minute and concurrent requests, each in a sliding window.

``KeyLimiter.admit`` is a pure decision over the key's recent history and an injected clock; ``LimitMiddleware``
is the edge: it names the caller from its key, admits (or answers 429 in OpenAI's shape with ``Retry-After`` and
OpenAI's ``x-ratelimit-*`` headers), and counts the request per key when its answer is complete. Tokens are
admitted *before* a request runs: the proxy reserves what it may cost (prompt + prompts × n × max_tokens,
``reserve``) and settles the reservation with the usage the answer reports (``Reservation.settle``), also when
the client goes away. Counters live in this gateway's memory.

>>> limiter = KeyLimiter(lambda name: KeyLimits(rpm=2))
>>> limiter.admit("team-a").release(); limiter.admit("team-a").release()
>>> limiter.admit("team-a")
Traceback (most recent call last):
    ...
shipyard.gateway.limits.LimitExceeded: key 'team-a' is over its limit of 2 requests per minute; retry in 60 s
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shipyard.gateway.auth import KeyChecker
from shipyard.gateway.errors import error_body
from shipyard.gateway.metrics import GatewayMetrics
from shipyard.settings import KeyLimits

WINDOW_S = 60.0

caller: ContextVar[str | None] = ContextVar("shipyard_caller", default=None)
"""The name of the key the request being answered was sent with (set by ``LimitMiddleware``)."""


class LimitExceeded(Exception):
    def __init__(self, message: str, retry_after_s: int, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.headers = headers


@dataclass
class _Usage:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[list[float]] = field(default_factory=deque)
    """[time, tokens] per answer (a reservation's count changes once, when it is settled)."""
    in_flight: int = 0

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.tokens.popleft()

    def tokens_used(self) -> int:
        return int(sum(n for _, n in self.tokens))


@dataclass
class Lease:
    """One admitted request; ``release`` when its answer is complete (idempotent)."""

    usage: _Usage
    released: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    """OpenAI's ``x-ratelimit-*`` headers as they stood once this request was counted (sent on its answer)."""

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.usage.in_flight -= 1


@dataclass
class Reservation:
    """Tokens a request may use, counted against its key's tokens per minute before it runs; ``settle`` puts
    what it really used in their place (once)."""

    entry: list[float]
    reserved: int
    prompt_estimate: int = 0
    settled: bool = False

    def settle(self, used: int) -> None:
        if not self.settled:
            self.settled = True
            self.entry[1] = max(0, used)


def prompt_estimate(body: bytes) -> int:
    """Prompt tokens a request body may hold, before any tokenizer saw it (about 4 bytes a token)."""
    return len(body) // 4 + 1


reservation: ContextVar[Reservation | None] = ContextVar("shipyard_reservation", default=None)
"""The token reservation of the request being answered (set by the proxy; settled from its usage)."""


def _reset(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``."""
    whole = max(0, math.ceil(seconds))
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


class KeyLimiter:
    def __init__(self, limits_for: Callable[[str], KeyLimits], clock: Callable[[], float] = time.monotonic) -> None:
        self.limits_for = limits_for
        self.clock = clock
        self._usage: dict[str, _Usage] = {}
        self._limits: dict[str, KeyLimits] = {}
        """Each key's limits, looked up once (a lookup builds settings objects: a quarter of the gateway's CPU
        per request when it ran on every request)."""

    def _limits_of(self, name: str) -> KeyLimits:
        return self._limits.get(name) or self._limits.setdefault(name, self.limits_for(name))

    def admit(self, name: str) -> Lease:
        """Count one request of key ``name`` or raise LimitExceeded (nothing counted) when it is over a limit."""
        limits = self._limits_of(name)
        usage = self._usage.setdefault(name, _Usage())
        now = self.clock()
        usage.expire(now)
        headers = self._headers(limits, usage, now)
        if limits.concurrent is not None and usage.in_flight >= limits.concurrent:
            raise LimitExceeded(
                f"key '{name}' is over its limit of {limits.concurrent} concurrent requests; retry when one ends",
                1,
                headers,
            )
        if limits.rpm is not None and len(usage.requests) >= limits.rpm:
            wait = math.ceil(usage.requests[0] + WINDOW_S - now)
            raise LimitExceeded(
                f"key '{name}' is over its limit of {limits.rpm} requests per minute; retry in {wait} s", wait, headers
            )
        if limits.tpm is not None and usage.tokens_used() >= limits.tpm:
            wait = math.ceil(usage.tokens[0][0] + WINDOW_S - now)
            raise LimitExceeded(
                f"key '{name}' is over its limit of {limits.tpm} tokens per minute; retry in {wait} s", wait, headers
            )
        usage.requests.append(now)
        usage.in_flight += 1
        return Lease(usage, headers=self._headers(limits, usage, now))

    def record_tokens(self, name: str, tokens: int) -> None:
        if tokens > 0:
            self._usage.setdefault(name, _Usage()).tokens.append([self.clock(), tokens])

    def reserve(self, name: str, tokens: int, prompt: int = 0) -> Reservation | None:
        """Count ``tokens`` (what a request may use at most; ``prompt`` of them its prompt) against key ``name``'s
        tokens per minute before it runs; LimitExceeded when they do not fit (nothing counted). None when the key
        has no ``tpm``."""
        limits = self._limits_of(name)
        if limits.tpm is None:
            return None
        usage = self._usage.setdefault(name, _Usage())
        now = self.clock()
        usage.expire(now)
        if tokens > limits.tpm:
            raise LimitExceeded(
                f"this request may use up to {tokens} tokens (prompt + prompts x n x max_tokens), more than key "
                f"'{name}' may use in a minute ({limits.tpm}); ask for fewer max_tokens or a smaller n",
                int(WINDOW_S),
                self._headers(limits, usage, now),
            )
        if usage.tokens_used() + tokens > limits.tpm:
            wait = math.ceil(usage.tokens[0][0] + WINDOW_S - now) if usage.tokens else int(WINDOW_S)
            raise LimitExceeded(
                f"key '{name}' has {max(0, limits.tpm - usage.tokens_used())} of its {limits.tpm} tokens per minute "
                f"left and this request may use up to {tokens}; retry in {wait} s or ask for fewer max_tokens",
                wait,
                self._headers(limits, usage, now),
            )
        entry = [now, float(tokens)]
        usage.tokens.append(entry)
        return Reservation(entry, tokens, prompt_estimate=min(tokens, prompt))

    @staticmethod
    def _headers(limits: KeyLimits, usage: _Usage, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        if limits.rpm is not None:
            oldest = usage.requests[0] if usage.requests else now
            headers["x-ratelimit-limit-requests"] = str(limits.rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, limits.rpm - len(usage.requests)))
            headers["x-ratelimit-reset-requests"] = _reset(oldest + WINDOW_S - now)
        if limits.tpm is not None:
            oldest = usage.tokens[0][0] if usage.tokens else now
            headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, limits.tpm - usage.tokens_used()))
            headers["x-ratelimit-reset-tokens"] = _reset(oldest + WINDOW_S - now)
        return headers


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
            lease = self.limiter.admit(name)
        except LimitExceeded as exc:
            self.metrics.key_requests.labels(name, "429").inc()
            await _refuse(send, str(exc), {"Retry-After": str(exc.retry_after_s), **exc.headers})
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


async def _refuse(send: Send, message: str, headers: dict[str, str]) -> None:
    body = json.dumps(error_body(429, message, code="rate_limit_exceeded")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": 429, "headers": raw})
    await send({"type": "http.response.body", "body": body})
