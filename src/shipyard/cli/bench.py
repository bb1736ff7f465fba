"""``shipyard bench``: load against an OpenAI-compatible endpoint or the task endpoints (closed or open loop,
sweeps, find-max, rollout under load) and ``shipyard bench compare``."""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import secrets
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from shipyard.bench.load import LoadResult, Slo, find_max, parse_slo, run_closed_loop, run_open_loop
from shipyard.bench.report import compare, compare_markdown, load_summary, write_bench
from shipyard.bench.resources import ResourceSampler
from shipyard.bench.scenarios import SCENARIOS, ChatWorkload, DatasetWorkload, RandomWorkload, Workload
from shipyard.cli.app import app, fail
from shipyard.router.health import tokenizer_roots
from shipyard.tasks.datasets import project_data
from shipyard.tasks.intent import IntentDecode, load_labels
from shipyard.tasks.vocab import UnsupportedVocabulary, Vocabulary

bench_app = typer.Typer(
    help="Load-test a gateway or engine: TTFT/TPOT/ITL/E2E percentiles, throughput, goodput, resources.",
    invoke_without_command=True,
)
app.add_typer(bench_app, name="bench")


FINAL_PHASES = ("done", "failed", "rolled_back", "canary")


def _numbers(text: str | None, name: str) -> list[float]:
    if not text:
        return []
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise fail(f"--{name} must be a comma-separated list of numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise fail(f"--{name} values must be positive")
    if name == "concurrency" and any(v != int(v) for v in values):
        raise fail("--concurrency values must be whole numbers")
    return values


def _model_cards(url: str, api_key: str) -> list[dict[str, Any]]:
    try:
        models = httpx.get(f"{url.rstrip('/')}/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
        models.raise_for_status()
        return list(models.json()["data"])
    except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
        raise fail(f"cannot list models at {url} (pass --model): {exc}") from None


def _served_model(url: str, api_key: str) -> str:
    cards = _model_cards(url, api_key)
    if not cards:
        raise fail(f"{url} serves no model yet (pass --model)")
    return str(cards[0]["id"])


def _engine_vocabulary(url: str, api_key: str, model: str) -> Vocabulary | None:
    """The vocabulary of the tokenizer folder the server lists for ``model``, as the gateway reads it."""
    root = tokenizer_roots(_model_cards(url, api_key)).get(model)
    try:
        if root is None:
            raise OSError(f"{url} lists no tokenizer folder (root) for {model!r}")
        return Vocabulary.from_folder(Path(root))
    except (OSError, UnsupportedVocabulary) as exc:
        typer.echo(f"intent-engine: stop-string decodes, as the gateway would send: {exc}")
        return None


def _workload(
    scenario: str, model: str, *, input_tokens: int, output_tokens: int, endpoint: str, stream: bool,
    system_tokens: int, turns: int, dataset: Path | None, seed: int, task_model: str | None,
    intent_decode: IntentDecode = IntentDecode.SHORTEST, vocabulary: Vocabulary | None = None,
    intent_labels: Path | None = None, conversations: int = 64, first_turn_words: int | None = None,
) -> Workload:  # fmt: skip
    try:
        if scenario == "random":
            return RandomWorkload(model, input_tokens, output_tokens, endpoint=endpoint, stream=stream, seed=seed)
        if scenario in ("chat", "rollout"):
            return ChatWorkload(
                model,
                system_tokens=system_tokens,
                turn_tokens=max(8, input_tokens // 8),
                output_tokens=output_tokens,
                turns=turns,
                conversations=conversations,
                first_turn_tokens=first_turn_words,
                stream=stream,
                seed=seed,
            )
        if scenario == "intent-engine":
            path = dataset or project_data("data/intent/test.jsonl")
            workload = DatasetWorkload.from_file(scenario, path, model, intent_decode, vocabulary)
            if intent_labels is not None:
                workload.labels = load_labels(intent_labels)
            return workload
        path = dataset or project_data(f"data/{scenario}/test.jsonl")
        return DatasetWorkload.from_file(scenario, path, task_model)
    except ValueError as exc:  # DatasetError and TaskConfigError included
        raise fail(str(exc)) from None


def _echo_level(result: LoadResult) -> None:
    s = result.summary()
    ttft = (
        f"TTFT p50 {s['ttft_ms']['p50']:.1f} ms p99 {s['ttft_ms']['p99']:.1f} ms, "
        if not math.isnan(s["ttft_ms"]["p50"])
        else ""
    )
    typer.echo(
        f"{result.label}: {s['requests']} requests, {s['errors']} errors, {ttft}"
        f"E2E p50 {s['e2e_ms']['p50']:.1f} ms p99 {s['e2e_ms']['p99']:.1f} ms, "
        f"{s['request_per_s']:.2f} req/s, {s['output_tok_per_s']:.1f} tok/s, goodput {s['goodput']:.2f}/s"
    )


def _measured(url: str, sample: bool, run: Callable[[], Coroutine[Any, Any, LoadResult]]) -> LoadResult:
    if not sample:
        return asyncio.run(run())
    with ResourceSampler(url) as sampler:
        result = asyncio.run(run())
    result.resources, result.timeline = sampler.summary(), sampler.samples
    return result


@bench_app.callback()
def bench(
    ctx: typer.Context,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (required).")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="SHIPYARD_API_KEY", help="API key.")] = None,
    url: Annotated[str, typer.Option(help="Gateway or engine URL.")] = "http://127.0.0.1:8080",
    model: Annotated[str | None, typer.Option(help="Model (default: the first one served).")] = None,
    scenario: Annotated[
        str, typer.Option(help="random, chat, intent, reply, intent-engine (intent straight to vLLM) or rollout.")
    ] = "random",
    concurrency: Annotated[str | None, typer.Option(help="Closed loop: comma list, e.g. 1,8,64.")] = None,
    rate: Annotated[str | None, typer.Option(help="Open loop: requests/s, comma list, e.g. 10,50.")] = None,
    arrival: Annotated[str, typer.Option(help="Open-loop arrivals: poisson or constant.")] = "poisson",
    duration: Annotated[float | None, typer.Option(min=0.1, help="Measured seconds per level [default: 30].")] = None,
    requests: Annotated[int | None, typer.Option(min=1, help="Measured requests per level (not --duration).")] = None,
    warmup: Annotated[float, typer.Option(min=0, help="Seconds of the same load before measuring.")] = 2,
    input_tokens: Annotated[int, typer.Option(min=1, help="random: prompt tokens; chat: 8x a turn's words.")] = 512,
    output_tokens: Annotated[int, typer.Option(min=1, help="Output tokens per request (ignore_eos).")] = 128,
    endpoint: Annotated[str, typer.Option(help="random: chat (words) or completions (token ids).")] = "chat",
    stream: Annotated[bool, typer.Option(help="Stream (TTFT/TPOT are measured only when streaming).")] = True,
    system_tokens: Annotated[int, typer.Option(min=1, help="chat: words of the shared system prompt.")] = 1024,
    turns: Annotated[int, typer.Option(min=1, help="chat: user turns per conversation.")] = 4,
    conversations: Annotated[
        int, typer.Option(min=1, help="chat: conversations open at a time (a turn of each before the next turns).")
    ] = 64,
    first_turn_words: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="chat: words of each conversation's opening message (a pasted document, a ticket's "
            "history) [default: a turn's words].",
        ),
    ] = None,
    dataset: Annotated[Path | None, typer.Option(help="intent/reply: JSONL (default: data/<task>/test.jsonl).")] = None,
    intent_decode: Annotated[
        IntentDecode,
        typer.Option(help="intent-engine: shortest (one token, else stop strings), stop-strings or full (the label)."),
    ] = IntentDecode.SHORTEST,
    intent_labels: Annotated[
        Path | None, typer.Option(help="intent-engine: labels YAML, as the gateway's intent_labels_file [packaged].")
    ] = None,
    slo: Annotated[str | None, typer.Option(help="Objective, e.g. ttft=200,e2e=2000 (ms).")] = None,
    find_max_level: Annotated[
        bool, typer.Option("--find-max", help="Search the highest level meeting --slo at P99 with no errors.")
    ] = False,
    max_level: Annotated[float, typer.Option(help="--find-max: highest level to try.")] = 1024,
    deploy: Annotated[str | None, typer.Option(help="rollout: what to deploy (folder, URL or LoRA folder).")] = None,
    deploy_version: Annotated[str | None, typer.Option(help="rollout: its version name.")] = None,
    canary: Annotated[float | None, typer.Option(help="rollout: canary percent.")] = None,
    lora: Annotated[bool, typer.Option(help="rollout: --deploy is a LoRA adapter to hot-load.")] = False,
    deploy_strategy: Annotated[
        str, typer.Option(help="rollout: auto, inplace or blue-green (as `shipyard deploy --strategy`).")
    ] = "auto",
    rollout_at: Annotated[float, typer.Option(min=0, help="rollout: seconds into the window to start it.")] = 5,
    admin_key: Annotated[str | None, typer.Option(envvar="SHIPYARD_ADMIN_KEY", help="rollout: admin key.")] = None,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds before one request counts as timed out.")] = 300,
    resources: Annotated[bool, typer.Option(help="Sample GPU (NVML) and server CPU/RSS (psutil).")] = True,
    seed: Annotated[
        int | None, typer.Option(help="Seed of prompts and arrivals [default: a new one per run, in summary.json].")
    ] = None,
) -> None:
    """Measure TTFT, TPOT, ITL, end-to-end latency, throughput and goodput at each load level; failures stay counted.

    Example: shipyard bench --url http://127.0.0.1:8080 --scenario chat --concurrency 1,8,64 --duration 30 -o out/
    """
    if ctx.invoked_subcommand is not None:
        return
    if out is None or api_key is None:
        raise fail("shipyard bench needs --out DIR and --api-key KEY (or SHIPYARD_API_KEY)")
    if scenario not in (*SCENARIOS, "rollout"):
        raise fail(f"unknown scenario {scenario!r}; choose from {', '.join((*SCENARIOS, 'rollout'))}")
    levels_c, levels_r = _numbers(concurrency, "concurrency"), _numbers(rate, "rate")
    if bool(levels_c) == bool(levels_r):
        raise fail("give exactly one of --concurrency LIST (closed loop) or --rate LIST (open loop)")
    if arrival not in ("poisson", "constant"):
        raise fail("--arrival must be poisson or constant")
    if duration is not None and requests is not None:
        raise fail("give --duration or --requests, not both")
    duration_s = 30.0 if duration is None and requests is None else duration
    try:
        objective: Slo | None = parse_slo(slo) if slo else None
    except ValueError as exc:
        raise fail(str(exc)) from None
    streaming = stream and scenario not in ("intent", "reply", "intent-engine")
    if objective and objective.ttft_ms is not None and not streaming:
        raise fail("a ttft SLO needs streaming; intent/reply and --no-stream runs measure end-to-end only (use e2e=)")
    if find_max_level and (objective is None or len(levels_c or levels_r) != 1):
        raise fail("--find-max needs --slo and one starting level (e.g. --concurrency 1 or --rate 10)")
    if scenario == "rollout" and (not deploy or not levels_c or len(levels_c) != 1 or requests is not None):
        raise fail("--scenario rollout needs --deploy TARGET, one --concurrency level and --duration")
    if seed is None:  # fresh prompts: a rerun must not be served from the prefix cache the last run filled
        seed = secrets.randbelow(2**31)
    model_name = model or _served_model(url, api_key)
    workload = _workload(
        scenario, model_name, input_tokens=input_tokens, output_tokens=output_tokens, endpoint=endpoint,
        stream=streaming, system_tokens=system_tokens, turns=turns, dataset=dataset, seed=seed, task_model=model,
        intent_decode=intent_decode,
        vocabulary=_engine_vocabulary(url, api_key, model_name)
        if scenario == "intent-engine" and intent_decode is IntentDecode.SHORTEST else None,
        intent_labels=intent_labels, conversations=conversations, first_turn_words=first_turn_words,
    )  # fmt: skip

    next_index = 0

    def measure(level: float) -> LoadResult:
        nonlocal next_index

        def closed() -> Coroutine[Any, Any, LoadResult]:
            return run_closed_loop(
                url, api_key=api_key, workload=workload, concurrency=int(level), duration_s=duration_s,
                requests=requests, warmup_s=warmup, slo=objective, timeout_s=timeout, progress=progress,
                first_index=next_index,
            )  # fmt: skip

        def opened() -> Coroutine[Any, Any, LoadResult]:
            return run_open_loop(
                url, api_key=api_key, workload=workload, rate=level, duration_s=duration_s, requests=requests,
                warmup_s=warmup, arrival=arrival, seed=seed, slo=objective, timeout_s=timeout, progress=progress,
                first_index=next_index,
            )  # fmt: skip

        result = _measured(url, resources, closed if levels_c else opened)
        next_index += result.sent
        _echo_level(result)
        return result

    def progress(line: str) -> None:
        typer.echo(line, err=True)

    extra: dict[str, Any] = {}
    events: list[dict[str, Any]] | None = None
    if scenario == "rollout":
        assert deploy is not None and duration_s is not None
        if not admin_key:
            raise fail("--scenario rollout needs --admin-key (or SHIPYARD_ADMIN_KEY)")
        result, rollout, events = _rollout_run(
            url, admin_key, deploy, deploy_version, canary, lora, deploy_strategy, rollout_at, warmup,
            lambda origin: _measured(url, resources, lambda: run_closed_loop(
                url, api_key=api_key, workload=workload, concurrency=int(levels_c[0]), duration_s=duration_s,
                warmup_s=warmup, slo=objective, timeout_s=timeout, progress=progress, origin=origin,
            )),
        )  # fmt: skip
        _echo_level(result)
        results = [result]
        extra["rollout"] = rollout
        extra["rollout_phase"] = rollout.get("phase")
    elif find_max_level:
        assert objective is not None
        start = (levels_c or levels_r)[0]
        best, results = find_max(
            measure, objective, start=start, limit=max_level, integer=bool(levels_c), progress=progress
        )
        name = "concurrency" if levels_c else "rate"
        extra["find_max"] = {"max_" + name: best, "slo": slo, "criterion": "P99 within the SLO and no errors"}
        extra["max_stable"] = f"{name} {best:g}" if best is not None else f"none: {name} {start:g} already misses it"
        typer.echo(f"max stable {extra['max_stable']} (SLO {slo} at P99, no errors)")
        results.sort(key=lambda r: r.rate if r.rate is not None else (r.concurrency or 0))
    else:
        results = [measure(level) for level in levels_c or levels_r]
    meta = {
        "scenario": scenario,
        "url": url,
        "model": model_name,
        "workload": {
            k: f"tokenizer sha256 {v.key[:12]}" if isinstance(v, Vocabulary) else v
            for k, v in vars(workload).items()
            if not k.startswith("_") and k not in ("rows", "labels")
        }
        | ({"intent_labels": str(intent_labels)} if intent_labels else {}),
        "seed": seed,
        "slo": slo,
        "arrival": arrival if levels_r else None,
        "warmup_s": warmup,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["shipyard", *sys.argv[1:]]),
    }
    runs = write_bench(out, results, meta, events=events, extra=extra)["runs"]
    typer.echo(f"wrote {out}/summary.json, requests.jsonl, report.md and plots")
    if all(run["requests"] == run["errors"] for run in runs):
        raise fail("every request failed: " + "; ".join(runs[0]["error_samples"]))


