"""What ``shipyard bench`` sends: one ``Workload`` per scenario, each turning a request index into a request.

- ``random``: prompts of a given token length (random token ids on ``/v1/completions``, exact length; or random
  words on ``/v1/chat/completions``), a fixed output length with ``ignore_eos`` — the shape ``vllm bench serve
  --dataset-name random`` uses, so the two tools can be checked against each other.
- ``chat``: multi-turn conversations that share one long system prompt and their own history, the case prefix
  caching is for.
- ``intent`` / ``reply``: the task endpoints with texts from the task datasets.
- ``intent-engine``: the chat completion the gateway sends first for each ``intent`` request (packaged labels, the
  ``--intent-decode`` mode; ``shortest`` is the one-token request when the server's tokenizer folder is
  readable here), straight to a vLLM server: the same classifications without the gateway (an answer that
  leaves the label open is not continued).

Workloads are deterministic for a seed: request ``i`` is the same request on every run.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shipyard.tasks.datasets import IntentExample, ReplyExample, load_jsonl
from shipyard.tasks.intent import (
    IntentDecode,
    LabelSet,
    decode_plan,
    first_token_body,
    first_token_plan,
    intent_body,
    load_labels,
)
from shipyard.tasks.vocab import Vocabulary

# Common English words (one token each for the usual BPE vocabularies when preceded by a space).
_WORDS = (
    "the of and to in is was for on that with as by at from his her they this are be have had not were which one "
    "all their there been has when who will more no if out so said what up its about into than them can only other "
    "new some could time these two may then do first any my now such like our over man me even most made after also "
    "did many before must through back years where much your way well down should because each just those people how "
    "too little state good very make world still own see men work long get here between both life being under never "
    "day same another know while last might us great old year off come since against go came right used take three"
).split()

SCENARIOS = ("random", "chat", "intent", "reply", "intent-engine")
"""Scenarios ``shipyard bench`` runs directly; ``rollout`` is ``chat`` load while a rollout runs (see the CLI)."""

TOKEN_ID_RANGE = (1_000, 20_000)
"""Random prompt token ids come from here: valid in every vocabulary shipyard serves (SmolLM2 49k, Qwen2.5 151k)."""


@dataclass(frozen=True)
class RequestSpec:
    path: str
    body: dict[str, Any]
    stream: bool

    def encoded(self) -> bytes:
        return json.dumps(self.body).encode()


class Workload(Protocol):
    name: str

    def request(self, index: int) -> RequestSpec: ...


def _stream_fields(stream: bool) -> dict[str, Any]:
    return {"stream": True, "stream_options": {"include_usage": True}} if stream else {"stream": False}


@dataclass
class RandomWorkload:
    """Fixed input/output lengths. ``endpoint="completions"`` sends token ids (exact lengths, no chat template);
    ``"chat"`` sends ``input_tokens`` random words as one user message (the template adds its own few tokens)."""

    model: str
    input_tokens: int = 512
    output_tokens: int = 128
    endpoint: str = "chat"
    stream: bool = True
    seed: int = 0
    name: str = "random"

    def __post_init__(self) -> None:
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be chat or completions, not {self.endpoint!r}")
        if self.input_tokens < 1 or self.output_tokens < 1:
            raise ValueError("input and output lengths must be at least 1 token")

    def request(self, index: int) -> RequestSpec:
        rng = random.Random(self.seed * 1_000_003 + index)
        common = {"model": self.model, "max_tokens": self.output_tokens, "ignore_eos": True, "temperature": 0.0}
        if self.endpoint == "completions":
            prompt = [rng.randrange(*TOKEN_ID_RANGE) for _ in range(self.input_tokens)]
            return RequestSpec(
                "/v1/completions", {**common, "prompt": prompt, **_stream_fields(self.stream)}, self.stream
            )
        text = " ".join(rng.choice(_WORDS) for _ in range(self.input_tokens))
        body = {**common, "messages": [{"role": "user", "content": text}], **_stream_fields(self.stream)}
        return RequestSpec("/v1/chat/completions", body, self.stream)


@dataclass
class ChatWorkload:
    """Conversations of ``turns`` user turns, ``conversations`` of them open at a time; every request carries the
    shared system prompt (``system_tokens`` words) and its conversation's history so far, then a new question.
    Request ``i`` is turn ``(i // conversations) % turns`` of conversation ``i % conversations`` of the current
    group; once a group has had all its turns the next group begins with fresh conversations, so requests share
    prefixes the way a busy chat service does but no request is ever sent twice. ``first_turn_tokens``: words of
    each conversation's opening message (a pasted document or ticket history that every later turn repeats;
    default ``turn_tokens``)."""

    model: str
    system_tokens: int = 1024
    turn_tokens: int = 64
    output_tokens: int = 128
    conversations: int = 64
    turns: int = 4
    first_turn_tokens: int | None = None
    stream: bool = True
    seed: int = 0
    name: str = "chat"
    _system: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        sizes = (self.system_tokens, self.turn_tokens, self.output_tokens, self.conversations, self.turns)
        if min(*sizes, self.first_turn_tokens or 1) < 1:
            raise ValueError("chat workload sizes must be at least 1")
        rng = random.Random(self.seed)
        self._system = "You are a support assistant. " + " ".join(rng.choice(_WORDS) for _ in range(self.system_tokens))

    def _words(self, conversation: int, turn: int, role: str) -> str:
        rng = random.Random(f"{self.seed}/{conversation}/{turn}/{role}")
        count = self.turn_tokens if role == "user" else self.output_tokens
        if role == "user" and turn == 0 and self.first_turn_tokens:
            count = self.first_turn_tokens
        return " ".join(rng.choice(_WORDS) for _ in range(count))

    def request(self, index: int) -> RequestSpec:
        group, turn = divmod(index // self.conversations, self.turns)
        conversation = group * self.conversations + index % self.conversations
        messages: list[dict[str, str]] = [{"role": "system", "content": self._system}]
        for past in range(turn):
            messages.append({"role": "user", "content": self._words(conversation, past, "user")})
            messages.append({"role": "assistant", "content": self._words(conversation, past, "assistant")})
        messages.append({"role": "user", "content": self._words(conversation, turn, "user")})
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.output_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            **_stream_fields(self.stream),
        }
        return RequestSpec("/v1/chat/completions", body, self.stream)


@dataclass
class DatasetWorkload:
    """The task endpoints: ``/v1/intent`` with ``{"text"}`` or ``/v1/reply`` with ``{"messages", "template"}``,
    cycling through a task dataset (non-streaming JSON; end-to-end latency is what counts)."""

    name: str
    rows: list[dict[str, Any]]
    model: str | None = None
    decode: IntentDecode = IntentDecode.SHORTEST
    """``intent-engine`` only: the decode mode of the chat completions it sends."""
    vocabulary: Vocabulary | None = field(default=None, repr=False)
    """``intent-engine`` with ``shortest``: the server's vocabulary (None: stop strings, as the gateway does)."""
    labels: LabelSet = field(default_factory=load_labels, repr=False)

    def __post_init__(self) -> None:
        if self.name not in ("intent", "reply", "intent-engine"):
            raise ValueError(f"dataset workloads are intent, intent-engine or reply, not {self.name!r}")
        if not self.rows:
            raise ValueError(f"the {self.name} dataset has no rows")
        if self.name == "intent-engine" and not self.model:
            raise ValueError("the intent-engine scenario needs the engine's model name")

    @classmethod
    def from_file(
        cls,
        name: str,
        path: Path,
        model: str | None = None,
        decode: IntentDecode = IntentDecode.SHORTEST,
        vocabulary: Vocabulary | None = None,
    ) -> DatasetWorkload:
        """Rows of a task dataset (malformed lines are left out, as ``shipyard eval`` does)."""
        schema: type[IntentExample] | type[ReplyExample] = ReplyExample if name == "reply" else IntentExample
        examples = load_jsonl(path, schema).examples
        return cls(name, [e.model_dump() for e in examples], model, decode, vocabulary)

    def request(self, index: int) -> RequestSpec:
        row = self.rows[index % len(self.rows)]
        model = {"model": self.model} if self.model else {}
        if self.name == "intent-engine":
            labels = tuple(self.labels.labels)
            if self.decode is IntentDecode.SHORTEST and self.vocabulary is not None:
                body = first_token_body(
                    str(self.model), self.labels, row["text"], first_token_plan(labels, self.vocabulary)
                )
            else:
                plan = decode_plan(labels) if self.decode is not IntentDecode.FULL else None
                body = intent_body(str(self.model), self.labels, row["text"], plan)
            return RequestSpec("/v1/chat/completions", body, False)
        if self.name == "intent":
            return RequestSpec("/v1/intent", {"text": row["text"], **model}, False)
        body = {"messages": row["messages"], **({"template": row["template"]} if row.get("template") else {}), **model}
        return RequestSpec("/v1/reply", body, False)
