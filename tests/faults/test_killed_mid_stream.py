"""An engine SIGKILLed while streams wait for their first token and while they stream, with and without
another replica (the fake engine as a real process, killed with its process group).

Promise: in-flight counts never go below zero (each request's count is released once, whatever path ends it),
so least-busy never prefers the broken replica and a drain summing them is never fooled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai

from shipyard.engine import free_port
from shipyard.gateway import create_app
from shipyard.router import Replica
from shipyard.settings import load_settings
from tests.faults.report import record
from tests.helpers import ServerThread, healthy, wait_for

KEY = "sk-kill"
MESSAGES = [{"role": "user", "content": "hi"}]


@contextmanager
def fake_engine(ttft_s: float, port: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    port = port or free_port()
    command = [sys.executable, "-m", "shipyard.testing.fake_openai", "--port", str(port), "--model", "m"]
    proc = subprocess.Popen([*command, "--token-rate", "20", "--ttft", str(ttft_s)], start_new_session=True)
    proc.port = port  # type: ignore[attr-defined]
    try:
        assert wait_for(lambda: healthy(f"http://127.0.0.1:{port}"), timeout=20)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def in_flight(url: str) -> dict[str, int]:
    return {r["name"]: r["in_flight"] for r in httpx.get(f"{url}/ready", timeout=5).json()["replicas"]}


def streams(url: str, n: int) -> tuple[list[str], list[threading.Thread]]:
    outcomes: list[str] = []

    def one() -> None:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)
        try:
            for _ in sdk.chat.completions.create(model="m", messages=MESSAGES, max_tokens=40, stream=True):
                pass
            outcomes.append("ok")
        except openai.APIError as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for thread in threads:
        thread.start()
    return outcomes, threads


def watch_counts(url: str, stop: threading.Event) -> list[dict[str, int]]:
    seen: list[dict[str, int]] = []

    def poll() -> None:
        while not stop.is_set():
            seen.append(in_flight(url))
            time.sleep(0.02)

    threading.Thread(target=poll, daemon=True).start()
    return seen


def test_killed_before_the_first_token_with_no_other_replica_counts_stay_at_zero() -> None:
    with fake_engine(ttft_s=3.0) as proc:
        replica = Replica(f"http://127.0.0.1:{proc.port}", name="only")  # type: ignore[attr-defined]
        app = create_app(load_settings(api_keys=KEY, health_interval_s=0.2), [replica])
        with ServerThread(app) as gw:
            assert wait_for(lambda: httpx.get(f"{gw.url}/ready").status_code == 200)
            stop = threading.Event()
            seen = watch_counts(gw.url, stop)
            outcomes, threads = streams(gw.url, 6)
            assert wait_for(lambda: in_flight(gw.url)["only"] == 6, timeout=5)
            os.killpg(proc.pid, signal.SIGKILL)
            for thread in threads:
                thread.join(timeout=30)
            time.sleep(0.3)
            stop.set()
            assert len(outcomes) == 6 and "ok" not in outcomes
            assert min(c["only"] for c in seen) >= 0, "an in-flight count went below zero"
            assert in_flight(gw.url) == {"only": 0}
            record(
                "engine SIGKILLed before the first token, no other replica",
                "in-flight counts never below zero",
                lowest_count_seen=min(c["only"] for c in seen),
                count_after=in_flight(gw.url)["only"],
                streams_failed=f"{len(outcomes)}/6",
            )


def test_killed_with_another_replica_streams_move_or_end_and_counts_stay_true() -> None:
    with fake_engine(ttft_s=3.0) as doomed, fake_engine(ttft_s=0.0) as healthy_engine:
        replicas = [
            Replica(f"http://127.0.0.1:{doomed.port}", name="doomed"),  # type: ignore[attr-defined]
            Replica(f"http://127.0.0.1:{healthy_engine.port}", name="healthy"),  # type: ignore[attr-defined]
        ]
        app = create_app(load_settings(api_keys=KEY, health_interval_s=0.2), replicas)
        with ServerThread(app) as gw:
            assert wait_for(lambda: httpx.get(f"{gw.url}/ready").json()["status"] == "ready")
            assert wait_for(
                lambda: len([r for r in httpx.get(f"{gw.url}/ready").json()["replicas"] if r["ready"]]) == 2
            )
            stop = threading.Event()
            seen = watch_counts(gw.url, stop)
            outcomes, threads = streams(gw.url, 8)
            assert wait_for(lambda: in_flight(gw.url)["doomed"] >= 1, timeout=5)
            os.killpg(doomed.pid, signal.SIGKILL)
            for thread in threads:
                thread.join(timeout=30)
            time.sleep(0.3)
            stop.set()
            assert outcomes.count("ok") == 8, outcomes  # none had a token yet: every one moved to "healthy"
            assert min(min(c.values()) for c in seen) >= 0, "an in-flight count went below zero"
            assert in_flight(gw.url) == {"doomed": 0, "healthy": 0}
            record(
                "engine SIGKILLed before the first token, another replica ready",
                "streams with no output move to the other replica; counts stay true",
                streams_ok=f"{outcomes.count('ok')}/8",
                lowest_count_seen=min(min(c.values()) for c in seen),
            )
