"""One limit, whatever the number of gateway processes and gateways (issue 23): counters in Redis for gateways
sharing a state, in a SQLite file for the processes of one host, and what happens when Redis does not answer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from shipyard.engine import free_port
from shipyard.engine.process import wait_until_ready
from shipyard.gateway.counters import MemoryCounters, RedisCounters, SqliteCounters
from shipyard.gateway.limits import KeyLimiter, LimitExceeded, LimitsUnavailable
from shipyard.settings import KeyLimits
from tests.services import start_redis, tool

FAKE = [sys.executable, "-m", "shipyard.testing.fake_openai", "--token-rate", "2000"]


def test_two_gateways_of_two_processes_on_redis_admit_the_limit_once(tmp_path: Path, repo_root: Path) -> None:
    """The promise: `rpm: 60` admits 60 a minute across 2 gateways x 2 processes, and every answer (200 or
    429) carries OpenAI's x-ratelimit-* headers."""
    tool("redis-server", "apt-get install redis-server")
    done = subprocess.run(
        [sys.executable, str(repo_root / "benchmarks/shared_limits.py"), "--seconds", "10", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "limits.json").read_text())
    assert report["statuses"]["200"] == 60 and report["statuses"]["429"] > 0, report
    assert report["answers_without_ratelimit_headers"] == 0


