"""Where the per-key limit counters live: this process, every process of one host, or every gateway on Redis.

One counter set per key name, in a 60 s sliding window: the requests admitted, the tokens charged (a
reservation before the request runs, put right with the usage it had), the requests in flight. A decision
(``admit``, ``reserve``) is one atomic step on the shared counters — a Lua script on Redis, an ``IMMEDIATE``
transaction in SQLite — so N gateway processes admit exactly what one would; updates after the fact
(``settle``, ``release``, ``record``) are sent without the request waiting for them.

- :class:`MemoryCounters`: this process only (one gateway process, no Redis).
- :class:`SqliteCounters`: a file in ``data_dir`` every process of the host opens (``--workers N`` without Redis).
- :class:`RedisCounters`: the Redis of the shared state (several gateways); times are Redis's own clock, so
  gateways whose clocks differ still share one window. When Redis does not answer, the ``limits_fallback``
  setting decides: ``local`` (each process counts alone until Redis is back) or ``refuse`` (503).

>>> counters = MemoryCounters()
>>> asyncio.run(counters.admit("team-a", KeyLimits(rpm=1), "req-1")).allowed
True
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shipyard.control.store import redis_client
from shipyard.settings import KeyLimits

WINDOW_S = 60.0
LEASE_TTL_S = 6.0
"""How long a request's in-flight entry in shared counters lives unless its gateway renews it: a slot whose
release was lost (the counters stalled) or whose gateway died comes back within this long."""
RENEW_EVERY_S = 1.5
"""How often a gateway renews the in-flight entries of its requests that are still running (a renewal lost to a
stall of up to ``LEASE_TTL_S - 2 * RENEW_EVERY_S`` leaves the request counted)."""

log = logging.getLogger("shipyard.gateway")


@dataclass(frozen=True)
class Window:
    """A key's counters as one decision saw them: what is used, and since when (for the reset headers)."""

    requests: int = 0
    tokens: int = 0
    in_flight: int = 0
    oldest_request_s: float | None = None
    """Seconds since the oldest request still in the window (None: none is)."""
    oldest_tokens_s: float | None = None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    refused_by: str = ""
    """``concurrent``, ``rpm``, ``tpm`` or ``tpm_request`` (one request larger than the whole budget)."""
    window: Window = field(default_factory=Window)
    """The counters after the decision (with this request counted when it was allowed)."""


class LimitCounters(ABC):
    """The per-key counters behind ``KeyLimiter``; ``id`` names one request's entries."""

    description = "this process"

    @abstractmethod
    async def admit(self, name: str, limits: KeyLimits, id: str) -> Decision:
        """Count one request (and one in flight) unless a limit refuses it; nothing counted when refused."""

    @abstractmethod
    async def reserve(self, name: str, limits: KeyLimits, id: str, tokens: int) -> Decision:
        """Charge ``tokens`` against the key's tokens per minute unless they do not fit."""

    @abstractmethod
    async def update(self, name: str, id: str, *, tokens: int | None = None, release: bool = False) -> None:
        """Put a reservation's real usage in its place (``tokens``) and/or end the request's in-flight count."""

    @abstractmethod
    async def record(self, name: str, id: str, tokens: int) -> None:
        """Charge the tokens of an answer that had no reservation."""

    async def renew(self, running: dict[str, list[str]]) -> None:
        """Keep the in-flight entries of requests still running (key name -> ids) for another ``LEASE_TTL_S``
        (entries in this process need none: they end with it)."""
        return None

    async def close(self) -> None:
        return None


@dataclass
class _Usage:
    """One key's last minute in this process. Entries are kept in the order they were made (a monotonic clock),
    so expiring is popping from the front and the token total is kept as it changes: each decision costs the
    same at 1 request a minute or 1,000 a second (it was a scan of the whole minute)."""

    requests: deque[float] = field(default_factory=deque)
    tokens: dict[str, tuple[float, int]] = field(default_factory=dict)
    in_flight: set[str] = field(default_factory=set)
    token_sum: int = 0

    def expire(self, now: float) -> None:
        cutoff = now - WINDOW_S
        while self.requests and self.requests[0] <= cutoff:
            self.requests.popleft()
        while self.tokens:
            id, (at, n) = next(iter(self.tokens.items()))
            if at > cutoff:
                break
            del self.tokens[id]
            self.token_sum -= n

    def set_tokens(self, id: str, at: float, n: int) -> None:
        old = self.tokens.get(id)
        if old is not None:
            self.token_sum -= old[1]
            at = old[0]  # an update keeps its place (and its time) in the window
        self.tokens[id] = (at, n)
        self.token_sum += n

    def window(self, now: float) -> Window:
        oldest_tokens = next(iter(self.tokens.values()))[0] if self.tokens else None
        return Window(
            len(self.requests),
            self.token_sum,
            len(self.in_flight),
            now - self.requests[0] if self.requests else None,
            now - oldest_tokens if oldest_tokens is not None else None,
        )


