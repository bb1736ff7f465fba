"""The smallest quantized version that keeps quality: quantize with each scheme, evaluate each against its parent
on the same intent and reply examples, register them all with their evaluations, mark the smallest one whose
every task metric keeps at least ``min_keep`` of the parent's.

The decision (:func:`pick_smallest`) is a plain function over the evaluations; :func:`search` does the work:
``shipyard prepare quantize`` per scheme, then for the parent and each version a ``shipyard serve`` of it (vLLM
behind the gateway) and the evaluation through the gateway's task endpoints, as ``shipyard eval`` does.

>>> pick_smallest({"accuracy": 0.40}, [Candidate("w4a16", 117e6, {"accuracy": 0.39})], 0.95).chosen.version
'w4a16'
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS = {
    "intent": ("accuracy", "macro_f1"),
    "reply": ("mean_cosine", "schema_valid_rate"),
}
"""The task metrics a quantized version must keep (higher is better for each)."""


@dataclass
class Candidate:
    version: str
    size_bytes: float
    metrics: dict[str, float]
    """``task.metric`` (or a bare metric name) -> value."""


@dataclass
class Choice:
    chosen: Candidate | None
    keeps: dict[str, dict[str, float]] = field(default_factory=dict)
    """version -> metric -> what it keeps of the parent's (1.0 = as good)."""
    misses: dict[str, list[str]] = field(default_factory=dict)
    """version -> the metrics below the floor, each with by how much ("intent.accuracy 0.931 < 0.95")."""


def kept(value: float, parent: float) -> float:
    """The share of the parent's metric a version keeps; a parent at 0 is kept by anything."""
    return 1.0 if parent <= 0 else value / parent


def pick_smallest(parent: dict[str, float], candidates: Sequence[Candidate], min_keep: float) -> Choice:
    """The smallest candidate whose every metric keeps ≥ ``min_keep`` of the parent's (None when none does)."""
    choice = Choice(None)
    for candidate in sorted(candidates, key=lambda c: c.size_bytes):
        keeps = {m: round(kept(candidate.metrics.get(m, 0.0), v), 4) for m, v in parent.items()}
        choice.keeps[candidate.version] = keeps
        below = [f"{m} {k:.3f} < {min_keep:g}" for m, k in keeps.items() if k < min_keep]
        if below:
            choice.misses[candidate.version] = below
        elif choice.chosen is None:
            choice.chosen = candidate
    return choice


@dataclass
class Sample:
    """The examples every version is evaluated on (the same for the parent and each candidate)."""

    intent: Path
    reply: Path
    intent_n: int | None = None
    reply_n: int | None = None
    seed: int = 0


def evaluate_served(url: str, api_key: str, sample: Sample, embed: Callable[[list[str]], Any]) -> dict[str, float]:
    """Intent and reply metrics of whatever the gateway at ``url`` serves, on ``sample``."""
    from shipyard.evaluate.runner import gateway_client
    from shipyard.evaluate.tasks import evaluate_intent, evaluate_reply
    from shipyard.tasks import load_labels
    from shipyard.tasks.datasets import load_intent_dataset, load_reply_dataset

    intents = load_intent_dataset(sample.intent, load_labels(None).labels).examples
    replies = load_reply_dataset(sample.reply).examples
    rng = random.Random(sample.seed)
    if sample.intent_n is not None and sample.intent_n < len(intents):
        intents = rng.sample(intents, sample.intent_n)
    if sample.reply_n is not None and sample.reply_n < len(replies):
        replies = rng.sample(replies, sample.reply_n)

    async def run() -> dict[str, float]:
        async with gateway_client(url, api_key) as client:
            intent = await evaluate_intent(
                client, intents, labels=None, model=None, dataset=sample.intent, skipped=[], concurrency=4
            )
            reply = await evaluate_reply(
                client, replies, embed=embed, model=None, dataset=sample.reply, skipped=[], concurrency=4
            )
        found = {f"intent.{m}": float(intent.summary[m]) for m in METRICS["intent"]}
        found |= {f"reply.{m}": float(reply.summary[m]) for m in METRICS["reply"]}
        return found

    return asyncio.run(run())


