"""The two offline evaluations: intent classification and complaint replies, through the gateway."""

from __future__ import annotations

import datetime
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from shipyard.evaluate.metrics import PASS_THRESHOLD, classification_report, cosine, reply_report
from shipyard.evaluate.runner import Outcome, post_all, prefix_cache_delta, read_prefix_cache
from shipyard.stats import summarize
from shipyard.tasks.datasets import IntentExample, ReplyExample


@dataclass
class EvalRun:
    summary: dict[str, Any]
    predictions: list[dict[str, Any]]


def _common(
    outcomes: list[Outcome], started: float, model: str | None, url: str, dataset: Path, skipped: list[str]
) -> dict[str, Any]:
    ok_latencies = [o.latency_ms for o in outcomes if o.ok]
    served = {str(o.body.get("model")) for o in outcomes if o.ok and o.body}
    wall = time.perf_counter() - started
    return {
        "latency_ms": {k: round(v, 2) for k, v in summarize(ok_latencies).items()},
        "errors": sum(not o.ok for o in outcomes),
        "error_samples": sorted({o.error for o in outcomes if o.error})[:5],
        "requests_per_s": round(len(outcomes) / wall, 3) if wall else None,
        "wall_s": round(wall, 2),
        "model": model or (served.pop() if len(served) == 1 else None),
        "url": url,
        "dataset": str(dataset),
        "skipped_lines": skipped,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


async def evaluate_intent(
    client: httpx.AsyncClient,
    examples: list[IntentExample],
    *,
    labels: list[str] | None,
    model: str | None,
    dataset: Path,
    skipped: list[str],
    concurrency: int = 4,
    engine_metrics: str | None = None,
    on_done: Callable[[Outcome], None] | None = None,
) -> EvalRun:
    """Classify every example through ``POST /v1/intent``; ``labels`` None uses the gateway's own label set."""
    bodies: list[dict[str, Any]] = []
    for example in examples:
        body: dict[str, Any] = {"text": example.text}
        if labels is not None:
            body["labels"] = labels
        if model is not None:
            body["model"] = model
        bodies.append(body)
    before = await read_prefix_cache(engine_metrics) if engine_metrics else None
    started = time.perf_counter()
    outcomes = await post_all(client, "/v1/intent", bodies, concurrency=concurrency, on_done=on_done)
    after = await read_prefix_cache(engine_metrics) if engine_metrics else None

    predicted = [str(o.body["intent"]) if o.ok and o.body else None for o in outcomes]
    gold = [e.label for e in examples]
    summary = classification_report(gold, predicted)
    lenient = sum(p in (e.label, e.alt_label) for e, p in zip(examples, predicted, strict=True))
    summary["accuracy_lenient"] = lenient / len(examples)
    by_tag: dict[str, list[bool]] = defaultdict(list)
    for example, prediction in zip(examples, predicted, strict=True):
        for tag in [*example.tags, *(["ambiguous"] if example.ambiguous else [])]:
            by_tag[tag].append(prediction == example.label)
    summary["accuracy_by_tag"] = {tag: sum(v) / len(v) for tag, v in sorted(by_tag.items())}
    summary.update(_common(outcomes, started, model, str(client.base_url), dataset, skipped))
    summary["task"] = "intent"
    summary["prefix_cache"] = prefix_cache_delta(before, after)
    predictions = [
        {
            "text": e.text,
            "label": e.label,
            "predicted": p,
            "correct": p == e.label,
            "latency_ms": round(o.latency_ms, 2),
            "status": o.status,
            "error": o.error,
            "tags": e.tags,
            "ambiguous": e.ambiguous,
        }
        for e, p, o in zip(examples, predicted, outcomes, strict=True)
    ]
    return EvalRun(summary, predictions)


async def evaluate_reply(
    client: httpx.AsyncClient,
    examples: list[ReplyExample],
    *,
    embed: Callable[[list[str]], list[list[float]]],
    model: str | None,
    dataset: Path,
    skipped: list[str],
    template: str | None = None,
    concurrency: int = 4,
    threshold: float = PASS_THRESHOLD,
    on_done: Callable[[Outcome], None] | None = None,
) -> EvalRun:
    """Ask ``POST /v1/reply`` for each conversation; score each reply by cosine similarity to its reference."""
    bodies: list[dict[str, Any]] = []
    for example in examples:
        body: dict[str, Any] = {"messages": [t.model_dump() for t in example.messages]}
        chosen = template or example.template
        if chosen:
            body["template"] = chosen
        if model is not None:
            body["model"] = model
        bodies.append(body)
    started = time.perf_counter()
    outcomes = await post_all(client, "/v1/reply", bodies, concurrency=concurrency, on_done=on_done)
    replies = [str(o.body["reply"]) if o.ok and o.body else None for o in outcomes]
    scored = [i for i, r in enumerate(replies) if r is not None]
    vectors = embed([replies[i] or "" for i in scored] + [examples[i].reference for i in scored])
    cosines: list[float | None] = [None] * len(examples)
    for k, i in enumerate(scored):
        cosines[i] = round(cosine(vectors[k], vectors[len(scored) + k]), 4)
    summary = reply_report(cosines, threshold)
    summary.update(_common(outcomes, started, model, str(client.base_url), dataset, skipped))
    summary["task"] = "reply"
    predictions = [
        {
            "reply": r,
            "reference": e.reference,
            "cosine": c,
            "passed": c is not None and c >= threshold,
            "summary": o.body.get("summary") if o.ok and o.body else None,
            "latency_ms": round(o.latency_ms, 2),
            "status": o.status,
            "error": o.error,
        }
        for e, r, c, o in zip(examples, replies, cosines, outcomes, strict=True)
    ]
    return EvalRun(summary, predictions)