def refusal(limits: KeyLimits, window: Window, tokens: int = 0) -> str:
    """Which limit refuses one more request (``tokens`` > 0: a reservation) with ``window`` used; "" for none."""
    if tokens:
        if limits.tpm is not None and tokens > limits.tpm:
            return "tpm_request"
        if limits.tpm is not None and window.tokens + tokens > limits.tpm:
            return "tpm"
        return ""
    if limits.concurrent is not None and window.in_flight >= limits.concurrent:
        return "concurrent"
    if limits.rpm is not None and window.requests >= limits.rpm:
        return "rpm"
    if limits.tpm is not None and window.tokens >= limits.tpm:
        return "tpm"
    return ""


class MemoryCounters(LimitCounters):
    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self._usage: dict[str, _Usage] = {}

    def _at(self, name: str) -> tuple[_Usage, float]:
        usage = self._usage.get(name)
        if usage is None:
            usage = self._usage[name] = _Usage()
        now = self.clock()
        usage.expire(now)
        return usage, now

    async def admit(self, name: str, limits: KeyLimits, id: str) -> Decision:
        usage, now = self._at(name)
        refused = refusal(limits, usage.window(now))
        if not refused:
            usage.requests.append(now)
            usage.in_flight.add(id)
        return Decision(not refused, refused, usage.window(now))

    async def reserve(self, name: str, limits: KeyLimits, id: str, tokens: int) -> Decision:
        usage, now = self._at(name)
        refused = refusal(limits, usage.window(now), tokens)
        if not refused:
            usage.set_tokens(id, now, tokens)
        return Decision(not refused, refused, usage.window(now))

    async def update(self, name: str, id: str, *, tokens: int | None = None, release: bool = False) -> None:
        self.apply(name, id, tokens=tokens, release=release)

    def apply(
        self, name: str, id: str, *, tokens: int | None = None, release: bool = False, record: bool = False
    ) -> None:
        """:meth:`update` (or :meth:`record`) at once, without an event loop turn."""
        usage, now = self._at(name)
        if record and tokens is not None:
            usage.set_tokens(id, now, tokens)
        elif tokens is not None and id in usage.tokens:
            usage.set_tokens(id, now, max(0, tokens))
        if release:
            usage.in_flight.discard(id)

    async def record(self, name: str, id: str, tokens: int) -> None:
        self.apply(name, id, tokens=tokens, record=True)


# --- one host: SQLite ---------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (name TEXT NOT NULL, id TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS requests_by_name ON requests (name, at);
CREATE TABLE IF NOT EXISTS tokens (name TEXT NOT NULL, id TEXT NOT NULL, at REAL NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (name, id));
CREATE TABLE IF NOT EXISTS in_flight (name TEXT NOT NULL, id TEXT NOT NULL, until REAL NOT NULL,
    PRIMARY KEY (name, id));
