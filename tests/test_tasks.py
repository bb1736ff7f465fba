"""Task endpoints against the fake upstream: validation, guaranteed labels, scores, reply schema and retry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from shipyard.engine.process import ENGINE_ENV
from shipyard.settings import IntentSettings
from shipyard.tasks import ReplyDraft, load_labels, load_templates
from shipyard.tasks.config import TaskConfigError
from shipyard.tasks.intent import (
    FULL_MAX_TOKENS,
    MAX_LABELS,
    DecodePlan,
    IntentAnswerError,
    LabelSet,
    decide_label,
    decisive_prefix,
    decode_plan,
    intent_body,
    label_probabilities,
)
from shipyard.tasks.reply import DraftError, parse_draft, render_reply
from shipyard.testing import FakeOpenAI
from tests.stack import Stack, start_stack

GOOD_DRAFT = {
    "summary": {"issue": "The order is late.", "demands": ["deliver it"], "sentiment": "negative"},
    "apology": "We are sorry that your order is late.",
    "resolution_steps": ["We will contact the carrier today.", "We will refund the shipping fee."],
}
CONVERSATION = [{"role": "user", "content": "My order is late!"}]


def post(stack: Stack, path: str, body: object) -> httpx.Response:
    with stack.http() as http:
        return http.post(path, json=body)


def test_intent_uses_configured_labels_and_a_cache_friendly_prompt(stack: Stack) -> None:
    r = post(stack, "/v1/intent", {"text": "I lost my card"})
    assert r.status_code == 200, r.text
    body = r.json()
    labels = load_labels()
    assert body["intent"] == labels.labels[0] and body["scores"] is None and body["model"] == "fake-model"
    sent = stack.fake.requests[-1]
    assert sent["structured_outputs"] == {"choice": labels.labels}
    assert sent["temperature"] == 0
    # Fixed instructions + label descriptions first, the customer's text last: the prefix is shared.
    assert sent["messages"][-1] == {"role": "user", "content": "I lost my card"}
    assert all(label in sent["messages"][0]["content"] for label in labels.labels)
    other = intent_body("m", labels, "something else")
    assert other["messages"][0] == sent["messages"][0]


def test_intent_answer_outside_the_labels_is_a_502_never_returned(stack: Stack) -> None:
    stack.fake.script.append("definitely_not_a_label")
    r = post(stack, "/v1/intent", {"text": "hi", "labels": ["yes", "no"]})
    assert r.status_code == 502 and "not one of the labels" in r.json()["error"]["message"]


def test_zero_shot_labels_and_scores(stack: Stack) -> None:
    r = post(stack, "/v1/intent", {"text": "I love it", "labels": ["positive", "bad", "ok"], "scores": True})
    assert r.status_code == 200, r.text
    scores = r.json()["scores"]
    assert set(scores) == {"positive", "bad", "ok"} and sum(scores.values()) == pytest.approx(1, abs=1e-3)
    assert scores["ok"] > scores["bad"] > scores["positive"]  # the fake scores shorter labels higher
    assert len(stack.fake.requests) == 4  # the answer plus one scoring request per label


def test_predict_is_the_drop_in_shape(stack: Stack) -> None:
    r = post(stack, "/predict", {"text": "where is my parcel"})
    assert r.status_code == 200 and set(r.json()) == {"intent"}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/intent", {}, 422, "text"),
        ("/v1/intent", {"text": "   "}, 422, "text"),
        ("/v1/intent", {"text": "x", "labels": ["only"]}, 422, "labels"),
        ("/v1/intent", {"text": "x", "labels": ["a", "a"]}, 422, "labels"),
        ("/v1/intent", {"text": "x", "surprise": 1}, 422, "surprise"),
        ("/v1/intent", {"text": "x", "model": "other"}, 404, "model"),
        ("/predict", {"text": 5}, 422, "text"),
        ("/v1/reply", {"messages": []}, 422, "messages"),
        ("/v1/reply", {"messages": [{"role": "assistant", "content": "hello"}]}, 422, "messages"),
        ("/v1/reply", {"messages": CONVERSATION, "template": "nope"}, 400, "template"),
    ],
)
def test_invalid_task_bodies(stack: Stack, path: str, body: object, status: int, param: str) -> None:
    r = post(stack, path, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    assert not stack.fake.requests


def test_task_endpoints_need_a_key(stack: Stack) -> None:
    for path in ("/v1/intent", "/predict", "/v1/reply"):
        assert httpx.post(f"{stack.url}{path}", json={"text": "x"}).status_code == 401


def test_reply_renders_the_template_from_a_validated_draft(stack: Stack) -> None:
    stack.fake.script.append(json.dumps(GOOD_DRAFT))
    r = post(stack, "/v1/reply", {"messages": CONVERSATION, "template": "formal"})
    assert r.status_code == 200, r.text
    body = r.json()
    template = load_templates()["formal"]
    assert body["reply"].startswith(template.greeting) and body["reply"].endswith(template.closing)
    assert "1. We will contact the carrier today.\n2. We will refund the shipping fee." in body["reply"]
    assert body["summary"] == GOOD_DRAFT["summary"] and body["template"] == "formal"
    sent = stack.fake.requests[-1]
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"]["strict"] is True


def test_reply_retries_once_then_succeeds(stack: Stack) -> None:
    stack.fake.script.extend(["{not json", json.dumps(GOOD_DRAFT)])
    r = post(stack, "/v1/reply", {"messages": CONVERSATION})
    assert r.status_code == 200 and len(stack.fake.requests) == 2


def test_reply_fails_with_502_and_the_reason_after_two_invalid_answers(stack: Stack) -> None:
    bad = {**GOOD_DRAFT, "resolution_steps": []}
    stack.fake.script.extend([json.dumps(bad), json.dumps({**GOOD_DRAFT, "summary": {"issue": "x"}})])
    r = post(stack, "/v1/reply", {"messages": CONVERSATION})
    assert r.status_code == 502
    message = r.json()["error"]["message"]
    assert "failed validation 2 times" in message and "resolution_steps" in message and "summary" in message
    metrics = httpx.get(f"{stack.url}/metrics").text
    labels = 'deployment="blue",model="fake-model",route="reply",status="502",version="v1"'
    assert f"shipyard_requests_total{{{labels}}} 1.0" in metrics


def test_parse_draft_reasons() -> None:
    def completion(content: str, finish: str = "stop") -> dict[str, object]:
        return {"choices": [{"message": {"content": content}, "finish_reason": finish}]}

    assert isinstance(parse_draft(completion(json.dumps(GOOD_DRAFT))), ReplyDraft)
    with pytest.raises(DraftError, match="cut off"):
        parse_draft(completion('{"summary": {', "length"))
    with pytest.raises(DraftError, match="not JSON"):
        parse_draft(completion("hello"))
    wrong = {**GOOD_DRAFT, "summary": {**GOOD_DRAFT["summary"], "sentiment": "furious"}}
    with pytest.raises(DraftError, match="summary.sentiment"):
        parse_draft(completion(json.dumps(wrong)))
    draft = ReplyDraft.model_validate(GOOD_DRAFT)
    assert render_reply(load_templates()["standard"], draft).count("\n\n") == 3


def test_label_probabilities_from_prompt_logprobs() -> None:
    def answer(label_token: int, logprob: float) -> dict[str, object]:
        return {
            "prompt_token_ids": [5, 6, label_token, 9],
            "prompt_logprobs": [
                None,
                {"6": {"logprob": -1}},
                {str(label_token): {"logprob": logprob}},
                {"9": {"logprob": -0.5}},
            ],
        }

    probs = label_probabilities(["x", "y"], [answer(7, -1.0), answer(8, -2.0)])
    # log-likelihoods after the common prefix: x = -1.5, y = -2.5 -> softmax
    assert probs["x"] == pytest.approx(1 / (1 + 2.718281828**-1), abs=1e-4)
    assert probs["x"] + probs["y"] == pytest.approx(1, abs=1e-4)


def test_label_and_template_files_are_validated(tmp_path: Path) -> None:
    bad = tmp_path / "labels.yaml"
    bad.write_text("only_one: description\n")
    with pytest.raises(TaskConfigError, match="at least 2 labels"):
        load_labels(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(TaskConfigError, match="mapping"):
        load_labels(bad)
    templates = tmp_path / "t.yaml"
    templates.write_text("short:\n  greeting: hi\n")
    with pytest.raises(TaskConfigError, match="template 'short' field apology"):
        load_templates(templates)
    with pytest.raises(TaskConfigError, match="cannot read"):
        load_templates(tmp_path / "missing.yaml")
    assert LabelSet.from_names(["a", "b"]).labels == ["a", "b"]


# --- shortest decode ---------------------------------------------------------------------------------------

TRICKY_SETS = [
    ["lost_card", "activate_card", "account_access", "refund_request", "return_item"],
    ["card", "card_lost", "card_lost_abroad"],  # labels that are prefixes of others
    ["ab_x", "b", "ab_y"],  # "b" would be a stop string inside "ab_x"
    ["card", "card_payment", "account", "delivery", "other", "order"],  # "a", "d", "o" inside other labels
    ["yes", "no"],
    ["été", "étage", "eta"],  # non-ASCII: bytes, not characters, bound the tokens
    ["x", "xy", "y", "yx"],
]


def cut(label: str, plan: DecodePlan, pieces: list[int]) -> dict[str, object]:
    """vLLM's answer to a shortest-decode request whose greedy path spells ``label`` in pieces of the given
    lengths: it ends at the first token that completes a stop string (cut after it), at ``max_tokens`` tokens,
    or with the end-of-answer token."""
    text, tokens = "", 0
    for size in pieces:
        if tokens == plan.max_tokens:
            return {"choices": [{"message": {"content": text}, "finish_reason": "length", "stop_reason": None}]}
        text, tokens = label[: len(text) + size], tokens + 1
        hits = [(text.find(stop) + len(stop), stop) for stop in plan.stop if stop in text]
        if hits:
            end, stop = min(hits)
            return {"choices": [{"message": {"content": text[:end]}, "finish_reason": "stop", "stop_reason": stop}]}
    finish = "stop" if tokens < plan.max_tokens else "length"
    return {"choices": [{"message": {"content": text}, "finish_reason": finish, "stop_reason": None}]}


def spellings(label: str) -> list[list[int]]:
    """Every way of cutting ``label`` into tokens of 1..4 characters (up to 8 characters; then fixed cuts)."""
    if len(label) > 8:
        return [[1] * len(label), [len(label)], [2] * (len(label) // 2) + [1] * (len(label) % 2)]
    if not label:
        return [[]]
    return [[size, *rest] for size in range(1, min(4, len(label)) + 1) for rest in spellings(label[size:])]


@pytest.mark.parametrize("names", TRICKY_SETS, ids=["-".join(s) for s in TRICKY_SETS])
def test_a_shortest_decode_decides_the_label_full_decoding_gives_whatever_the_spelling(names: list[str]) -> None:
    labels = LabelSet.from_names(names)
    plan = decode_plan(tuple(names))
    for label in names:
        for pieces in spellings(label):
            assert decide_label(labels, cut(label, plan, pieces)) == label, (label, pieces, plan)


def test_the_longest_labels_fit_the_token_budget() -> None:
    names = [f"{'x' * 99}{i}" for i in range(3)]  # requests may bring labels of up to 100 characters
    labels, plan = LabelSet.from_names(names), decode_plan(tuple(names))
    assert plan.max_tokens == 100 <= FULL_MAX_TOKENS
    for label in names:
        assert decide_label(labels, cut(label, plan, [1] * len(label))) == label


def test_decode_plan_of_the_packaged_labels_and_of_prefix_labels() -> None:
    packaged = load_labels().labels
    plan = decode_plan(tuple(packaged))
    assert plan.max_tokens == 3 and len(plan.stop) == len(packaged)  # "acc"/"act", "ref"/"ret" need 3 bytes
    assert "l" in plan.stop and "ca" in plan.stop and "cl" in plan.stop
    assert decisive_prefix("card", ["card", "card_lost"]) is None
    assert decode_plan(("card", "card_lost")) == DecodePlan(("card_",), 5)  # "card" then the end of the answer
    assert decode_plan(("é", "e")).max_tokens == 2  # two bytes


def test_decide_label_refuses_text_that_begins_no_label() -> None:
    labels = LabelSet.from_names(["yes", "no"])
    answer = {"choices": [{"message": {"content": "maybe"}, "finish_reason": "length", "stop_reason": None}]}
    with pytest.raises(IntentAnswerError, match="does not begin any of the labels"):
        decide_label(labels, answer)


def intent_histogram(stack: Stack) -> dict[str, float]:
    """The ``shipyard_intent_output_tokens`` sums and counts on the gateway's /metrics, by their full names."""
    text = httpx.get(f"{stack.url}/metrics").text
    prefixes = ("shipyard_intent_output_tokens_sum{", "shipyard_intent_output_tokens_count{")
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefixes)
    }


