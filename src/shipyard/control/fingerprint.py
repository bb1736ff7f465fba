"""Proof that an engine serves the weights it was told to load: its greedy answers to fixed probe prompts.

vLLM has open reports of ``reload_weights`` keeping stale or cached weights (vllm-project/vllm#32718, #48312), and
its ``/health`` says nothing about which weights are loaded. After an in-place reload, shipyard compares:

- the new fingerprint with the one recorded for the same checkpoint (a rollback, a restart): the greedy texts
  must be the same (texts, not log-probabilities: those move with numerical noise between runs);
- the new fingerprint with the one taken just before the reload, when the checkpoints' contents differ: the
  log-probabilities must differ somewhere (two different checkpoints never give identical ones to 1e-6).

Either mismatch fails the update, which then puts the previous weights back.

>>> mark = await take_fingerprint(client, "http://127.0.0.1:8001", "qwen")   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

PROBES = ("The capital of France is", "def fibonacci(n):\n   ", "Q: What is 17 * 23?\nA:")
PROBE_TOKENS = 8
SAME_LOGPROB = 1e-6


class WeightsMismatch(RuntimeError):
    """The engine's answers show it does not serve the checkpoint it was given."""


@dataclass(frozen=True)
class Fingerprint:
    texts: tuple[str, ...]
    logprobs: tuple[float, ...]

    def answers_like(self, other: Fingerprint) -> bool:
        return self.texts == other.texts

    def identical_to(self, other: Fingerprint) -> bool:
        return (
            self.texts == other.texts
            and len(self.logprobs) == len(other.logprobs)
            and all(abs(a - b) <= SAME_LOGPROB for a, b in zip(self.logprobs, other.logprobs, strict=True))
        )

    def to_record(self) -> dict[str, Any]:
        return {"texts": list(self.texts), "logprobs": list(self.logprobs)}

    @classmethod
    def from_record(cls, record: Any) -> Fingerprint | None:
        try:
            return cls(tuple(str(t) for t in record["texts"]), tuple(float(x) for x in record["logprobs"]))
        except (TypeError, KeyError, ValueError):
            return None


async def take_fingerprint(
    client: httpx.AsyncClient, url: str, model: str, timeout_s: float = 60.0
) -> Fingerprint | None:
    """Greedy answers (and their log-probabilities) to :data:`PROBES`; None when the engine cannot give them
    (no completions route, no log-probabilities): then nothing is checked."""
    body = {
        "model": model,
        "prompt": list(PROBES),
        "max_tokens": PROBE_TOKENS,
        "temperature": 0,
        "seed": 0,
        "logprobs": 1,
    }
    try:
        answer = await client.post(f"{url}/v1/completions", json=body, timeout=timeout_s)
        choices = sorted(answer.json()["choices"], key=lambda c: c.get("index", 0)) if answer.status_code == 200 else []
        texts = tuple(str(c["text"]) for c in choices)
        logprobs = tuple(float(x) for c in choices for x in (c.get("logprobs") or {}).get("token_logprobs") or [])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
    if len(texts) != len(PROBES) or not logprobs:
        return None
    return Fingerprint(texts, logprobs)


def checkpoint_digest(folder: str | os.PathLike[str], samples: int = 16, window: int = 65536) -> str:
    """A digest of a checkpoint's weight files that differs between two fine-tunes of one model: each file's
    size and ``samples`` windows spread over it (seconds for a 14B checkpoint, instead of hashing it whole)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            for i in range(samples):
                handle.seek(max(0, (size - window) * i // max(samples - 1, 1)))
                digest.update(handle.read(window))
    return digest.hexdigest()