"""


class SqliteCounters(LimitCounters):
    """Counters in a SQLite file every gateway process of the host opens (WAL; one short write transaction per
    decision, ~0.1 ms). Wall-clock times: the processes of one host share its clock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.description = f"sqlite {path}"
        self.db = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=OFF")  # counters, not records: a power cut may forget a minute
        self.db.executescript(_SCHEMA)

    def _window(self, name: str, now: float) -> Window:
        db = self.db
        db.execute("DELETE FROM requests WHERE name = ? AND at <= ?", (name, now - WINDOW_S))
        db.execute("DELETE FROM tokens WHERE name = ? AND at <= ?", (name, now - WINDOW_S))
        db.execute("DELETE FROM in_flight WHERE name = ? AND until <= ?", (name, now))
        requests, oldest = db.execute("SELECT COUNT(*), MIN(at) FROM requests WHERE name = ?", (name,)).fetchone()
        tokens, oldest_tokens = db.execute("SELECT SUM(n), MIN(at) FROM tokens WHERE name = ?", (name,)).fetchone()
        (in_flight,) = db.execute("SELECT COUNT(*) FROM in_flight WHERE name = ?", (name,)).fetchone()
        return Window(
            requests,
            int(tokens or 0),
            in_flight,
            now - oldest if oldest is not None else None,
            now - oldest_tokens if oldest_tokens is not None else None,
        )

    def _decide(self, name: str, limits: KeyLimits, id: str, tokens: int) -> Decision:
        now = time.time()
        with _transaction(self.db):
            window = self._window(name, now)
            refused = refusal(limits, window, tokens)
            if not refused and tokens:
                self.db.execute("INSERT OR REPLACE INTO tokens VALUES (?, ?, ?, ?)", (name, id, now, tokens))
            elif not refused:
                self.db.execute("INSERT INTO requests VALUES (?, ?, ?)", (name, id, now))
                self.db.execute("INSERT OR REPLACE INTO in_flight VALUES (?, ?, ?)", (name, id, now + LEASE_TTL_S))
            return Decision(not refused, refused, self._window(name, now) if not refused else window)

    async def admit(self, name: str, limits: KeyLimits, id: str) -> Decision:
        return self._decide(name, limits, id, 0)

    async def reserve(self, name: str, limits: KeyLimits, id: str, tokens: int) -> Decision:
        return self._decide(name, limits, id, tokens)

    async def update(self, name: str, id: str, *, tokens: int | None = None, release: bool = False) -> None:
        with _transaction(self.db):
            if tokens is not None:
                self.db.execute("UPDATE tokens SET n = ? WHERE name = ? AND id = ?", (max(0, tokens), name, id))
            if release:
                self.db.execute("DELETE FROM in_flight WHERE name = ? AND id = ?", (name, id))

    async def record(self, name: str, id: str, tokens: int) -> None:
        with _transaction(self.db):
            self.db.execute("INSERT OR REPLACE INTO tokens VALUES (?, ?, ?, ?)", (name, id, time.time(), tokens))

    async def renew(self, running: dict[str, list[str]]) -> None:
        until = time.time() + LEASE_TTL_S
        with _transaction(self.db):
            self.db.executemany(
                "UPDATE in_flight SET until = ? WHERE name = ? AND id = ?",
                [(until, name, id) for name, ids in running.items() for id in ids],
            )

    async def close(self) -> None:
        self.db.close()


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Any:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


# --- every gateway: Redis ------------------------------------------------------------------------------------

_WINDOW_LUA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('HEXISTS', KEYS[3], '') == 0 and redis.call('HLEN', KEYS[3]) > 0 then  -- written before the sum was kept
  local sum = 0
  for _, n in ipairs(redis.call('HVALS', KEYS[3])) do sum = sum + tonumber(n) end
  redis.call('HSET', KEYS[3], '', sum)
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - window)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  for first = 1, #expired, 1000 do  -- unpack() takes a few thousand values at most
    local ids = {unpack(expired, first, math.min(first + 999, #expired))}
    local gone = 0
    for _, n in ipairs(redis.call('HMGET', KEYS[3], unpack(ids))) do gone = gone + (tonumber(n) or 0) end
    redis.call('HDEL', KEYS[3], unpack(ids))
    redis.call('HINCRBY', KEYS[3], '', -gone)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local function window_of()
  local used = tonumber(redis.call('HGET', KEYS[3], '') or '0')
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2] or -1
  local oldest_tokens = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')[2] or -1
  return {redis.call('ZCARD', KEYS[1]), math.max(used, 0), redis.call('ZCARD', KEYS[4]), now - tonumber(oldest),
          now - tonumber(oldest_tokens), tonumber(oldest) < 0 and 1 or 0, tonumber(oldest_tokens) < 0 and 1 or 0}
end
"""
"""The window of one key: requests (a sorted set by time), token charges (times in a sorted set, amounts in a
hash whose field ``""`` keeps their sum, so no decision re-adds the window), requests in flight (a sorted set by
the time their entry expires)."""

_ADMIT = (
    _WINDOW_LUA
    + """
local rpm, tpm, concurrent, id = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local w = window_of()
if concurrent >= 0 and w[3] >= concurrent then return {'concurrent', unpack(w)} end
if rpm >= 0 and w[1] >= rpm then return {'rpm', unpack(w)} end
if tpm >= 0 and w[2] >= tpm then return {'tpm', unpack(w)} end
redis.call('ZADD', KEYS[1], now, id)
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), id)
redis.call('PEXPIRE', KEYS[1], window)
redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[6]))
return {'', unpack(window_of())}
"""
)

_CHARGE_LUA = """
local function charge(id, tokens)
  redis.call('ZADD', KEYS[2], now, id)
  local before = tonumber(redis.call('HGET', KEYS[3], id) or '0')
  redis.call('HSET', KEYS[3], id, tokens)
  redis.call('HINCRBY', KEYS[3], '', tokens - before)
  for i = 2, 3 do redis.call('PEXPIRE', KEYS[i], window * 2) end