def test_intent_asks_only_for_the_tokens_that_decide_the_label(stack: Stack) -> None:
    r = post(stack, "/v1/intent", {"text": "I lost my card"})
    assert r.status_code == 200 and r.json()["intent"] == "lost_card", r.text
    sent = stack.fake.requests[-1]
    plan = decode_plan(tuple(load_labels().labels))
    assert sent["stop"] == list(plan.stop) and sent["include_stop_str_in_output"] is True
    assert sent["max_tokens"] == plan.max_tokens and len(stack.fake.requests) == 1
    metrics = intent_histogram(stack)
    assert metrics['shipyard_intent_output_tokens_count{decode="shortest",outcome="stop_strings"}'] == 1
    assert metrics['shipyard_intent_output_tokens_sum{decode="shortest",outcome="stop_strings"}'] == 1  # "l"


def test_an_undecided_short_answer_is_continued_as_a_full_decode(stack: Stack) -> None:
    names = ["xa", "xb"]
    stack.fake.script.append(("x", "length", None))  # an engine that stopped before the label was decided
    r = post(stack, "/v1/intent", {"text": "hmm", "labels": names})
    assert r.status_code == 200 and r.json()["intent"] == names[0], r.text
    short, full = stack.fake.requests
    assert short["stop"] and "stop" not in full and full["max_tokens"] == FULL_MAX_TOKENS
    assert full["messages"] == short["messages"] and full["structured_outputs"] == short["structured_outputs"]
    metrics = intent_histogram(stack)
    assert metrics['shipyard_intent_output_tokens_count{decode="shortest",outcome="full"}'] == 1
    assert metrics['shipyard_intent_output_tokens_sum{decode="shortest",outcome="full"}'] == 1 + 2  # "x", then "xa"


