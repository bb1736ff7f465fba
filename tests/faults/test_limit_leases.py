"""Concurrency slots and token windows on Redis under stalls, killed gateways and large windows (issue 34 items 1,
4 and 5). A real ``redis-server``; the gateway side is ``KeyLimiter`` over ``RedisCounters``, in this process or in
a child process that is SIGKILLed.

Promises: a key's concurrency slot comes back within 10 s of its request ending while Redis stalled (the release is
lost) and of its gateway being killed mid-request, at every gateway, while a request that still runs keeps its slot
past the entry's TTL (renewed); a window with thousands of expiring charges is still evaluated (Lua's ``unpack``
took a few thousand values) and leaves no orphaned charge; keys without a limit never wait for Redis; an outage
costs one timeout, not one per request (a breaker); a burst of 300 decisions never fails for want of a pooled
connection.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shipyard.gateway.counters import LEASE_TTL_S, RedisCounters
from shipyard.gateway.limits import KeyLimiter, LimitExceeded, LimitsUnavailable
from shipyard.settings import KeyLimits
from shipyard.testing.services import RedisServer
from tests.faults.report import record
from tests.services import start_redis

TWO = KeyLimits(concurrent=2)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with start_redis(tmp_path_factory.mktemp("redis")) as running:
        yield running


def _limiter(url: str, prefix: str, limits: KeyLimits = TWO, **kwargs: object) -> KeyLimiter:
    return KeyLimiter(lambda name: limits, counters=RedisCounters(url, prefix), **kwargs)  # type: ignore[arg-type]


async def _seconds_until_admitted(limiter: KeyLimiter, since: float, within_s: float = 15.0) -> float:
    """Seconds from ``since`` until the key's two slots are both free again at ``limiter``'s gateway."""
    while time.monotonic() - since < within_s:
        try:
            leases = [await limiter.admit("team") for _ in range(2)]
        except LimitExceeded:
            await asyncio.sleep(0.25)
            continue
        for lease in leases:
            lease.release()
        return time.monotonic() - since
    return float("inf")


def test_slots_ended_during_a_redis_stall_come_back_within_10s_at_every_gateway(server: RedisServer) -> None:
    async def body() -> None:
        first, second = _limiter(server.url, "stall"), _limiter(server.url, "stall")
        leases = [await first.admit("team") for _ in range(2)]
        with pytest.raises(LimitExceeded, match="concurrent"):
            await second.admit("team")
        redis.Redis.from_url(server.url).execute_command("CLIENT", "PAUSE", 3000, "ALL")
        ended = time.monotonic()
        for lease in leases:  # both requests end while Redis stalls: the releases time out
            lease.release()
        await first.flush()
        waited = await _seconds_until_admitted(second, ended)
        assert waited < 10, f"the slots came back {waited:.1f} s after their requests ended"
        assert not first.running, "a released lease is still renewed"
        record(
            "Redis stalled 3 s (CLIENT PAUSE) while a `concurrent: 2` key's two requests end (releases lost)",
            "both slots free again at every gateway within 10 s",
            slots_free_after_s=round(waited, 2),
        )

    asyncio.run(body())


CHILD = """
import asyncio, sys
from shipyard.gateway.counters import RedisCounters
from shipyard.gateway.limits import KeyLimiter
from shipyard.settings import KeyLimits

async def main():
    limiter = KeyLimiter(lambda name: KeyLimits(concurrent=2), counters=RedisCounters(sys.argv[1], "killed"))
    leases = [await limiter.admit("team") for _ in range(2)]
    print("admitted", flush=True)
    await asyncio.sleep(120)  # two requests in flight, renewed until the process dies

asyncio.run(main())
"""


def test_a_killed_gateways_slots_come_back_within_10s_and_a_running_request_keeps_its_slot(
    server: RedisServer, tmp_path: Path
) -> None:
    script = tmp_path / "gateway.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), server.url], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "admitted"

        async def body() -> None:
            other = _limiter(server.url, "killed")
            await asyncio.sleep(LEASE_TTL_S + 2)  # past the entries' TTL: renewed while the requests run
            with pytest.raises(LimitExceeded, match="concurrent"):
                await other.admit("team")
            os.kill(child.pid, signal.SIGKILL)
            killed = time.monotonic()
            waited = await _seconds_until_admitted(other, killed)
            assert waited < 10, f"the killed gateway's slots came back after {waited:.1f} s"
            record(
                "a gateway SIGKILLed with a `concurrent: 2` key's two requests in flight",
                "its slots free again at the other gateways within 10 s; running requests keep theirs past the TTL",
                held_past_ttl_s=LEASE_TTL_S + 2,
                slots_free_after_kill_s=round(waited, 2),
            )

        asyncio.run(body())
    finally:
        child.kill()
        child.wait()


def test_a_window_of_ten_thousand_expiring_charges_is_evaluated_and_leaves_none_behind(server: RedisServer) -> None:
    counters = RedisCounters(server.url, "large")
    tokens_at, tokens, _ = counters._keys("team")[1:]
    sync = redis.Redis.from_url(server.url)
    old = (int(time.time()) - 300) * 1000  # five minutes ago: every one has left the 60 s window
    with sync.pipeline() as pipe:
        for first in range(0, 10_000, 1000):
            ids = [f"old-{i}" for i in range(first, first + 1000)]
            pipe.zadd(tokens_at, dict.fromkeys(ids, old))
            pipe.hset(tokens, mapping=dict.fromkeys(ids, 7))
        pipe.execute()

    async def body() -> None:
        decision = await counters.reserve("team", KeyLimits(tpm=100), "new", 50)
        assert decision.allowed and decision.window.tokens == 50, decision
        await counters.close()

    asyncio.run(body())
    assert sync.hlen(tokens) == 2 and sync.zcard(tokens_at) == 1  # the new charge (and the kept sum)


def test_keys_without_limits_never_wait_for_redis_and_an_outage_costs_one_timeout(tmp_path: Path) -> None:
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers: a stalled Redis
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"

    async def body() -> None:
        limits = {"free": KeyLimits(priority=5), "team": KeyLimits(rpm=100)}
        limiter = KeyLimiter(limits.__getitem__, counters=RedisCounters(url, timeout_s=0.5), fallback="refuse")
        started = time.monotonic()
        (await limiter.admit("free")).release()
        assert time.monotonic() - started < 0.1, "a key without limits waited for Redis"
        with pytest.raises(LimitsUnavailable):
            await limiter.admit("team")
        started = time.monotonic()
        for _ in range(20):
            with pytest.raises(LimitsUnavailable):
                await limiter.admit("team")
        assert time.monotonic() - started < 0.5, "every request waited for the stalled Redis"

    try:
        asyncio.run(body())
    finally:
        silent.close()


def test_a_burst_of_300_decisions_never_fails_for_want_of_a_connection(server: RedisServer) -> None:
    async def body() -> None:
        limiter = _limiter(server.url, "burst", KeyLimits(rpm=100_000), fallback="refuse")
        leases = await asyncio.gather(*(limiter.admit("team") for _ in range(300)))
        assert len(leases) == 300 and limiter.shared_error == ""
        for lease in leases:
            lease.release()
        await limiter.flush()

    asyncio.run(body())
