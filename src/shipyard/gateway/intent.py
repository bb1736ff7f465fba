"""How the gateway decodes one classification: one token where it can, the constrained label where it must.

``shortest`` (the default) sends the one-token request of ``first_token_plan`` when every ready replica of the
model loaded the same readable tokenizer (its folder is the ``root`` vLLM lists in ``/v1/models``, read here in a
thread the first time); an answer that does not decide the label, a replica with another tokenizer, or a model
whose vocabulary cannot be read here continue as ``stop-strings``: the constrained answer, stopped once decided,
and a full decode when that still leaves it open. Every path ends at the label full decoding gives.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shipyard.gateway.errors import OpenAIError
from shipyard.gateway.proxy import Proxy
from shipyard.gateway.sse import usage_tokens
from shipyard.router.replica import Replica
from shipyard.tasks.intent import (
    FirstTokenPlan,
    IntentAnswerError,
    IntentDecode,
    LabelSet,
    decide_first_token,
    decide_label,
    decode_plan,
    first_token_body,
    first_token_plan,
    intent_body,
    parse_intent,
)
from shipyard.tasks.vocab import UnsupportedVocabulary, Vocabulary

log = logging.getLogger("shipyard.gateway")


def _completion_tokens(answer: dict[str, Any]) -> int:
    usage = answer.get("usage")
    return usage_tokens(usage)[1] if isinstance(usage, dict) else 0


@dataclass
class Vocabularies:
    """Tokenizer folders -> their vocabulary, each read once in a thread; ``get`` never waits for a read."""

    loaded: dict[str, Vocabulary | None] = field(default_factory=dict)
    _reading: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def get(self, folder: str) -> Vocabulary | None:
        if folder in self.loaded:
            return self.loaded[folder]
        if folder not in self._reading:
            self._reading[folder] = asyncio.get_running_loop().create_task(self._read(folder))
        return None

    async def _read(self, folder: str) -> None:
        try:
            self.loaded[folder] = await asyncio.to_thread(Vocabulary.from_folder, Path(folder))
            log.info("intent: one-token classification for the tokenizer of %s", folder)
        except (OSError, UnsupportedVocabulary) as exc:
            self.loaded[folder] = None
            log.info("intent: no one-token classification for %s (%s); stop strings instead", folder, exc)
        finally:
            del self._reading[folder]


@dataclass
class Classifier:
    """The decoding of ``/v1/intent`` and ``/predict`` over a proxy (``label_of``)."""

    proxy: Proxy
    decode: IntentDecode = IntentDecode.SHORTEST
    vocabularies: Vocabularies = field(default_factory=Vocabularies)
    refused: dict[str, set[str]] = field(default_factory=dict)
    """Model -> the request fields its engine refused (``allowed_token_ids``, ``stop``): said once, then not sent."""

    def _vocabulary_of(self, replica: Replica, upstream: str) -> Vocabulary | None:
        root = replica.roots.get(upstream)
        return self.vocabularies.get(root) if root else None

    def _first_token_plan(self, model: str, labels: LabelSet) -> FirstTokenPlan | None:
        if self.decode is not IntentDecode.SHORTEST or "allowed_token_ids" in self.refused.get(model, ()):
            return None
        upstream = self.proxy.pool.upstream_model(model)
        serving = [r for r in self.proxy.pool.ready() if upstream in r.models]
        vocabularies = {self._vocabulary_of(r, upstream) for r in serving}
        if len(vocabularies) != 1 or None in vocabularies:
            return None  # not read yet, unreadable, or replicas with different tokenizers (a rollout)
        (vocabulary,) = vocabularies
        assert vocabulary is not None
        return first_token_plan(tuple(labels.labels), vocabulary)

    async def _call(self, model: str, body: dict[str, Any], field_name: str) -> tuple[Replica, dict[str, Any]] | None:
        """One engine call; None when the engine refuses ``field_name`` (remembered for the model)."""
        try:
            return await self.proxy.call_json(model, body)
        except OpenAIError as exc:
            if exc.status != 400 or field_name not in exc.message:
                raise
            self.refused.setdefault(model, set()).add(field_name)
            log.warning(
                "the engine of %r refused %r (%s); /v1/intent no longer sends it there%s",
                model,
                field_name,
                exc.message[:200],
                ": start vLLM with VLLM_MAX_STOP_STRINGS=64" if field_name == "stop" else "",
            )
            return None

    async def label_of(self, model: str, labels: LabelSet, text: str) -> tuple[Replica, str]:
        """(replica, label) of one classification. Counts the output tokens it took, by the path that gave the
        label (``first_token``, ``stop_strings``, ``full``; ``failed`` when none did)."""
        tokens, path = 0, "failed"
        upstream = self.proxy.pool.upstream_model(model)
        try:
            plan = self._first_token_plan(model, labels)
            if plan is not None:
                body = first_token_body(model, labels, text, plan)
                if answered := await self._call(model, body, "allowed_token_ids"):
                    replica, answer = answered
                    tokens += _completion_tokens(answer)
                    vocabulary = self._vocabulary_of(replica, upstream)
                    intent = decide_first_token(labels, answer)
                    if intent is not None and vocabulary is not None and vocabulary.key == plan.vocabulary:
                        path = "first_token"
                        return replica, intent
            if self.decode is not IntentDecode.FULL and "stop" not in self.refused.get(model, ()):
                body = intent_body(model, labels, text, decode_plan(tuple(labels.labels)))
                if answered := await self._call(model, body, "stop"):
                    replica, answer = answered
                    tokens += _completion_tokens(answer)
                    if (intent := decide_label(labels, answer)) is not None:
                        path = "stop_strings"
                        return replica, intent
            replica, answer = await self.proxy.call_json(model, intent_body(model, labels, text))
            tokens += _completion_tokens(answer)
            intent = parse_intent(labels, answer)
            path = "full"
            return replica, intent
        except (IntentAnswerError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise OpenAIError(502, f"invalid answer from the engine: {exc}", code="invalid_engine_answer") from None
        finally:
            self.proxy.metrics.intent_output_tokens.labels(self.decode.value, path).observe(tokens)