def test_full_decode_setting_spells_the_whole_label(fake: FakeOpenAI) -> None:
    for stack in start_stack(fake, intent=IntentSettings(decode="full")):
        r = post(stack, "/v1/intent", {"text": "I lost my card"})
        assert r.status_code == 200 and r.json()["intent"] == "lost_card"
        sent = fake.requests[-1]
        assert sent["max_tokens"] == FULL_MAX_TOKENS and "stop" not in sent
        metrics = intent_histogram(stack)
        assert metrics['shipyard_intent_output_tokens_sum{decode="full",outcome="full"}'] == len("lost_card")


def test_an_engine_that_refuses_many_stop_strings_gets_full_decodes(stack: Stack) -> None:
    stack.fake.max_stop_strings = 4  # vLLM's default when VLLM_MAX_STOP_STRINGS is not set
    for text in ("I lost my card", "and again"):
        r = post(stack, "/v1/intent", {"text": text})
        assert r.status_code == 200 and r.json()["intent"] == "lost_card", r.text
    refused, full, again = stack.fake.requests
    assert len(refused["stop"]) == 16 and "stop" not in full and "stop" not in again  # asked once, then remembered
    metrics = intent_histogram(stack)
    assert metrics['shipyard_intent_output_tokens_count{decode="shortest",outcome="full"}'] == 2


