"""One-token classification: vocabularies read as bytes, the plan, and the gateway's decode paths (fake upstream).

That the plan is exactly what vLLM's grammar backend allows first is checked on real tokenizers in
tests/integration/test_intent_vocab.py; that the labels equal full decoding on a real engine in
tests/integration/test_openai_api.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from shipyard.cli import app
from shipyard.router.health import tokenizer_roots
from shipyard.tasks import load_labels
from shipyard.tasks.intent import LabelSet, decide_first_token, first_token_plan
from shipyard.tasks.vocab import UnsupportedVocabulary, Vocabulary
from shipyard.testing import FakeOpenAI
from tests.stack import Stack, start_stack


def write_tokenizer(folder: Path, vocab: dict[str, int], *, decoder: str = "ByteLevel", **model: object) -> Path:
    """A minimal tokenizer.json (what the gateway reads of one)."""
    folder.mkdir(parents=True, exist_ok=True)
    special = [{"id": vocab.get("<|im_end|>", len(vocab)), "content": "<|im_end|>", "special": True}]
    data = {"model": {"type": "BPE", "vocab": vocab, **model}, "decoder": {"type": decoder}, "added_tokens": special}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


def test_byte_level_tokens_are_read_as_the_bytes_they_stand_for(tmp_path: Path) -> None:
    vocab = Vocabulary.from_folder(write_tokenizer(tmp_path, {"re": 0, "Ġre": 1, "Ã©": 2, "<|im_end|>": 3}))
    assert vocab.ids_of(b"re") == (0,) and vocab.ids_of(b" re") == (1,) and vocab.ids_of("é".encode()) == (2,)
    assert vocab.ids_of(b"<|im_end|>") == ()  # special: never part of an answer


def test_byte_fallback_tokens_are_read_as_spaces_and_raw_bytes(tmp_path: Path) -> None:
    folder = write_tokenizer(tmp_path, {"▁card": 0, "<0x41>": 1, "ca": 2}, decoder="ByteFallback", byte_fallback=True)
    vocab = Vocabulary.from_folder(folder)
    assert vocab.ids_of(b" card") == (0,) and vocab.ids_of(b"A") == (1,) and vocab.ids_of(b"ca") == (2,)


def test_other_tokenizers_are_refused_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}))
    with pytest.raises(UnsupportedVocabulary, match="BPE only"):
        Vocabulary.from_folder(tmp_path)
    write_tokenizer(tmp_path, {"a": 0}, decoder="Metaspace")
    with pytest.raises(UnsupportedVocabulary, match="neither a byte-level nor a byte-fallback"):
        Vocabulary.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UnsupportedVocabulary, match="not a tokenizer.json"):
        Vocabulary.from_folder(tmp_path)


def test_first_token_plan_allows_every_token_that_begins_a_label() -> None:
    vocab = Vocabulary.from_tokens("v", [(0, b"c"), (1, b"ca"), (2, b"card"), (3, b"card_"), (4, b"x"), (5, b" c")])
    plan = first_token_plan(("card", "card_payment", "cancel"), vocab)
    assert plan.allowed == (0, 1, 2, 3)  # not "x", not " c": no label begins with them
    labels = LabelSet.from_names(["card", "card_payment", "cancel"])

    def answer(text: str) -> dict[str, object]:
        return {"choices": [{"message": {"content": text}, "finish_reason": "length"}]}

    assert decide_first_token(labels, answer("card_")) == "card_payment"
    assert decide_first_token(labels, answer("can")) == "cancel"
    for open_text in ("ca", "card", "", "\ufffd"):  # several labels begin with it, or a cut character
        assert decide_first_token(labels, answer(open_text)) is None


def test_tokenizer_roots_give_lora_adapters_their_base_tokenizer() -> None:
    cards = [
        {"id": "base", "root": "/models/base"},
        {"id": "support-lora", "root": "/adapters/support", "parent": "base"},
        {"id": "remote"},
    ]
    assert tokenizer_roots(cards) == {"base": "/models/base", "support-lora": "/models/base"}


PACKAGED_TOKENS = {"lost": 0, "l": 1, "a": 2, "ac": 3, "acc": 4, "act": 5, "ca": 6, "card": 7, "re": 8, "ref": 9}


@pytest.fixture
def one_token(fake: FakeOpenAI, tmp_path: Path) -> Iterator[tuple[Stack, Vocabulary]]:
    """A gateway over a fake engine that lists a tokenizer folder as its root, as vLLM does."""
    fake.root = str(write_tokenizer(tmp_path / "model", PACKAGED_TOKENS))
    fake.token_texts = {token_id: text for text, token_id in PACKAGED_TOKENS.items()}
    vocab = Vocabulary.from_folder(tmp_path / "model")
    for stack in start_stack(fake):
        yield stack, vocab


def classify_until_one_token(stack: Stack, body: dict[str, object]) -> httpx.Response:
    """The gateway reads the tokenizer in the background after it first sees the model: until then (a fraction of
    a second) it classifies with stop strings."""
    deadline = time.monotonic() + 10
    with stack.http() as http:
        while True:
            sent_before = len(stack.fake.requests)
            r = http.post("/v1/intent", json=body)
            if any("allowed_token_ids" in sent for sent in stack.fake.requests[sent_before:]):
                return r
            assert time.monotonic() < deadline, "the gateway never sent a one-token request"
            time.sleep(0.05)


def test_intent_is_one_token_when_the_engine_lists_a_readable_tokenizer(one_token: tuple[Stack, Vocabulary]) -> None:
    stack, vocab = one_token
    fake = stack.fake
    r = classify_until_one_token(stack, {"text": "I lost my card"})
    assert r.status_code == 200 and r.json()["intent"] == "lost_card", r.text
    sent = fake.requests[-1]
    assert sent["allowed_token_ids"] == list(first_token_plan(tuple(load_labels().labels), vocab).allowed)
    assert sent["max_tokens"] == 1 and "structured_outputs" not in sent and sent["temperature"] == 0
    assert sent["messages"] == fake.requests[0]["messages"]  # the same prompt as the constrained decodes
    metrics = httpx.get(f"{stack.url}/metrics").text
    assert 'shipyard_intent_output_tokens_sum{decode="shortest",outcome="first_token"} 1.0' in metrics


def test_a_first_token_that_leaves_the_label_open_is_continued_with_the_constraint(
    one_token: tuple[Stack, Vocabulary],
) -> None:
    stack, _ = one_token
    fake = stack.fake
    labels = ["account_access", "activate_card"]
    r = classify_until_one_token(stack, {"text": "let me in", "labels": labels})  # the fake answers "a"
    assert r.status_code == 200 and r.json()["intent"] == "account_access", r.text
    one, constrained = fake.requests[-2:]
    assert one["allowed_token_ids"] == [2, 3, 4, 5] and constrained["structured_outputs"] == {"choice": labels}
    before = stop_strings_tokens(stack)
    with stack.http() as http:
        assert http.post("/v1/intent", json={"text": "again", "labels": labels}).json()["intent"] == "account_access"
    assert stop_strings_tokens(stack) == before + 1 + 3  # "a", then "acc" (a character a token in the fake)
    assert ('outcome="first_token"') not in httpx.get(f"{stack.url}/metrics").text


def stop_strings_tokens(stack: Stack) -> float:
    for line in httpx.get(f"{stack.url}/metrics").text.splitlines():
        if line.startswith('shipyard_intent_output_tokens_sum{decode="shortest",outcome="stop_strings"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_an_engine_that_refuses_the_allowed_tokens_gets_constrained_decodes(
    one_token: tuple[Stack, Vocabulary],
) -> None:
    stack, _ = one_token
    fake = stack.fake
    del fake.token_texts[9]  # the engine's vocabulary lacks a token the folder's tokenizer has
    r = classify_until_one_token(stack, {"text": "I lost my card"})
    assert r.status_code == 200 and r.json()["intent"] == "lost_card", r.text
    refused, constrained = fake.requests[-2:]
    assert "allowed_token_ids" in refused and constrained["structured_outputs"]
    with stack.http() as http:
        assert http.post("/v1/intent", json={"text": "again"}).status_code == 200
    assert "allowed_token_ids" not in fake.requests[-1]  # refused once, then not sent


def test_stop_strings_setting_never_sends_the_one_token_request(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.root = str(write_tokenizer(tmp_path / "model", PACKAGED_TOKENS))
    fake.token_texts = {token_id: text for text, token_id in PACKAGED_TOKENS.items()}
    for stack in start_stack(fake, intent={"decode": "stop-strings"}):
        with stack.http() as http:
            for _ in range(5):
                assert http.post("/v1/intent", json={"text": "I lost my card"}).json()["intent"] == "lost_card"
                time.sleep(0.05)
        assert not any("allowed_token_ids" in sent for sent in fake.requests)


def test_bench_intent_engine_sends_what_the_gateway_sends_first(
    one_token: tuple[Stack, Vocabulary], tmp_path: Path
) -> None:
    """``shipyard bench --scenario intent-engine`` straight to the engine: the one-token request when the
    engine's tokenizer folder is readable, the stop-string decode (said in one line) when it is not."""
    stack, vocab = one_token
    fake, engine_url = stack.fake, stack.upstream.url
    plan = first_token_plan(tuple(load_labels().labels), vocab)
    args = ["bench", "--url", engine_url, "--api-key", "k", "--scenario", "intent-engine", "--rate", "20"]
    result = CliRunner().invoke(app, [*args, "--requests", "6", "--warmup", "0", "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    assert fake.requests[-1]["allowed_token_ids"] == list(plan.allowed) and fake.requests[-1]["max_tokens"] == 1
    fake.root = str(tmp_path / "gone")
    result = CliRunner().invoke(app, [*args, "--requests", "6", "--warmup", "0", "--out", str(tmp_path / "stops")])
    assert result.exit_code == 0 and "intent-engine: stop-string decodes" in result.output, result.output
    assert "allowed_token_ids" not in fake.requests[-1] and fake.requests[-1]["stop"]