end
"""

_RESERVE = (
    _WINDOW_LUA
    + _CHARGE_LUA
    + """
local tpm, id, tokens = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local w = window_of()
if tokens > tpm then return {'tpm_request', unpack(w)} end
if w[2] + tokens > tpm then return {'tpm', unpack(w)} end
charge(id, tokens)
return {'', unpack(window_of())}
"""
)

_RECORD = (
    _WINDOW_LUA
    + _CHARGE_LUA
    + """
charge(ARGV[2], tonumber(ARGV[3]))
return 1
"""
)

_UPDATE = """
local before = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] ~= '' and before then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('HINCRBY', KEYS[1], '', tonumber(ARGV[2]) - tonumber(before))
end
if ARGV[3] == '1' then redis.call('ZREM', KEYS[2], ARGV[1]) end
return 1
"""

_RENEW = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i]) end
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""


class RedisCounters(LimitCounters):
    """Counters in Redis under ``PREFIX:limits:NAME:*``, shared by every gateway process on that Redis."""

    def __init__(self, url: str, prefix: str = "shipyard", timeout_s: float = 2.0) -> None:
        self.prefix = prefix
        self.description = f"redis (prefix {prefix}:limits)"
        self.redis = redis_client(url, timeout_s)
        self.timeout_s = timeout_s

    def _keys(self, name: str) -> list[str]:
        base = f"{self.prefix}:limits:{name}"
        return [f"{base}:requests", f"{base}:tokens_at", f"{base}:tokens", f"{base}:in_flight"]

    async def _run(self, script: str, keys: list[str], *args: str | int) -> Any:
        return await asyncio.wait_for(self.redis.eval(script, len(keys), *keys, *args), self.timeout_s)

    async def admit(self, name: str, limits: KeyLimits, id: str) -> Decision:
        answer = await self._run(
            _ADMIT,
            self._keys(name),
            int(WINDOW_S * 1000),
            _or_none(limits.rpm),
            _or_none(limits.tpm),
            _or_none(limits.concurrent),
            id,
            int(LEASE_TTL_S * 1000),
        )
        return _decision(answer)

    async def reserve(self, name: str, limits: KeyLimits, id: str, tokens: int) -> Decision:
        answer = await self._run(_RESERVE, self._keys(name), int(WINDOW_S * 1000), _or_none(limits.tpm), id, tokens)
        return _decision(answer)

    async def update(self, name: str, id: str, *, tokens: int | None = None, release: bool = False) -> None:
        keys = self._keys(name)
        await self._run(
            _UPDATE, [keys[2], keys[3]], id, "" if tokens is None else max(0, tokens), "1" if release else "0"
        )

    async def record(self, name: str, id: str, tokens: int) -> None:
        await self._run(_RECORD, self._keys(name), int(WINDOW_S * 1000), id, tokens)

    async def renew(self, running: dict[str, list[str]]) -> None:
        for name, ids in running.items():  # ZADD XX: an entry that expired or was released stays gone
            await self._run(_RENEW, [self._keys(name)[3]], int(LEASE_TTL_S * 1000), *ids)

    async def close(self) -> None:
        await self.redis.aclose()


def _or_none(value: int | None) -> int:
    return -1 if value is None else value


def _decision(answer: list[Any]) -> Decision:
    refused = answer[0].decode() if isinstance(answer[0], bytes) else str(answer[0])
    requests, tokens, in_flight, age, tokens_age, no_request, no_tokens = (int(x) for x in answer[1:8])
    window = Window(
        requests,
        tokens,
        in_flight,
        None if no_request else age / 1000,
        None if no_tokens else tokens_age / 1000,
    )
    return Decision(not refused, refused, window)


def new_id() -> str:
    return uuid.uuid4().hex