def test_engines_shipyard_starts_accept_a_stop_string_per_label() -> None:
    assert ENGINE_ENV["VLLM_MAX_STOP_STRINGS"] == str(MAX_LABELS)


def test_task_endpoints_use_the_model_bound_to_them_when_several_are_served() -> None:
    """Two models behind one gateway: /predict, /v1/intent and /v1/reply without 'model' need intent.model /
    reply.model (else a 400 that names the settings), and then run on the bound model only."""
    from shipyard.gateway import create_app
    from shipyard.router import Replica
    from shipyard.settings import load_settings
    from tests.helpers import ServerThread, wait_for

    chat, other = FakeOpenAI("assistant"), FakeOpenAI("embed")
    with ServerThread(chat) as one, ServerThread(other) as two:
        replicas = [Replica(one.url, name="assistant-0"), Replica(two.url, name="embed-0")]

        def gateway(**bound: object) -> ServerThread:
            settings = load_settings(api_keys="sk-t", health_interval_s=0.2, **bound)
            return ServerThread(create_app(settings, replicas))

        auth = {"Authorization": "Bearer sk-t"}
        with gateway() as unbound:
            assert wait_for(lambda: len(httpx.get(f"{unbound.url}/v1/models", headers=auth).json()["data"]) == 2)
            refused = httpx.post(f"{unbound.url}/predict", json={"text": "where is my parcel"}, headers=auth)
            assert refused.status_code == 400 and "intent.model" in refused.json()["error"]["message"]
        with gateway(intent={"model": "assistant"}, reply={"model": "assistant"}) as bound:
            assert wait_for(lambda: len(httpx.get(f"{bound.url}/v1/models", headers=auth).json()["data"]) == 2)
            answer = httpx.post(f"{bound.url}/predict", json={"text": "where is my parcel"}, headers=auth)
            assert answer.status_code == 200 and set(answer.json()) == {"intent"}
            assert chat.requests and not other.requests


