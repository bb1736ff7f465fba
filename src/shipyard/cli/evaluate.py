"""``shipyard eval intent|reply|compare``"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from shipyard.cli.app import app, fail, settings_from
from shipyard.evaluate import DatasetError, load_intent_dataset, load_reply_dataset
from shipyard.evaluate.report import compare_runs, write_run
from shipyard.evaluate.runner import Outcome, gateway_client
from shipyard.evaluate.tasks import EvalRun, evaluate_intent, evaluate_reply
from shipyard.prepare.registry import Registry, RegistryError, parse_ref
from shipyard.tasks import load_labels
from shipyard.tasks.config import TaskConfigError

eval_app = typer.Typer(help="Offline evaluation of a served model through the gateway.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

Dataset = Annotated[Path, typer.Option("--dataset", "-d", help="JSONL dataset.")]
Url = Annotated[str, typer.Option(help="Gateway URL.")]
ApiKey = Annotated[str, typer.Option("--api-key", envvar="SHIPYARD_API_KEY", help="Gateway API key.")]
Model = Annotated[str | None, typer.Option(help="Model to evaluate (default: the only one served).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder (summary.json, report.md, plots).")]
Concurrency = Annotated[int, typer.Option(min=1, max=256, help="Requests in flight at once.")]
Strict = Annotated[bool, typer.Option(help="Reject the dataset on its first malformed line instead of skipping.")]
Register = Annotated[
    str | None, typer.Option(help="Attach the summary to this registered version's manifest (NAME:VERSION).")
]


def _registered(ref: str | None) -> Registry | None:
    """The registry holding ``ref``, checked before the run starts (a typo fails in a second, not after it)."""
    if ref is None:
        return None
    registry = Registry(settings_from(None).models_dir)
    try:
        registry.get(*parse_ref(ref))
    except RegistryError as exc:
        raise fail(f"--register {ref}: {exc}") from None
    return registry


def _attach(registry: Registry | None, ref: str | None, task: str, run: EvalRun, out: Path, keys: list[str]) -> None:
    if registry is None or ref is None:
        return
    s = run.summary
    summary = {k: s[k] for k in [*keys, "n", "errors"]} | {"latency_ms": s["latency_ms"], "run": str(out)}
    registry.attach_eval(ref, task, summary)
    typer.echo(f"attached the {task} summary to {ref}")


def _run_with_progress(total: int, job: Callable[[Callable[[Outcome], None]], EvalRun]) -> EvalRun:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("errors {task.fields[errors]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("evaluating", total=total, errors=0)
        errors = 0

        def advance(outcome: Outcome) -> None:
            nonlocal errors
            errors += not outcome.ok
            progress.update(task, advance=1, errors=errors)

        return job(advance)


def _report(run: EvalRun, out: Path, keys: list[str]) -> None:
    """Write the run, print its headline; exit 1 if not a single request succeeded (files are still written)."""
    write_run(out, run)
    s = run.summary
    parts = [f"{k}={s[k]:.3f}" if isinstance(s[k], float) else f"{k}={s[k]}" for k in keys]
    lat = s["latency_ms"]
    typer.echo(
        f"{' '.join(parts)} p50={lat['p50']:.1f}ms p90={lat['p90']:.1f}ms p99={lat['p99']:.1f}ms "
        f"errors={s['errors']} n={s['n']}"
    )
    for line in s["skipped_lines"]:
        typer.echo(f"skipped {line}", err=True)
    if s.get("prefix_cache") and s["prefix_cache"]["hit_rate"] is not None:
        typer.echo(f"engine prefix-cache hit rate during the run: {s['prefix_cache']['hit_rate']:.3f}")
    typer.echo(f"wrote {out}/summary.json, report.md, predictions.jsonl and plots")
    if s["errors"] == s["n"]:
        raise fail(f"every request failed, e.g. {s['error_samples'][0]}")


@eval_app.command("intent")
def eval_intent(
    dataset: Dataset,
    api_key: ApiKey,
    out: Out,
    labels: Annotated[Path | None, typer.Option(help="Labels YAML (default: the gateway's own label set).")] = None,
    url: Url = "http://127.0.0.1:8080",
    model: Model = None,
    concurrency: Concurrency = 4,
    strict: Strict = False,
    register: Register = None,
    engine_metrics: Annotated[
        str | None, typer.Option(help="An engine's /metrics URL: report its prefix-cache hit rate for the run.")
    ] = None,
) -> None:
    """Classify every line of an intent dataset via POST /v1/intent; accuracy, macro-F1, latency."""
    registry = _registered(register)
    try:
        label_set = load_labels(labels)
        data = load_intent_dataset(dataset, label_set.labels, strict=strict)
    except (TaskConfigError, DatasetError) as exc:
        raise fail(str(exc)) from None

    async def job(on_done: Callable[[Outcome], None]) -> EvalRun:
        async with gateway_client(url, api_key) as client:
            return await evaluate_intent(
                client,
                data.examples,
                labels=label_set.labels if labels else None,
                model=model,
                dataset=dataset,
                skipped=data.skipped,
                concurrency=concurrency,
                engine_metrics=engine_metrics,
                on_done=on_done,
            )

    run = _run_with_progress(len(data.examples), lambda on_done: asyncio.run(job(on_done)))
    _report(run, out, ["accuracy", "macro_f1"])
    _attach(registry, register, "intent", run, out, ["accuracy", "macro_f1"])


@eval_app.command("reply")
def eval_reply(
    dataset: Dataset,
    api_key: ApiKey,
    out: Out,
    url: Url = "http://127.0.0.1:8080",
    model: Model = None,
    template: Annotated[str | None, typer.Option(help="Template for every line (default: the line's own).")] = None,
    concurrency: Concurrency = 4,
    strict: Strict = False,
    register: Register = None,
    embedding_model: Annotated[
        str | None, typer.Option(help="sentence-transformers model folder (default: all-MiniLM-L6-v2, offline).")
    ] = None,
) -> None:
    """Ask POST /v1/reply for every conversation; cosine similarity to the reference, pass rate at 0.85."""
    registry = _registered(register)
    try:
        data = load_reply_dataset(dataset, strict=strict)
    except DatasetError as exc:
        raise fail(str(exc)) from None
    from shipyard.evaluate.embeddings import Embedder

    try:
        embedder = Embedder(embedding_model)
    except (RuntimeError, OSError, ValueError) as exc:
        raise fail(f"cannot load the embedding model: {exc}") from None

    async def job(on_done: Callable[[Outcome], None]) -> EvalRun:
        async with gateway_client(url, api_key) as client:
            return await evaluate_reply(
                client,
                data.examples,
                embed=embedder.encode,
                model=model,
                dataset=dataset,
                skipped=data.skipped,
                template=template,
                concurrency=concurrency,
                on_done=on_done,
            )

    run = _run_with_progress(len(data.examples), lambda on_done: asyncio.run(job(on_done)))
    _report(run, out, ["pass_rate_085", "mean_cosine", "schema_valid_rate"])
    _attach(registry, register, "reply", run, out, ["pass_rate_085", "mean_cosine", "schema_valid_rate"])


@eval_app.command("compare")
def eval_compare(
    runs: Annotated[list[Path], typer.Argument(help="Output folders of `shipyard eval` runs.")],
    out: Out,
) -> None:
    """Side-by-side table and plots of several evaluation runs (e.g. base vs merged vs quantized)."""
    try:
        result = compare_runs(runs, out)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise fail(str(exc)) from None
    typer.echo(result["table"])
    typer.echo(f"wrote {out}/compare.md, compare.json and plots")
