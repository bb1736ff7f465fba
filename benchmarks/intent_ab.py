"""Issue 13 on the lent GPU, side by side: /v1/intent straight to vLLM, through a one-process gateway and through
a gateway of several processes (``shipyard serve --workers``), interleaved in rounds at fixed rates.

One engine (campaign helpers: Qwen2.5-7B shape, dummy weights) and every gateway start once and stay up; each
round runs every target once per rate (``shipyard bench``, open loop), the order rotating from round to round, so
drift of the shared machine spreads over all targets alike. The result pools each target's requests over the
rounds (P50/P99 over every request) beside each round's own numbers and the gateway CPU ``shipyard bench``
sampled (the primary and its workers).

    python3 benchmarks/intent_ab.py --config bf16 --labels benchmarks/intent_labels_distinct.yaml \\
        --workers 1,2 --rates 200,300 --rounds 3 --duration 10 --out $OUT/intent-ab
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import psutil
from gpu_campaign import GATEWAY_PORT, bench, log, meta, start_engine, start_gateway, stop, write
from intent_ceiling import CONFIGS, Sampler
from intent_decode_cpu import intent_tokens

from shipyard.stats import percentile


def latencies(run_dir: Path) -> list[float]:
    """E2E ms of every measured, successful request of one bench run."""
    values = []
    for line in (run_dir / "requests.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["ok"] and row["started"] >= 0 and row["e2e_ms"] is not None:  # started < 0: the warm-up
            values.append(float(row["e2e_ms"]))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", choices=list(CONFIGS), default="bf16")
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--workers", default="1,2", help="one gateway per count, each on its own port")
    parser.add_argument("--rates", default="200,300")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", default="10")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=540,
        help="no round after the first starts past this many seconds (from start)",
    )
    args = parser.parse_args()
    out = args.out / args.config
    work = out / "work"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    engine = start_engine(work, args.config, **CONFIGS[args.config])
    results: dict[str, Any] = {
        **meta(f"intent_ab_{args.config}"),
        "config": args.config,
        "flags": CONFIGS[args.config],
        "labels": str(args.labels),
        "engine_start_s": round(time.monotonic() - started, 1),
        "rounds": [],
    }
    gateways: dict[str, Any] = {}
    urls = {"direct": engine.url}
    try:
        for i, count in enumerate(int(n) for n in args.workers.split(",")):
            port = GATEWAY_PORT + i
            env = {
                "SHIPYARD_WORKERS": str(count),
                "SHIPYARD_DATA_DIR": str(work / f"data-w{count}"),
                "SHIPYARD_INTENT_LABELS_FILE": str(args.labels.resolve()),
            }
            gateways[f"gateway-w{count}"] = start_gateway(work, engine.url, env=env, port=port)
            urls[f"gateway-w{count}"] = f"http://127.0.0.1:{port}"
            while len(psutil.Process(gateways[f"gateway-w{count}"].pid).children()) < count - 1:
                time.sleep(0.2)
        time.sleep(5)  # the serving workers' own start-up
        assert engine.pid is not None
        sampler = Sampler(engine.url, engine.pid, next(iter(gateways.values())).pid)
        load = ("--model", "qwen", "--duration", args.duration, "--warmup", "2", "--seed", "13")
        targets = list(urls)
        with sampler:
            for round_no in range(args.rounds):
                if round_no and time.monotonic() - started > args.budget_s:  # the first round always runs
                    log(f"round {round_no + 1} skipped: past the {args.budget_s:.0f} s budget")
                    break
                order = targets[round_no % len(targets) :] + targets[: round_no % len(targets)]
                runs = []
                for rate in args.rates.split(","):
                    for target in order:
                        scenario = ("--scenario", "intent-engine", "--intent-labels", str(args.labels.resolve()))
                        if target != "direct":
                            scenario = ("--scenario", "intent")
                            sampler.gateway(gateways[target].pid)
                        sampler.leg = f"{target}@{rate}"
                        run_dir = work / f"r{round_no + 1}" / target / rate
                        summary = bench(run_dir, urls[target], *load, *scenario, "--rate", rate)
                        runs.append({"target": target, "rate": float(rate), "dir": str(run_dir.relative_to(out)),
                                     "run": summary["runs"][0]})  # fmt: skip
                results["rounds"].append({"order": order, "runs": runs})
                write(out, "intent_ab.json", {**results, "sampled": sampler.by_leg()})
        pooled: dict[str, dict[str, Any]] = {}
        for round_ in results["rounds"]:
            for entry in round_["runs"]:
                key = f"{entry['target']}@{entry['rate']:g}"
                cell = pooled.setdefault(key, {"e2e_ms": [], "errors": 0, "requests": 0})
                cell["e2e_ms"] += latencies(out / entry["dir"])
                cell["errors"] += entry["run"]["errors"]
                cell["requests"] += entry["run"]["requests"]
        results["pooled"] = {
            key: {
                "requests": cell["requests"],
                "errors": cell["errors"],
                "p50_ms": round(percentile(cell["e2e_ms"], 50), 1),
                "p99_ms": round(percentile(cell["e2e_ms"], 99), 1),
            }
            for key, cell in pooled.items()
        }
        results["sampled"] = sampler.by_leg()
        results["gateway_intent_tokens"] = {t: intent_tokens(urls[t]) for t in gateways}
        write(out, "intent_ab.json", results)
    finally:
        for proc in gateways.values():
            stop(proc)
        engine.stop(30)
    log(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
