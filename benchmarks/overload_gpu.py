"""Overload on the lent GPU (issue 37's last line): ``/v1/intent`` through ``shipyard serve`` in front of one vLLM
engine, below, past and again below the engine's capacity in one open-loop schedule, with the gateway's admission
limit and without it, side by side in one call.

The engine (campaign helpers: Qwen2.5-7B shape, dummy weights, ``--config`` of ``intent_ceiling``) starts once;
each variant starts its own gateway (``--workers``), warms it, runs the schedule (``--low`` x ``--capacity`` req/s
for ``--before`` s, ``--high`` x capacity for ``--overload`` s, ``--low`` x capacity for ``--after`` s; constant
arrivals, ``shipyard.bench.load.run_arrivals``), stops it and lets the engine idle ``--rest`` s. The variant
without a limit runs last (a backlog it leaves in the engine's front end would reach the next one). Also
``direct``: the same schedule straight to the engine (the one-token chat completion the gateway sends).

    python3 benchmarks/overload_gpu.py --config bf16 --labels benchmarks/intent_labels_distinct.yaml \
        --capacity 500 --variants adaptive,direct,none --out $OUT/overload

Writes overload.json (per variant: the gateway's admission settings, the summary of ``shipyard.bench.overload``,
the gateway's admission metrics) and requests-VARIANT.jsonl.gz (every request).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import time
from pathlib import Path
from typing import Any

import httpx
from gpu_campaign import KEY, ROOT, log, meta, start_engine, start_gateway, stop, wait_for_workers, write
from intent_ceiling import CONFIGS

from shipyard.bench.load import run_arrivals
from shipyard.bench.overload import Phase, overload_summary, phased_offsets
from shipyard.bench.scenarios import DatasetWorkload
from shipyard.cli.bench import _engine_vocabulary
from shipyard.tasks.intent import IntentDecode, load_labels

DATASET = ROOT / "data/intent/test.jsonl"


def admission_env(variant: str, args: argparse.Namespace) -> dict[str, str]:
    """The gateway's admission settings of one variant: ``adaptive``, a number (a fixed limit) or ``none``."""
    if variant == "none":
        return {}
    return {
        "SHIPYARD_ADMISSION__MAX_IN_FLIGHT": variant,
        "SHIPYARD_ADMISSION__QUEUE_SIZE": str(args.queue_size),
        "SHIPYARD_ADMISSION__QUEUE_TIMEOUT_S": str(args.queue_timeout_ms / 1000),
    }


def run_variant(args: argparse.Namespace, variant: str, engine_url: str, work: Path, port: int) -> dict[str, Any]:
    phases = [
        Phase("before", args.low * args.capacity, args.before),
        Phase("overload", args.high * args.capacity, args.overload),
        Phase("after", args.low * args.capacity, args.after),
    ]
    offsets, _ = phased_offsets(phases)
    gateway = None
    if variant == "direct":
        vocabulary = _engine_vocabulary(engine_url, KEY, "qwen")  # the one-token decode, as the gateway sends it
        url = engine_url
        workload = DatasetWorkload.from_file("intent-engine", DATASET, "qwen", IntentDecode.SHORTEST, vocabulary)
        workload.labels = load_labels(args.labels)
    else:
        env = {
            "SHIPYARD_WORKERS": str(args.workers),
            "SHIPYARD_DATA_DIR": str(work / f"data-{variant}"),
            "SHIPYARD_INTENT_LABELS_FILE": str(args.labels.resolve()),
            **admission_env(variant, args),
        }
        gateway = start_gateway(work, engine_url, env=env, port=port)
        wait_for_workers(gateway, args.workers)
        time.sleep(3)
        url, workload = f"http://127.0.0.1:{port}", DatasetWorkload.from_file("intent", DATASET)
    try:
        warm = [(i * 0.01) for i in range(200)]  # 2 s at 100 req/s: connections and code paths warm
        asyncio.run(run_arrivals(url, api_key=KEY, workload=workload, offsets=warm, origin_in_s=0.1, timeout_s=60))
        log(f"{variant}: {len(offsets)} requests over {sum(p.duration_s for p in phases):.0f} s")
        records = asyncio.run(
            run_arrivals(url, api_key=KEY, workload=workload, offsets=offsets, origin_in_s=0.2, timeout_s=120)
        )
        metrics = "" if gateway is None else httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        if gateway is not None:
            stop(gateway)
    summary = overload_summary(records, phases)
    rows = [r.row() for r in sorted(records, key=lambda r: r.scheduled or 0.0)]
    with gzip.open(args.out / f"requests-{variant}.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    log(f"{variant}: {json.dumps(summary)}")
    return {
        "variant": variant,
        "admission": admission_env(variant, args),
        "workers": 0 if gateway is None else args.workers,
        "summary": summary,
        "gateway_metrics": [line for line in metrics.splitlines() if line.startswith("shipyard_admission_")],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", choices=list(CONFIGS), default="bf16")
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--capacity", type=float, default=500.0, help="the engine's capacity, req/s")
    parser.add_argument("--low", type=float, default=0.5)
    parser.add_argument("--high", type=float, default=1.5)
    parser.add_argument("--before", type=float, default=5.0)
    parser.add_argument("--overload", type=float, default=10.0)
    parser.add_argument("--after", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2, help="gateway processes (shipyard serve --workers)")
    parser.add_argument("--variants", default="adaptive,direct,none", help="adaptive, N (a fixed limit), none, direct")
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--queue-timeout-ms", type=float, default=50.0)
    parser.add_argument("--rest", type=float, default=5.0, help="seconds the engine idles between variants")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    engine = start_engine(work, args.config, **dict(CONFIGS[args.config]))
    report: dict[str, Any] = {
        **meta(f"overload_gpu_{args.config}"),
        "load": {k: str(v) for k, v in vars(args).items()},
        "engine_start_s": round(time.monotonic() - started, 1),
        "variants": [],
    }
    try:
        for n, variant in enumerate(args.variants.split(",")):
            if n:
                time.sleep(args.rest)
            report["variants"].append(run_variant(args, variant, engine.url, work, 8080 + n))
            write(args.out, "overload.json", report)
    finally:
        engine.stop(30)
    log(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
