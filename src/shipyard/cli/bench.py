"""``shipyard bench``: streaming load against an OpenAI-compatible endpoint (closed or open loop)."""

from __future__ import annotations

import asyncio
import datetime
import sys
from pathlib import Path
from typing import Annotated

import httpx
import typer

from shipyard.bench.report import write_bench
from shipyard.bench.stream_load import LoadResult, Slo, parse_slo, run_closed_loop, run_open_loop
from shipyard.cli.app import app, fail

SCENARIOS = ("random",)


def _numbers(text: str | None, name: str) -> list[float]:
    if not text:
        return []
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise fail(f"--{name} must be a comma-separated list of numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise fail(f"--{name} values must be positive")
    return values


def _served_model(url: str, api_key: str) -> str:
    try:
        models = httpx.get(f"{url.rstrip('/')}/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
        models.raise_for_status()
        return str(models.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise fail(f"cannot list models at {url} (pass --model): {exc}") from None


@app.command()
def bench(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    api_key: Annotated[str, typer.Option("--api-key", envvar="SHIPYARD_API_KEY", help="API key.")],
    url: Annotated[str, typer.Option(help="Gateway or engine URL.")] = "http://127.0.0.1:8080",
    model: Annotated[str | None, typer.Option(help="Model (default: the first one served).")] = None,
    scenario: Annotated[str, typer.Option(help="Load shape: random (fixed output length, ignore_eos).")] = "random",
    concurrency: Annotated[str | None, typer.Option(help="Closed loop: comma list, e.g. 1,8,64.")] = None,
    rate: Annotated[str | None, typer.Option(help="Open loop: requests/s, comma list, e.g. 10,50.")] = None,
    arrival: Annotated[str, typer.Option(help="Open-loop arrivals: poisson or constant.")] = "poisson",
    duration: Annotated[float, typer.Option(min=1, help="Measured seconds per load level.")] = 30,
    warmup: Annotated[float, typer.Option(min=0, help="Closed loop: seconds excluded before measuring.")] = 2,
    max_tokens: Annotated[int, typer.Option(min=1, help="Output tokens per request.")] = 128,
    prompt_words: Annotated[int, typer.Option(min=1, help="Approximate prompt length in words.")] = 32,
    slo: Annotated[str | None, typer.Option(help="Goodput objective, e.g. ttft=200,e2e=2000 (ms).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the Poisson arrivals.")] = 0,
) -> None:
    """Measure TTFT, TPOT, end-to-end latency, throughput and goodput at each load level; failures stay counted."""
    if scenario not in SCENARIOS:
        raise fail(f"scenario {scenario!r} is not available yet; available: {', '.join(SCENARIOS)}")
    levels_c, levels_r = _numbers(concurrency, "concurrency"), _numbers(rate, "rate")
    if bool(levels_c) == bool(levels_r):
        raise fail("give exactly one of --concurrency LIST (closed loop) or --rate LIST (open loop)")
    if arrival not in ("poisson", "constant"):
        raise fail("--arrival must be poisson or constant")
    try:
        objective: Slo | None = parse_slo(slo) if slo else None
    except ValueError as exc:
        raise fail(str(exc)) from None
    model_name = model or _served_model(url, api_key)
    prompt = " ".join(["ship"] * prompt_words)
    results: list[LoadResult] = []
    for level in levels_c or levels_r:
        if levels_c:
            result = asyncio.run(
                run_closed_loop(
                    url,
                    api_key=api_key,
                    model=model_name,
                    concurrency=int(level),
                    max_tokens=max_tokens,
                    duration_s=duration,
                    warmup_s=warmup,
                    prompt=prompt,
                    slo=objective,
                )
            )
        else:
            result = asyncio.run(
                run_open_loop(
                    url,
                    api_key=api_key,
                    model=model_name,
                    rate=level,
                    max_tokens=max_tokens,
                    duration_s=duration,
                    arrival=arrival,
                    seed=seed,
                    prompt=prompt,
                    slo=objective,
                )
            )
        results.append(result)
        s = result.summary()
        typer.echo(
            f"{'c' if levels_c else 'rate'}={level:g}: {s['requests']} requests, {s['errors']} errors, "
            f"TTFT p50 {s['ttft_ms']['p50']:.1f} ms p99 {s['ttft_ms']['p99']:.1f} ms, "
            f"{s['output_tok_per_s']:.1f} tok/s, goodput {s['goodput']:.2f}/s"
        )
    meta = {
        "scenario": scenario,
        "url": url,
        "model": model_name,
        "max_tokens": max_tokens,
        "prompt_words": prompt_words,
        "slo": slo,
        "arrival": arrival if levels_r else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["shipyard", *sys.argv[1:]]),
    }
    write_bench(out, results, meta)
    typer.echo(f"wrote {out}/summary.json, requests.jsonl, report.md and plots")
