"""The rest of the API surface against the fake upstream: Responses, Anthropic Messages, tokenize, models/{id},
engine dev routes never proxied, named keys and per-key limits."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import httpx
import openai
import pytest

from shipyard.engine.spec import EngineSpec, detect_tool_parser
from shipyard.gateway import create_app
from shipyard.gateway.limits import KeyLimiter
from shipyard.router import Replica
from shipyard.settings import KeyLimits, load_settings
from shipyard.testing import FakeOpenAI
from tests.helpers import ServerThread, wait_for
from tests.stack import API_KEY, Stack, start_stack

MODEL = "fake-model"
BEARER = {"Authorization": f"Bearer {API_KEY}"}


def post(stack: Stack, path: str, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{stack.url}{path}", json=body, headers=headers or BEARER, timeout=10)


def metric_lines(url: str, prefix: str) -> list[str]:
    return [line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(prefix)]


def test_models_retrieve_answers_like_the_list(stack: Stack) -> None:
    client = stack.client()
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.model_extra and model.model_extra["max_model_len"] == 1024
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.models.retrieve("gpt-nothing")


def test_responses_route_counts_usage_and_streams_to_the_end(stack: Stack) -> None:
    r = post(stack, "/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 4})
    assert r.status_code == 200 and r.json()["id"].startswith("resp_") and r.headers["x-shipyard-version"] == "v1"
    with httpx.stream("POST", f"{stack.url}/v1/responses", json={"model": MODEL, "input": "hi", "stream": True},
                      headers=BEARER) as streamed:  # fmt: skip
        text = "".join(streamed.iter_text())
    assert "response.completed" in text and '"error"' not in text  # ended properly: no error event appended
    tokens = metric_lines(stack.url, "shipyard_output_tokens_total")
    assert tokens == [f'shipyard_output_tokens_total{{model="{MODEL}"}} 2.0']


def test_previous_response_id_goes_to_the_replica_that_made_it() -> None:
    fakes = [FakeOpenAI(MODEL), FakeOpenAI(MODEL)]
    # probed once at start only: a probe between "mark it not ready" and the request would undo the mark
    settings = load_settings(api_keys=API_KEY, health_interval_s=60)
    with ServerThread(fakes[0]) as one, ServerThread(fakes[1]) as two:
        replicas = [Replica(one.url, name="r1"), Replica(two.url, name="r2")]
        with ServerThread(create_app(settings, replicas)) as gw:
            assert wait_for(lambda: httpx.get(f"{gw.url}/ready").json()["status"] == "ready")
            assert wait_for(lambda: all(r.ready for r in replicas))
            first = httpx.post(f"{gw.url}/v1/responses", json={"model": MODEL, "input": "a"}, headers=BEARER).json()
            maker = 0 if fakes[0].requests else 1
            for _ in range(6):  # least-in-flight alone would alternate; the id pins every one
                body = {"model": MODEL, "input": "b", "previous_response_id": first["id"]}
                assert httpx.post(f"{gw.url}/v1/responses", json=body, headers=BEARER).status_code == 200
            assert len(fakes[maker].requests) == 7 and not fakes[1 - maker].requests
            replicas[maker].ready = False
            replicas[maker].last_error = "stopped"
            body = {"model": MODEL, "input": "c", "previous_response_id": first["id"]}
            gone = httpx.post(f"{gw.url}/v1/responses", json=body, headers=BEARER)
            assert gone.status_code == 400 and gone.json()["error"]["code"] == "previous_response_unavailable"


def test_anthropic_messages_with_x_api_key_streaming_and_not(stack: Stack) -> None:
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    r = post(stack, "/v1/messages", body, headers)
    assert r.status_code == 200 and r.json()["type"] == "message"
    with httpx.stream("POST", f"{stack.url}/v1/messages", json={**body, "stream": True}, headers=headers) as s:
        text = "".join(s.iter_text())
    assert "message_stop" in text and '"error"' not in text
    assert metric_lines(stack.url, "shipyard_prompt_tokens_total") == [
        f'shipyard_prompt_tokens_total{{model="{MODEL}"}} 14.0'
    ]
    assert post(stack, "/v1/messages", body, {"x-api-key": "sk-wrong"}).status_code == 401
    missing = post(stack, "/v1/messages", {"model": MODEL, "messages": body["messages"]}, headers)
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "max_tokens"


def test_tokenize_and_detokenize_default_to_the_served_model(stack: Stack) -> None:
    tokens = post(stack, "/tokenize", {"prompt": "hi"}).json()["tokens"]
    assert tokens == [ord("h"), ord("i")] and stack.fake.requests[-1]["model"] == MODEL
    assert post(stack, "/detokenize", {"tokens": tokens}).json() == {"prompt": "hi"}
    both = post(stack, "/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]})
    assert both.status_code == 422 and "exactly one" in both.json()["error"]["message"]
    assert post(stack, "/tokenize", {"model": "other", "prompt": "x"}).status_code == 404


@pytest.mark.parametrize(
    "path",
    ["/pause", "/resume", "/collective_rpc", "/sleep", "/wake_up", "/reset_prefix_cache", "/is_sleeping",
     "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/scale_elastic_ep"],
)  # fmt: skip
def test_engine_dev_routes_are_never_proxied(stack: Stack, path: str) -> None:
    r = post(stack, path, {})
    assert r.status_code in (404, 405) and "error" in r.json()
    assert not stack.fake.requests


def test_keys_have_names_in_metrics_never_the_key(fake: FakeOpenAI) -> None:
    for stack in start_stack(fake, api_keys=f"team-a:{API_KEY},sk-second"):
        client = stack.client()
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        stack.client(key="sk-second").completions.create(model=MODEL, prompt="x", max_tokens=2)
        text = httpx.get(f"{stack.url}/metrics").text
        assert 'shipyard_key_requests_total{key="team-a",status="200"} 1.0' in text
        assert 'shipyard_key_output_tokens_total{key="team-a"} 3.0' in text
        assert 'shipyard_key_output_tokens_total{key="key-2"} 2.0' in text
        assert API_KEY not in text and "sk-second" not in text


def test_a_key_over_its_request_limit_gets_429_and_others_do_not(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHIPYARD_LIMITS__DEFAULT__RPM", "2")
    monkeypatch.setenv("SHIPYARD_LIMITS__VIP__RPM", "100")
    for stack in start_stack(fake, api_keys=f"team-a:{API_KEY},vip:sk-vip"):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert [post(stack, "/v1/chat/completions", body).status_code for _ in range(2)] == [200, 200]
        sent = len(fake.requests)
        refused = post(stack, "/v1/chat/completions", body)
        assert refused.status_code == 429 and len(fake.requests) == sent  # never reached the engine
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error" and "team-a" in error["message"] and "2 requests" in error["message"]
        assert 55 <= int(refused.headers["retry-after"]) <= 60
        assert refused.headers["x-ratelimit-limit-requests"] == "2"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
        with pytest.raises(openai.RateLimitError):
            stack.client().chat.completions.create(**body)  # type: ignore[call-overload]
        vip = {"Authorization": "Bearer sk-vip"}
        assert all(post(stack, "/v1/chat/completions", body, vip).status_code == 200 for _ in range(5))
        assert httpx.get(f"{stack.url}/ready").status_code == 200  # health, readiness, metrics: never limited
        assert 'shipyard_key_requests_total{key="team-a",status="429"} 2.0' in httpx.get(f"{stack.url}/metrics").text


def test_tokens_per_minute_count_prompt_and_output_tokens(fake: FakeOpenAI) -> None:
    for stack in start_stack(fake, limits={"default": KeyLimits(tpm=40)}):
        body = {"model": MODEL, "prompt": "x", "max_tokens": 16}  # the fake's usage: 7 prompt + 16 output
        assert post(stack, "/v1/completions", body).status_code == 200  # reserved ~29, settled to 23
        sent = len(fake.requests)
        refused = post(stack, "/v1/completions", body)  # 23 used + up to ~29 more > 40: refused before it runs
        assert refused.status_code == 429 and "17 of its 40 tokens per minute" in refused.json()["error"]["message"]
        assert refused.headers["x-ratelimit-remaining-tokens"] == "17" and len(fake.requests) == sent
        too_big = post(stack, "/v1/completions", {**body, "max_tokens": 41})
        assert too_big.status_code == 429 and "more than key" in too_big.json()["error"]["message"]


def test_concurrent_requests_limit(fake: FakeOpenAI) -> None:
    fake.ttft_s = 1.0
    for stack in start_stack(fake, limits={"default": KeyLimits(concurrent=1)}):
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        results: list[int] = []

        def send(stack: Stack = stack, body: dict[str, object] = body, results: list[int] = results) -> None:
            results.append(post(stack, "/v1/completions", body).status_code)

        slow = threading.Thread(target=send)
        slow.start()
        assert wait_for(lambda: len(fake.requests) == 1, timeout=5)
        assert post(stack, "/v1/completions", body).status_code == 429
        slow.join()
        assert results == [200]
        assert post(stack, "/v1/completions", body).status_code == 200  # the slot is free again


def test_limiter_window_slides_with_the_clock() -> None:
    now = [0.0]
    limiter = KeyLimiter(lambda _: KeyLimits(rpm=1, tpm=10), clock=lambda: now[0])

    async def steps() -> None:
        (await limiter.admit("a")).release()
        limiter.record_tokens("a", 3)
        with pytest.raises(Exception, match="1 requests per minute; retry in 60 s"):
            await limiter.admit("a")
        now[0] = 59.5
        with pytest.raises(Exception, match="retry in 1 s"):
            await limiter.admit("a")
        now[0] = 60.0
        (await limiter.admit("a")).release()  # the first request left the window
        limiter.record_tokens("a", 20)
        now[0] = 121.0
        await limiter.admit("a")

    asyncio.run(steps())


def test_limiter_looks_each_keys_limits_up_once() -> None:
    """A lookup builds settings objects; on every request it was a quarter of the gateway's CPU."""
    looked_up: list[str] = []
    limiter = KeyLimiter(lambda name: looked_up.append(name) or KeyLimits(concurrent=2))

    async def steps() -> None:
        for _ in range(3):
            (await limiter.admit("a")).release()
        (await limiter.admit("b")).release()

    asyncio.run(steps())
    assert looked_up == ["a", "b"]