def test_every_string_of_the_reply_draft_is_bounded_and_the_budget_holds_the_longest() -> None:
    """Issue 34 item 12: a resolution step had no maxLength (a model could loop inside one until max_tokens, a
    502); every string is bounded now, and the budget holds the longest draft at 3.3 characters a token."""
    from shipyard.tasks.reply import DRAFT_MAX_TOKENS, DRAFT_SCHEMA, ReplyDraft, longest_draft_chars

    def strings(schema: dict[str, Any]) -> list[dict[str, Any]]:
        if schema.get("type") == "object":
            return [s for v in schema["properties"].values() for s in strings(v)]
        if schema.get("type") == "array":
            return strings(schema["items"])
        return [schema] if schema.get("type") == "string" and "enum" not in schema else []

    assert all("maxLength" in s for s in strings(DRAFT_SCHEMA))
    longest = ReplyDraft.model_validate(
        {
            "summary": {"issue": "i" * 240, "demands": ["d" * 120] * 5, "sentiment": "negative"},
            "apology": "a" * 320,
            "resolution_steps": ["s" * 240] * 3,
        }
    )
    text = json.dumps(longest.model_dump(), separators=(",", ":"))
    assert len(text) == longest_draft_chars(DRAFT_SCHEMA)
    assert DRAFT_MAX_TOKENS * 3.4 >= len(text)
