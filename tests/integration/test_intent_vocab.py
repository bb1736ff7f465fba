"""The one-token plan is exactly the set of tokens vLLM's grammar backend (xgrammar, as vLLM builds it for
``choice``) allows as an answer's first token: on the default model's real tokenizer (byte-level BPE) and on a
byte-fallback tokenizer trained here (SentencePiece-style, as Llama 2 / Mistral ship)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shipyard.tasks import load_labels
from shipyard.tasks.datasets import project_data
from shipyard.tasks.intent import first_token_plan
from shipyard.tasks.vocab import Vocabulary

xgr = pytest.importorskip("xgrammar")  # vLLM's dependency: present wherever the CPU engine is installed
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from vllm.v1.structured_output.utils import choice_as_grammar  # noqa: E402

LABEL_SETS = [
    load_labels().labels,
    ["positive", "negative", "neutral"],
    ["card", "card_payment", "account", "café", "naïve", "日本", "日本語", 'say "hi"\\'],
]


def grammar_first_tokens(tokenizer: object, labels: list[str]) -> set[int]:
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))  # type: ignore[arg-type]
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_grammar(choice_as_grammar(labels)))
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    words = bitmask[0].tolist()
    return {i for i in range(info.vocab_size) if (words[i // 32] >> (i % 32)) & 1}


def test_byte_level_plan_is_what_the_grammar_allows_first(default_model_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    vocab = Vocabulary.from_folder(default_model_dir)
    for labels in LABEL_SETS:
        assert set(first_token_plan(tuple(labels), vocab).allowed) == grammar_first_tokens(tokenizer, labels), labels


def test_byte_fallback_plan_is_what_the_grammar_allows_first(tmp_path: Path) -> None:
    from tokenizers import decoders, models, normalizers, trainers

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trained = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    corpus = [json.loads(line)["text"] for line in project_data("data/intent/train.jsonl").read_text().splitlines()]
    trained.train_from_iterator(
        corpus * 3, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    )
    trained.save(str(tmp_path / "tokenizer.json"))
    data = json.loads(
        (tmp_path / "tokenizer.json").read_text()
    )  # byte tokens are vocabulary, not special, as in Llama 2
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in ("<unk>", "<s>", "</s>")]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"), unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    vocab = Vocabulary.from_folder(tmp_path)
    for labels in LABEL_SETS:
        assert set(first_token_plan(tuple(labels), vocab).allowed) == grammar_first_tokens(tokenizer, labels), labels