class Served:
    """``shipyard serve --model REF`` in a scratch data dir, for the length of an evaluation."""

    def __init__(self, ref: str, models_dir: Path, port: int, log: Path) -> None:
        self.work = tempfile.TemporaryDirectory(prefix="shipyard-search-")
        self.url = f"http://127.0.0.1:{port}"
        self.key = "sk-search"
        env = {
            **os.environ,
            "SHIPYARD_DATA_DIR": self.work.name,
            "SHIPYARD_API_KEYS": self.key,
            "SHIPYARD_ADMIN_KEYS": "sk-search-admin",
        }
        folder = _folder_of(ref, models_dir)
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shipyard.cli", "serve", "--model", str(folder), "--port", str(port)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def __enter__(self) -> Served:
        from shipyard.engine.process import wait_until_ready

        try:
            wait_until_ready(self.proc, self.url, 900, str(Path(self.log.name)), poll_s=0.5)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        self.work.cleanup()


def _folder_of(ref: str, models_dir: Path) -> Path:
    from shipyard.prepare.registry import resolve_input

    folder, _ = resolve_input(ref, models_dir)
    return folder


def search(
    model: str,
    schemes: Sequence[str],
    *,
    models_dir: Path,
    quantize_one: Callable[[str, str], None],
    sample: Sample,
    min_keep: float,
    port: int,
    logs: Path,
    say: Callable[[str], None] = print,
    reevaluate_parent: bool = False,
) -> Choice:
    """Quantize ``model`` (a registered ``NAME[:VERSION]``) with each scheme (``quantize_one(scheme, ref)``
    registers ``NAME:<parent version>-<scheme>``), evaluate the parent and each version on ``sample``, record
    each evaluation and the decision in the manifests (``evals["search"]``), and return the decision.

    The parent's evaluation from an earlier search is reused when it was made on the same examples (same files,
    same digests, same sampling), unless ``reevaluate_parent``: a registered version's weights do not change
    (its manifest's checksums), and the parent's evaluation is the longest of the search's."""
    from shipyard.evaluate.embeddings import Embedder
    from shipyard.prepare.registry import Registry, parse_ref

    registry = Registry(models_dir)
    parent = registry.get(*parse_ref(model))
    refs = {scheme: f"{parent.name}:{parent.version}-{scheme}" for scheme in schemes}
    for scheme, ref in refs.items():
        say(f"quantizing {parent.ref} with {scheme} -> {ref} ...")
        quantize_one(scheme, ref)
    embedder = Embedder(None)
    logs.mkdir(parents=True, exist_ok=True)
    measured: dict[str, dict[str, float]] = {}
    record = _sample_record(sample)
    earlier = parent.evals.get("search") or {}
    reused = not reevaluate_parent and earlier.get("role") == "parent" and earlier.get("sample") == record
    if reused:
        measured[parent.ref] = {k: float(v) for k, v in earlier["metrics"].items()}
        say(f"{parent.ref}: its evaluation of {earlier.get('evaluated', '?')} on the same examples is reused")
    for ref in [r for r in [parent.ref, *refs.values()] if r not in measured]:
        say(f"evaluating {ref} (intent {sample.intent_n or 'all'}, reply {sample.reply_n or 'all'}) ...")
        with Served(ref, models_dir, port, logs / f"serve-{ref.replace(':', '-')}.log") as served:
            measured[ref] = evaluate_served(served.url, served.key, sample, embedder.encode)
        say(f"  {ref}: " + ", ".join(f"{k} {v:.3f}" for k, v in measured[ref].items()))
    candidates = [Candidate(ref, registry.get(*parse_ref(ref)).size_bytes, measured[ref]) for ref in refs.values()]
    choice = pick_smallest(measured[parent.ref], candidates, min_keep)
    basis = {"min_keep": min_keep, "parent": parent.ref, "sample": record}
    evaluated = earlier.get("evaluated") if reused else _now()
    registry.attach_eval(
        parent.ref, "search", {**basis, "metrics": measured[parent.ref], "role": "parent", "evaluated": evaluated}
    )
    for candidate in candidates:
        registry.attach_eval(
            candidate.version,
            "search",
            {
                **basis,
                "metrics": candidate.metrics,
                "keeps": choice.keeps[candidate.version],
                "misses": choice.misses.get(candidate.version, []),
                "chosen": choice.chosen is candidate,
            },
        )
    return choice


def _sample_record(sample: Sample) -> dict[str, Any]:
    return {
        "intent": str(sample.intent),
        "intent_sha256": hashlib.sha256(sample.intent.read_bytes()).hexdigest(),
        "intent_n": sample.intent_n,
        "reply": str(sample.reply),
        "reply_sha256": hashlib.sha256(sample.reply.read_bytes()).hexdigest(),
        "reply_n": sample.reply_n,
        "seed": sample.seed,
    }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
