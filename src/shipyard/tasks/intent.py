"""Intent classification as a constrained-choice chat request.

The prompt puts the fixed instructions and the label descriptions first and the customer's text last, so
vLLM's prefix cache reuses everything but the text. vLLM's structured outputs (``choice``) guarantee the answer
is one of the labels.

Label probabilities are opt-in (``"scores": true``). The first answer token's logprobs cannot give them: under
the ``choice`` constraint the model spells labels in short pieces ("l", "ost", ...), so labels share first
tokens. Instead each label is scored as the assistant's reply (``continue_final_message`` + ``prompt_logprobs``,
one request per label, all sharing the cached prompt prefix) and the sequence likelihoods are normalised.

Shortest decode (``IntentDecode.SHORTEST``, the default): under greedy decoding with the ``choice`` constraint the
label is known as soon as the generated text is a prefix of one label only, usually after the first token; the
rest of the label's tokens are engine steps spent for nothing. ``decode_plan`` gives each label its shortest
such prefix; the request stops at any of them (vLLM ``stop`` strings, kept in the output), whatever spelling the
model picks under the constraint, and ``max_tokens`` is the longest of those prefixes in bytes (no token of a
byte-level vocabulary is shorter than a byte), so no spelling is cut before it decides. The served model's
tokenizer is not needed: the stop strings end the request at the first token that completes a decisive prefix,
one token for the packaged labels when the model spells them as its tokenizer would.
``decide_label`` maps the text to its label; where it cannot (a label that is a prefix of another, a stop string
seen inside a longer label) the caller continues with full decoding, so the answer is always the one full
decoding gives: the same prompt, the same greedy path, only cut where the label is already decided.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shipyard.tasks.config import TaskConfigError, packaged, read_yaml_mapping
from shipyard.tasks.vocab import Vocabulary

MAX_LABELS = 64
FULL_MAX_TOKENS = 128
"""``max_tokens`` of a full decode: room for the longest label requests may bring (100 characters) spelled a
byte per token, and the end of the answer."""


class IntentDecode(str, Enum):
    """How a classification is decoded; all three give the same label.

    ``shortest``: one token, from the tokens that may start an answer under the constraint, when the served model's
    vocabulary is readable (``first_token_plan``), else as ``stop-strings``; ``stop-strings``: the constrained
    answer, stopped once decided (``decode_plan``); ``full``: the whole label (the old path, for comparison).
    """

    SHORTEST = "shortest"
    STOP_STRINGS = "stop-strings"
    FULL = "full"


@dataclass(frozen=True)
class LabelSet:
    """Labels in order, each with an optional one-line description."""

    descriptions: Mapping[str, str]

    @property
    def labels(self) -> list[str]:
        return list(self.descriptions)

    @classmethod
    def from_names(cls, names: Sequence[str]) -> LabelSet:
        return cls({name: "" for name in names})


def load_labels(path: Path | None = None) -> LabelSet:
    """Read a labels YAML (``label: one-line description``); None means the packaged support-desk set."""
    source = path or packaged("intent_labels.yaml")
    data = read_yaml_mapping(source)
    descriptions: dict[str, str] = {}
    for label, description in data.items():
        if not isinstance(label, str) or not label.strip() or "\n" in label:
            raise TaskConfigError(f"{source}: label {label!r} must be a non-empty one-line string")
        if description is not None and not isinstance(description, str):
            raise TaskConfigError(f"{source}: description of {label!r} must be a string")
        descriptions[label.strip()] = (description or "").strip()
    if len(descriptions) < 2:
        raise TaskConfigError(f"{source}: an intent set needs at least 2 labels")
    return LabelSet(descriptions)


def _intent_schema(schema: dict[str, Any]) -> None:
    """What the validators below check, in the JSON schema too: a text with something in it; labels on one line,
    without surrounding spaces, distinct."""
    visible = r"[^\s\x1c-\x1f\x85]"  # not whitespace for Python's str.strip() either
    schema["properties"]["text"]["pattern"] = visible
    labels = schema["properties"]["labels"]["anyOf"][0]
    labels["uniqueItems"] = True
    labels["items"] = {"type": "string", "minLength": 1, "maxLength": 100, "pattern": f"^{visible}(?:.*{visible})?$"}


class IntentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_intent_schema)

    text: str = Field(min_length=1, max_length=4000)
    labels: list[str] | None = Field(default=None, min_length=2, max_length=MAX_LABELS)
    model: str | None = None
    scores: bool = False
    """Also return a probability per label (one extra, prefix-cached request per label)."""

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        cleaned = [label.strip() for label in value]
        if any(not label or len(label) > 100 or "\n" in label for label in cleaned):
            raise ValueError("each label must be a non-empty single line of at most 100 characters")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("labels must be distinct")
        return cleaned

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text must not be blank")
        return value


class IntentResponse(BaseModel):
    intent: str
    scores: dict[str, float] | None
    model: str
    latency_ms: float


SYSTEM_PROMPT = (
    "You classify messages sent to the customer-support desk of a bank and online shop. "
    "Answer with exactly one label from the list below: the one that best matches what the customer wants."
)


def system_prompt(labels: LabelSet) -> str:
    lines = [SYSTEM_PROMPT, "", "Labels:"]
    for label, description in labels.descriptions.items():
        lines.append(f"- {label}: {description}" if description else f"- {label}")
    return "\n".join(lines)


@dataclass(frozen=True)
class DecodePlan:
    """Where a shortest decode of one label set stops: at any of ``stop`` (each label's shortest decisive
    prefix), within ``max_tokens``."""

    stop: tuple[str, ...]
    max_tokens: int


def decisive_prefix(label: str, labels: Sequence[str]) -> str | None:
    """The shortest prefix of ``label`` that no other label starts with; None when ``label`` is itself a prefix
    of another label (then only the end of the answer decides it)."""
    others = [other for other in labels if other != label]
    for end in range(1, len(label) + 1):
        prefix = label[:end]
        if not any(other.startswith(prefix) for other in others):
            return prefix
    return None


def _first_cut(label: str, stops: Mapping[str, str]) -> int | None:
    """Where spelling ``label`` first completes one of the other labels' stop strings (None: never)."""
    ends = [label.find(stop) + len(stop) for owner, stop in stops.items() if owner != label and stop in label]
    return min(ends, default=None)


