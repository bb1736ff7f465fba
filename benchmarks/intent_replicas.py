"""Issue 13 on the lent GPU, the way users run it: ``shipyard serve --replicas N --workers W`` starts N vLLM
engines for the model on the one GPU and the gateway in front of them; ``shipyard bench --scenario intent`` at
fixed rates, then ``--find-max`` for P99 ≤ 82 ms and ≤ 40 ms.

Campaign helpers (staged vLLM 0.26.0 kit, Qwen2.5-7B shape with dummy weights, 4k context); the sampler of
``intent_ceiling.py`` on every engine (vLLM's API servers, engine cores, their queues) and the gateway's
processes; vLLM's own histograms per run (``intent_ab.engine_totals``). Levels past ``--budget-s`` are skipped.

    python3 benchmarks/intent_replicas.py --replicas 2 --workers 2 --labels benchmarks/intent_labels_distinct.yaml \\
        --rates 200,400,500,600 --out $OUT/intent-replicas
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import httpx
from gpu_campaign import ADMIN, BASE_ARGS, GATEWAY_PORT, MAX_MODEL_LEN, MODEL, bench, log, meta, start_gateway, stop
from gpu_campaign import write as write_json
from intent_ab import engine_totals, engine_view
from intent_ceiling import Sampler, highest_rate_within
from intent_decode_cpu import intent_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--rates", default="200,400,500,600")
    parser.add_argument("--duration", default="10")
    parser.add_argument("--bounds", default="82,40", help="P99 bounds (ms) to find the highest rate for")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=540, help="no level starts past this (from start)")
    args = parser.parse_args()
    out = args.out / f"r{args.replicas}-w{args.workers}"
    work = out / "work"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env = {
        "SHIPYARD_ENGINE__REPLICAS": str(args.replicas),
        "SHIPYARD_WORKERS": str(args.workers),
        "SHIPYARD_ENGINE__MAX_MODEL_LEN": str(MAX_MODEL_LEN),
        "SHIPYARD_ENGINE__EXTRA_ARGS": json.dumps(list(BASE_ARGS)),
        "SHIPYARD_SERVED_MODEL_NAME": "qwen",
        "SHIPYARD_INTENT_LABELS_FILE": str(args.labels.resolve()),
    }
    gateway = start_gateway(work, None, env, model=MODEL)
    url = f"http://127.0.0.1:{GATEWAY_PORT}"
    time.sleep(5)  # the serving workers' own start-up
    described = httpx.get(f"{url}/admin/deployments", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    records = [r for d in described["deployments"].values() for r in d["replicas"]]
    engine_urls = [r["url"] for r in records]
    results: dict[str, Any] = {
        **meta(f"intent_replicas_{args.replicas}"),
        "replicas": args.replicas,
        "workers": args.workers,
        "labels": str(args.labels),
        "serve_env": env,
        "engines": [{k: r[k] for k in ("name", "url", "pid")} for r in records],
        "ready_s": round(time.monotonic() - started, 1),
        "runs": [],
        "find_max": {},
        "skipped": [],
    }
    log(f"shipyard serve with {len(records)} engines ready in {results['ready_s']:.0f} s")
    sampler = Sampler(engine_urls[0], records[0]["pid"], gateway.pid)
    for record in records[1:]:
        sampler.add_engine(record["url"], record["pid"])
    common = ("--model", "qwen", "--duration", args.duration, "--warmup", "2", "--seed", "13", "--scenario", "intent")

    def past_budget(leg: str) -> bool:
        if time.monotonic() - started > args.budget_s:
            results["skipped"].append(leg)
            log(f"skipped {leg}: past the {args.budget_s:.0f} s budget")
            return True
        return False

    try:
        with sampler:
            for rate in args.rates.split(","):
                if past_budget(f"rate-{rate}"):
                    break
                sampler.leg = f"rate-{rate}"
                before = engine_totals(engine_urls)
                summary = bench(work / f"rate-{rate}", url, *common, "--rate", rate)
                run = summary["runs"][0]
                results["runs"].append(
                    {"rate": float(rate), "run": run, "vllm": engine_view(before, engine_totals(engine_urls))}
                )
                write_json(out, "intent_replicas.json", {**results, "sampled": sampler.by_leg()})
            for bound in args.bounds.split(","):
                if past_budget(f"find-max-{bound}"):
                    continue
                start = f"{highest_rate_within([r['run'] for r in results['runs']], float(bound)) or 50:g}"
                sampler.leg = f"find-max-{bound}"
                load = ("--rate", start, "--find-max", "--slo", f"e2e={bound}", "--max-level", "3200")
                results["find_max"][bound] = bench(work / f"find-max-{bound}", url, *common, *load)
                write_json(out, "intent_replicas.json", {**results, "sampled": sampler.by_leg()})
        results["sampled"] = sampler.by_leg()
        results["gateway_intent_tokens"] = intent_tokens(url)
        write_json(out, "intent_replicas.json", results)
    finally:
        stop(gateway)
    log(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