def _rollout_run(
    url: str, admin_key: str, target: str, version: str | None, canary: float | None, lora: bool, strategy: str,
    at_s: float, warmup: float, run_load: Callable[[float], LoadResult],
) -> tuple[LoadResult, dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    """Run the load; ``at_s`` into its window, start the rollout on the admin API and follow it to its end.
    Events (accepted, each phase) are returned on the load's clock."""
    import concurrent.futures

    headers = {"Authorization": f"Bearer {admin_key}"}
    base = url.rstrip("/")
    origin = time.perf_counter() + warmup

    def drive() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        time.sleep(max(0.0, origin + at_s - time.perf_counter()))
        posted = time.perf_counter() - origin
        body = {"target": target, "version": version, "canary_percent": canary, "lora": lora, "strategy": strategy}
        answer = httpx.post(base + "/admin/rollouts", json=body, headers=headers, timeout=60)
        if answer.status_code >= 400:
            return {"phase": "refused", "error": answer.text[:300]}, [{"at_s": posted, "label": "refused"}]
        while True:
            rollout: dict[str, Any] = httpx.get(base + "/admin/rollouts/current", headers=headers, timeout=30).json()
            if rollout["phase"] in FINAL_PHASES:
                break
            time.sleep(0.1)
        events = [{"at_s": posted, "label": "rollout posted"}]
        events += [{"at_s": posted + h["at_s"], "label": h["phase"]} for h in rollout["history"]]
        return rollout, events

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        driver = pool.submit(drive)
        result = run_load(origin)
        rollout, events = driver.result()
    return result, rollout, events


@bench_app.command("compare")
def compare_runs(
    run_a: Annotated[Path, typer.Argument(help="Run folder (or its summary.json): the baseline.")],
    run_b: Annotated[Path, typer.Argument(help="Run folder (or its summary.json) to compare with it.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Also write compare.json and compare.md here.")
    ] = None,
) -> None:
    """Side by side: each load level both runs measured, every headline metric, B's change relative to A."""
    try:
        a, b = load_summary(run_a), load_summary(run_b)
    except ValueError as exc:
        raise fail(str(exc)) from None
    rows = compare(a, b)
    if not rows:
        raise fail(f"{run_a} and {run_b} share no load level (one is a concurrency sweep, the other a rate sweep?)")
    table = compare_markdown(str(run_a), str(run_b), rows)
    typer.echo(table)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps({"a": str(run_a), "b": str(run_b), "rows": rows}, indent=2))
        (out / "compare.md").write_text(table + "\n")