def test_the_processes_of_one_host_share_a_sqlite_window(tmp_path: Path) -> None:
    """`--workers 2` with no Redis: rpm counted once for both processes (it was counted per process)."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    port = free_port()
    env = {
        **os.environ,
        "SHIPYARD_DATA_DIR": str(tmp_path / "data"),
        "SHIPYARD_API_KEYS": "team:sk-team",
        "SHIPYARD_ADMIN_KEYS": "sk-admin",
        "SHIPYARD_LIMITS__TEAM__RPM": "10",
        "SHIPYARD_ENGINE__VLLM_COMMAND": json.dumps(FAKE),
        "SHIPYARD_ENGINE__PROFILE": "default",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "shipyard.cli", "serve", "--model", str(model), "--port", str(port), "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(proc, url, 90, "serve", poll_s=0.1)
        statuses = []
        for _ in range(30):  # a new connection each time: the kernel hands them to either process
            answer = httpx.post(
                f"{url}/v1/completions",
                json={"model": "m", "prompt": "hi", "max_tokens": 1},
                headers={"Authorization": "Bearer sk-team"},
            )
            statuses.append(answer.status_code)
        assert statuses.count(200) == 10 and statuses.count(429) == 20, statuses
        assert (tmp_path / "data" / "limits.sqlite").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        subprocess.run([sys.executable, "-m", "shipyard.cli", "stop"], env=env, capture_output=True, timeout=60)


def test_sqlite_counters_are_one_window_for_every_connection(tmp_path: Path) -> None:
    first, second = SqliteCounters(tmp_path / "l.sqlite"), SqliteCounters(tmp_path / "l.sqlite")
    limits = KeyLimits(rpm=5, concurrent=3, tpm=100)

    async def steps() -> None:
        admitted = [(await c.admit("k", limits, f"r{i}")).allowed for i, c in enumerate([first, second] * 4)]
        assert admitted == [True, True, True, False, False, False, False, False]  # 3 in flight at most
        await first.update("k", "r0", release=True)
        decision = await second.admit("k", limits, "r9")
        assert decision.allowed and decision.window.requests == 4 and decision.window.in_flight == 3
        assert (await first.reserve("k", limits, "t1", 80)).allowed
        refused = await second.reserve("k", limits, "t2", 30)
        assert refused.refused_by == "tpm" and refused.window.tokens == 80
        await first.update("k", "t1", tokens=20)  # it used less than it reserved
        assert (await second.reserve("k", limits, "t2", 30)).window.tokens == 50

    asyncio.run(steps())


def test_when_redis_does_not_answer_limits_fall_back_as_the_setting_says(tmp_path: Path) -> None:
    """`limits_fallback: local` keeps counting in each process; `refuse` answers 503 (nothing is let through
    unlimited either way)."""
    with start_redis(tmp_path / "redis") as redis:
        url = f"redis://127.0.0.1:{redis.port}/0"
    limits = KeyLimits(rpm=2)

    async def steps() -> None:
        local = KeyLimiter(lambda _: limits, counters=RedisCounters(url, timeout_s=0.5), fallback="local")
        (await local.admit("k")).release()
        (await local.admit("k")).release()
        with pytest.raises(LimitExceeded):  # counted here while Redis is away: still 2 a minute
            await local.admit("k")
        assert "ConnectionError" in local.shared_error or "Timeout" in local.shared_error
        refuse = KeyLimiter(lambda _: limits, counters=RedisCounters(url, timeout_s=0.5), fallback="refuse")
        with pytest.raises(LimitsUnavailable, match="cannot be reached"):
            await refuse.admit("k")

    asyncio.run(steps())


def test_redis_counters_share_one_window_and_settle_tokens(tmp_path: Path) -> None:
    limits = KeyLimits(rpm=3, tpm=50, concurrent=2)
    with start_redis(tmp_path / "redis") as redis:
        url = f"redis://127.0.0.1:{redis.port}/0"

        async def steps() -> None:
            a, b = RedisCounters(url), RedisCounters(url)
            assert (await a.admit("k", limits, "1")).allowed and (await b.admit("k", limits, "2")).allowed
            assert (await a.admit("k", limits, "3")).refused_by == "concurrent"
            await b.update("k", "2", release=True)
            third = await a.admit("k", limits, "3")
            assert third.allowed and third.window.requests == 3 and third.window.oldest_request_s is not None
            await a.update("k", "1", release=True)
            assert (await b.admit("k", limits, "4")).refused_by == "rpm"
            assert (await a.reserve("k", limits, "t", 60)).refused_by == "tpm_request"
            assert (await a.reserve("k", limits, "t", 40)).allowed
            await b.update("k", "t", tokens=10)
            assert (await b.reserve("k", limits, "u", 30)).window.tokens == 40
            await a.close()
            await b.close()

        asyncio.run(steps())


def test_memory_counters_are_the_default() -> None:
    assert isinstance(KeyLimiter(lambda _: KeyLimits()).counters, MemoryCounters)


def test_each_key_is_scheduled_at_its_own_priority_whatever_the_client_asks() -> None:
    """The promise: a batch key cannot put its requests ahead of an interactive key's in the engine's queue."""
    from shipyard.settings import Settings
    from shipyard.stack import engine_spec
    from shipyard.testing import FakeOpenAI
    from tests.stack import start_stack

    limits = {"interactive": KeyLimits(priority=0), "batch": KeyLimits(priority=10)}
    fake = FakeOpenAI("fake-model")
    for stack in start_stack(fake, api_keys="interactive:sk-i,batch:sk-b,other:sk-o", limits=limits):
        for key, asked in (("sk-b", -5), ("sk-i", None), ("sk-o", 3)):
            body = {"model": "fake-model", "prompt": "hi", "max_tokens": 1, **({"priority": asked} if asked else {})}
            answer = httpx.post(f"{stack.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert answer.status_code == 200
        assert [r.get("priority") for r in fake.requests] == [10, 0, 0]
        embedding = httpx.post(
            f"{stack.url}/v1/embeddings",
            json={"model": "fake-model", "input": "x"},
            headers={"Authorization": "Bearer sk-b"},
        )
        assert embedding.status_code == 200 and "priority" not in fake.requests[-1]  # pooling has no queue order
    assert "--scheduling-policy" in engine_spec(Settings(limits=limits), "/m", "m", "cpu", False).extra_args
    assert "--scheduling-policy" not in engine_spec(Settings(), "/m", "m", "cpu", False).extra_args
    unlimited = FakeOpenAI("fake-model")
    for stack in start_stack(unlimited):  # no key has a priority: the client's own passes through
        body = {"model": "fake-model", "prompt": "hi", "max_tokens": 1, "priority": 3}
        httpx.post(f"{stack.url}/v1/completions", json=body, headers={"Authorization": "Bearer sk-test-key"})
        assert unlimited.requests[-1]["priority"] == 3