def write_model(folder: Path, template: str) -> str:
    folder.mkdir()
    (folder / "chat_template.jinja").write_text(template)
    (folder / "config.json").write_text(json.dumps({"model_type": "x"}))
    return str(folder)


def test_tool_call_parser_follows_the_chat_template(tmp_path: Path) -> None:
    chatml = write_model(tmp_path / "qwen", "{{ '<|im_start|>' + message['role'] }}")
    llama3 = write_model(tmp_path / "llama3", "<|start_header_id|>{{ role }}<|end_header_id|>")
    plain = write_model(tmp_path / "plain", "{{ messages }}")
    assert [detect_tool_parser(m) for m in (chatml, llama3, plain)] == ["hermes", "llama3_json", None]
    args = EngineSpec(model=chatml, tool_call_parser="auto").vllm_args(8000)
    assert args[-3:] == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    assert "--tool-call-parser" not in EngineSpec(model=plain, tool_call_parser="auto").vllm_args(8000)
    assert "--tool-call-parser" not in EngineSpec(model=chatml, tool_call_parser="none").vllm_args(8000)
    assert EngineSpec(model=plain, tool_call_parser="mistral").vllm_args(8000)[-1] == "mistral"
    assert load_settings().engine.tool_call_parser == "auto"


def test_every_answer_of_a_limited_key_carries_the_ratelimit_headers(fake: FakeOpenAI) -> None:
    for stack in start_stack(fake, limits={"default": KeyLimits(rpm=10, tpm=10_000)}):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        first, second = post(stack, "/v1/chat/completions", body), post(stack, "/v1/chat/completions", body)
        assert first.status_code == second.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "10"
        assert (
            first.headers["x-ratelimit-remaining-requests"] == "9"
            and second.headers["x-ratelimit-remaining-requests"] == "8"
        )
        assert first.headers["x-ratelimit-limit-tokens"] == "10000" and first.headers[
            "x-ratelimit-reset-requests"
        ].endswith("s")
        streamed = stack.http().post("/v1/chat/completions", json={**body, "stream": True})
        assert streamed.status_code == 200 and streamed.headers["x-ratelimit-remaining-requests"] == "7"
