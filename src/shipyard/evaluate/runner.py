"""Send many task requests through the gateway with bounded concurrency, timing each one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Outcome:
    ok: bool
    status: int
    latency_ms: float
    body: dict[str, Any] | None
    error: str | None


def gateway_client(url: str, api_key: str, timeout_s: float = 300.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url.rstrip("/"),
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=httpx.Timeout(timeout_s, connect=10.0),
        limits=httpx.Limits(max_connections=None),
    )


async def post_all(
    client: httpx.AsyncClient,
    path: str,
    bodies: Sequence[dict[str, Any]],
    *,
    concurrency: int = 4,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """POST every body to ``path``; results keep the input order. Failures are outcomes, never dropped."""
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(body: dict[str, Any]) -> Outcome:
        async with gate:
            started = time.perf_counter()
            try:
                response = await client.post(path, json=body)
                latency = (time.perf_counter() - started) * 1000
                payload = response.json() if response.content else None
            except (httpx.HTTPError, ValueError) as exc:
                outcome = Outcome(
                    False, 0, (time.perf_counter() - started) * 1000, None, f"{type(exc).__name__}: {exc}"
                )
            else:
                error = None
                if response.status_code != 200:
                    message = payload.get("error", {}).get("message") if isinstance(payload, dict) else None
                    error = f"HTTP {response.status_code}: {message or response.text[:200]}"
                outcome = Outcome(
                    error is None, response.status_code, latency, payload if isinstance(payload, dict) else None, error
                )
            if on_done:
                on_done(outcome)
            return outcome

    return list(await asyncio.gather(*(one(body) for body in bodies)))


async def read_prefix_cache(metrics_url: str) -> dict[str, float] | None:
    """vLLM's prefix-cache counters (queries and hits, in tokens) from an engine's /metrics, or None."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with httpx.AsyncClient(timeout=10) as client:
            text = (await client.get(metrics_url)).text
    except httpx.HTTPError:
        return None
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):
            found[family.name.split("_")[-1]] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return found if len(found) == 2 else None


def prefix_cache_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any] | None:
    if before is None or after is None:
        return None
    queries = after["queries"] - before["queries"]
    hits = after["hits"] - before["hits"]
    return {
        "queries_tokens": queries,
        "hits_tokens": hits,
        "hit_rate": hits / queries if queries else None,
        "before": before,
        "after": after,
    }