@functools.lru_cache(maxsize=256)
def decode_plan(labels: tuple[str, ...]) -> DecodePlan:
    """The shortest-decode plan of a label set (cached by the set: the default one and those requests bring).

    Each label's stop string starts as its decisive prefix and grows while it would cut another label short
    (``"a"`` of "account" inside "card"); one that cannot grow any more is dropped, and its label is decided by
    the end of the answer. So with any spelling every answer ends decided, at its own label's stop string.

    >>> decode_plan(("lost_card", "activate_card", "account_access"))
    DecodePlan(stop=('l', 'act', 'acc'), max_tokens=3)
    >>> decode_plan(("card", "card_payment", "account"))
    DecodePlan(stop=('card_', 'ac'), max_tokens=5)
    """
    stops = {label: prefix for label in labels if (prefix := decisive_prefix(label, labels)) is not None}
    changed = True
    while changed:
        changed = False
        for label in labels:
            cut = _first_cut(label, stops)
            # a label with a stop string is decided when it reaches it; one without only by the end of the answer
            if cut is None or (cut >= len(stops[label]) if label in stops else cut > len(label)):
                continue
            owner = next(o for o, stop in stops.items() if o != label and label.find(stop) + len(stop) == cut)
            if len(stops[owner]) < len(owner):
                stops[owner] = owner[: len(stops[owner]) + 1]
            else:
                del stops[owner]
            changed = True
    budget = max(len(stops[label].encode()) if label in stops else len(label.encode()) + 1 for label in labels)
    return DecodePlan(tuple(stops[label] for label in labels if label in stops), min(budget, FULL_MAX_TOKENS))


@dataclass(frozen=True)
class FirstTokenPlan:
    """A one-token classification for one label set and vocabulary: ``allowed`` are the tokens the ``choice``
    constraint lets an answer start with."""

    vocabulary: str
    allowed: tuple[int, ...]


@functools.lru_cache(maxsize=256)
def first_token_plan(labels: tuple[str, ...], vocabulary: Vocabulary) -> FirstTokenPlan:
    """Greedy decoding under ``choice`` takes the likeliest of the tokens whose bytes begin a label (what vLLM's
    grammar backend allows first); ``allowed_token_ids`` with those tokens and ``max_tokens: 1`` gets the same
    token without the grammar. When one label only starts with it, the constraint can only finish that label
    (``decide_first_token``); otherwise the caller continues with the constrained decode.

    >>> vocab = Vocabulary.from_tokens("t", [(0, b"re"), (1, b"refund"), (2, b"return"), (3, b"x"), (4, b"r")])
    >>> first_token_plan(("refund", "return_item"), vocab)
    FirstTokenPlan(vocabulary='t', allowed=(0, 1, 2, 4))
    """
    allowed: set[int] = set()
    for label in labels:
        spelled = label.encode()
        for end in range(1, len(spelled) + 1):
            allowed.update(vocabulary.ids_of(spelled[:end]))
    return FirstTokenPlan(vocabulary.key, tuple(sorted(allowed)))


def first_token_body(model: str, labels: LabelSet, text: str, plan: FirstTokenPlan) -> dict[str, Any]:
    """The one-token chat-completions body of a classification (same prompt as ``intent_body``, no grammar)."""
    return {
        "model": model,
        "messages": _messages(labels, text),
        "temperature": 0,
        "max_tokens": 1,
        "allowed_token_ids": list(plan.allowed),
    }


def decide_first_token(labels: LabelSet, completion: Mapping[str, Any]) -> str | None:
    """The label a one-token answer decides, or None (several labels start with it; a token cut inside a
    character): continue with a constrained decode."""
    text = str(completion["choices"][0]["message"].get("content") or "")
    matching = [label for label in labels.labels if label.startswith(text)] if text else []
    return matching[0] if len(matching) == 1 else None


def _messages(labels: LabelSet, text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system_prompt(labels)}, {"role": "user", "content": text}]


def intent_body(model: str, labels: LabelSet, text: str, plan: DecodePlan | None = None) -> dict[str, Any]:
    """The chat-completions body for one classification (greedy, constrained to the labels): the whole label,
    or with ``plan`` only until it is decided."""
    body: dict[str, Any] = {
        "model": model,
        "messages": _messages(labels, text),
        "temperature": 0,
        "max_tokens": FULL_MAX_TOKENS,
        "structured_outputs": {"choice": labels.labels},
    }
    if plan is not None:
        body["max_tokens"] = plan.max_tokens
        if plan.stop:
            body.update(stop=list(plan.stop), include_stop_str_in_output=True)
    return body


def score_bodies(model: str, labels: LabelSet, text: str) -> list[dict[str, Any]]:
    """One request per label that returns the log-likelihood of the label as the assistant's answer."""
    body = intent_body(model, labels, text)
    return [
        {
            "model": model,
            "messages": [*body["messages"], {"role": "assistant", "content": label}],
            "continue_final_message": True,
            "add_generation_prompt": False,
            "max_tokens": 1,
            "prompt_logprobs": 0,
            "return_token_ids": True,
        }
        for label in labels.labels
    ]


class IntentAnswerError(ValueError):
    """The engine's answer is not one of the labels (it should never be: structured outputs constrain it)."""


def parse_intent(labels: LabelSet, completion: Mapping[str, Any]) -> str:
    answer = str(completion["choices"][0]["message"].get("content") or "").strip()
    if answer not in labels.descriptions:
        raise IntentAnswerError(f"engine answered {answer[:80]!r}, which is not one of the labels")
    return answer


def decide_label(labels: LabelSet, completion: Mapping[str, Any]) -> str | None:
    """The label a shortest decode's answer decides, or None when it is still open (continue with a full decode).

    The answer is a prefix of what full decoding would have generated; one label starting with it is the label
    full decoding ends at. An answer that ended on its own (no stop string, not cut by ``max_tokens``) is whole.
    """
    choice = completion["choices"][0]
    text = str(choice["message"].get("content") or "")
    if choice.get("finish_reason") == "stop" and choice.get("stop_reason") is None:
        return parse_intent(labels, completion)
    matching = [label for label in labels.labels if label.startswith(text)] if text else []
    if len(matching) != 1:
        if not any(label.startswith(text) for label in labels.labels):
            raise IntentAnswerError(f"engine answered {text[:80]!r}, which does not begin any of the labels")
        return None
    return matching[0]


def label_probabilities(labels: Sequence[str], scored: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Normalised label likelihoods from the per-label ``prompt_logprobs`` answers (same order as ``labels``).

    The labels' token sequences share the prompt; everything after their common prefix is the label itself.
    """
    token_lists = [list(answer["prompt_token_ids"]) for answer in scored]
    common = 0
    while all(len(tokens) > common for tokens in token_lists) and len({t[common] for t in token_lists}) == 1:
        common += 1
    loglik: list[float] = []
    for answer, tokens in zip(scored, token_lists, strict=True):
        entries = answer["prompt_logprobs"]
        total = 0.0
        for position in range(common, len(tokens)):
            entry = entries[position] or {}
            total += float(entry[str(tokens[position])]["logprob"])
        loglik.append(total)
    peak = max(loglik)
    weights = [math.exp(value - peak) for value in loglik]
    norm = sum(weights)
    return {label: round(weight / norm, 4) for label, weight in zip(labels, weights, strict=True)}
