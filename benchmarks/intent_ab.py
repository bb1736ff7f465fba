"""Issue 13 on the lent GPU, side by side: /v1/intent straight to vLLM, through gateways of one or several
processes (``shipyard serve --workers``) and through a gateway in front of several engines on the same GPU,
interleaved in rounds at fixed rates.

The engines (campaign helpers: Qwen2.5-7B shape, dummy weights; ``--engines 2`` starts a second one on the same GPU,
each then given ``--gpu-memory-utilization`` of 0.44) and every gateway start once and stay up; each round runs
every target once per rate (``shipyard bench``, open loop), the order rotating from round to round, so drift of the
shared machine spreads over all targets alike. Targets: ``direct`` (``--scenario intent-engine`` straight to the
first engine), ``gateway-wN`` (``shipyard serve --workers N`` in front of the first engine) and ``gateway-wN-eM``
(the same in front of the first M engines as replicas). The result pools each target's requests over the rounds
(P50/P99 over every request) beside each round's own numbers, the CPU the sampler saw (vLLM's API servers, engine
cores, the gateway's processes) and, per run, what vLLM's own histograms say of the same requests (mean time
queued, in prefill, from arrival to the end inside vLLM; engine steps and tokens per step), which splits the
client's latency into the engine's loop and everything before and after it. ``--profile TARGET@RATE`` records the
first engine's API server and engine core (and the gateway's processes) with py-spy during that run of round 1.

    python3 benchmarks/intent_ab.py --config bf16 --labels benchmarks/intent_labels_distinct.yaml --engines 2 \
        --targets direct,gateway-w2,gateway-w2-e2 --rates 200,300,400 --rounds 2 --duration 10 --out $OUT/intent-ab
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from gpu_campaign import (
    ENGINE_PORT,
    GATEWAY_PORT,
    bench,
    log,
    meta,
    start_engine,
    start_gateway,
    stop,
    wait_for_workers,
    write,
)
from intent_ceiling import CONFIGS, Sampler
from intent_decode_cpu import intent_tokens
from prometheus_client.parser import text_string_to_metric_families

from shipyard.stats import percentile

HISTOGRAMS = (
    "vllm:e2e_request_latency_seconds",
    "vllm:time_to_first_token_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:iteration_tokens_total",
)
COUNTERS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:prompt_tokens", "vllm:request_success")
TARGET = re.compile(r"^(direct|gateway-w(\d+)(?:-e(\d+))?)$")


def latencies(run_dir: Path) -> list[float]:
    """E2E ms of every measured, successful request of one bench run."""
    values = []
    for line in (run_dir / "requests.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["ok"] and row["started"] >= 0 and row["e2e_ms"] is not None:  # started < 0: the warm-up
            values.append(float(row["e2e_ms"]))
    return values


def engine_totals(urls: list[str]) -> dict[str, float]:
    """Sums and counts of vLLM's latency histograms and its prefix-cache and token counters, added up over the
    engines at ``urls`` (prometheus_client's parser: label sets, the ``_total`` suffix, histograms' samples)."""
    totals: dict[str, float] = {}
    with httpx.Client(timeout=10) as http:
        for url in urls:
            response = http.get(f"{url}/metrics")
            if response.status_code != 200:  # not a vLLM server (a test's fake engine)
                continue
            for family in text_string_to_metric_families(response.text):
                for sample in family.samples:
                    name = sample.name
                    if any(name in (h + "_sum", h + "_count") for h in HISTOGRAMS) or any(
                        name in (c, c + "_total") for c in COUNTERS
                    ):
                        key = name.removesuffix("_total") if not name.endswith(("_sum", "_count")) else name
                        totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def engine_view(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """What vLLM measured of one run's requests: mean ms per histogram, steps, tokens per step, prefix hits."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}

    def mean(histogram: str, scale: float = 1000.0) -> float | None:
        count = delta.get(histogram + "_count", 0.0)
        return round(delta.get(histogram + "_sum", 0.0) / count * scale, 2) if count else None

    queries = delta.get("vllm:prefix_cache_queries", 0.0)
    return {
        "requests": delta.get("vllm:request_success", 0.0),
        "e2e_mean_ms": mean("vllm:e2e_request_latency_seconds"),
        "ttft_mean_ms": mean("vllm:time_to_first_token_seconds"),
        "queue_mean_ms": mean("vllm:request_queue_time_seconds"),
        "prefill_mean_ms": mean("vllm:request_prefill_time_seconds"),
        "steps": delta.get("vllm:iteration_tokens_total_count", 0.0),
        "tokens_per_step": mean("vllm:iteration_tokens_total", 1.0),
        "prompt_tokens_per_request": (
            round(delta.get("vllm:prompt_tokens", 0.0) / delta["vllm:request_success"], 1)
            if delta.get("vllm:request_success")
            else None
        ),
        "prefix_hit_rate": round(delta.get("vllm:prefix_cache_hits", 0.0) / queries, 3) if queries else None,
    }


def profile(out: Path, procs: dict[str, list[psutil.Process]], seconds: float) -> list[subprocess.Popen[bytes]]:
    """py-spy (when installed) records each process for ``seconds`` as collapsed stacks, without pausing it."""
    if shutil.which("py-spy") is None:
        log("py-spy not found: no profile")
        return []
    out.mkdir(parents=True, exist_ok=True)
    started = []
    for role, group in procs.items():
        for proc in group[:2]:
            target = out / f"{role}-{proc.pid}.txt"
            command = ["py-spy", "record", "--nonblocking", "-r", "100", "-d", str(int(seconds)), "-f", "raw"]
            command += ["-o", str(target), "-p", str(proc.pid)]
            started.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(f"{target}.log", "wb")))  # noqa: SIM115
    return started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", choices=list(CONFIGS), default="bf16")
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--engines", type=int, default=1, help="engines on the one GPU (replicas behind -eM)")
    parser.add_argument(
        "--targets",
        default="direct,gateway-w1,gateway-w2",
        help="direct, gateway-wN (N gateway processes, first engine), gateway-wN-eM (the first M engines)",
    )
    parser.add_argument("--rates", default="200,300")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", default="10")
    parser.add_argument("--profile", default="", help="TARGET@RATE to record with py-spy in round 1")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--gateway-env",
        default="",
        help="KEY=VALUE,... set on every gateway (e.g. SHIPYARD_ADMISSION__MAX_IN_FLIGHT=adaptive)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=540,
        help="no round after the first starts past this many seconds (from start)",
    )
    args = parser.parse_args()
    targets = args.targets.split(",")
    for target in targets:
        match = TARGET.match(target)
        if not match:
            parser.error(f"target {target!r} is not direct, gateway-wN or gateway-wN-eM")
        if int(match.group(3) or 1) > args.engines:
            parser.error(f"target {target!r} needs {match.group(3)} engines; --engines is {args.engines}")
    out = args.out / args.config
    work = out / "work"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    flags = dict(CONFIGS[args.config])
    if args.engines > 1:
        flags["gpu_memory_utilization"] = round(0.88 / args.engines, 2)
    engines = []
    for n in range(args.engines):  # one after the other: the second finds the first's compiled graphs cached
        name = args.config if n == 0 else f"{args.config}-e{n + 1}"
        engines.append(start_engine(work, name, port=ENGINE_PORT + n, **flags))
    results: dict[str, Any] = {
        **meta(f"intent_ab_{args.config}"),
        "config": args.config,
        "flags": flags,
        "engines": args.engines,
        "labels": str(args.labels),
        "engine_start_s": round(time.monotonic() - started, 1),
        "gateway_env": args.gateway_env,
        "rounds": [],
    }
    gateways: dict[str, Any] = {}
    urls = {"direct": engines[0].url}
    engine_urls = {"direct": [engines[0].url]}
    try:
        for i, target in enumerate(t for t in targets if t != "direct"):
            match = TARGET.match(target)
            assert match is not None
            count, replicas = int(match.group(2)), int(match.group(3) or 1)
            port = GATEWAY_PORT + i
            env = {
                "SHIPYARD_WORKERS": str(count),
                "SHIPYARD_DATA_DIR": str(work / f"data-{target}"),
                "SHIPYARD_INTENT_LABELS_FILE": str(args.labels.resolve()),
                **dict(pair.split("=", 1) for pair in args.gateway_env.split(",") if pair),
            }
            upstreams = [e.url for e in engines[:replicas]]
            gateways[target] = start_gateway(work, upstreams, env=env, port=port)
            urls[target], engine_urls[target] = f"http://127.0.0.1:{port}", upstreams
            wait_for_workers(gateways[target], count)
        time.sleep(5)  # the serving workers' own start-up
        assert engines[0].pid is not None
        sampler = Sampler(
            engines[0].url, engines[0].pid, next(iter(gateways.values())).pid if gateways else engines[0].pid
        )
        for engine in engines[1:]:
            assert engine.pid is not None
            sampler.add_engine(engine.url, engine.pid)
        load = ("--model", "qwen", "--duration", args.duration, "--warmup", "2", "--seed", "13")
        with sampler:
            for round_no in range(args.rounds):
                if round_no and time.monotonic() - started > args.budget_s:  # the first round always runs
                    log(f"round {round_no + 1} skipped: past the {args.budget_s:.0f} s budget")
                    break
                order = targets[round_no % len(targets) :] + targets[: round_no % len(targets)]
                runs = []
                for rate in args.rates.split(","):
                    for target in order:
                        scenario: tuple[str, ...] = (
                            "--scenario",
                            "intent-engine",
                            "--intent-labels",
                            str(args.labels.resolve()),
                        )
                        if target != "direct":
                            scenario = ("--scenario", "intent")
                            sampler.gateway(gateways[target].pid)
                        sampler.leg = f"{target}@{rate}"
                        run_dir = work / f"r{round_no + 1}" / target / rate
                        spies = []
                        if round_no == 0 and args.profile == f"{target}@{rate}":
                            procs = {k: v for k, v in sampler.procs.items() if k != "gateway" or target != "direct"}
                            spies = profile(out / "profile", procs, float(args.duration) + 2)
                        before = engine_totals(engine_urls[target])
                        summary = bench(run_dir, urls[target], *load, *scenario, "--rate", rate)
                        for spy in spies:
                            spy.wait(30)
                        runs.append({"target": target, "rate": float(rate), "dir": str(run_dir.relative_to(out)),
                                     "run": summary["runs"][0],
                                     "vllm": engine_view(before, engine_totals(engine_urls[target]))})  # fmt: skip
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
                "mean_ms": round(sum(cell["e2e_ms"]) / len(cell["e2e_ms"]), 1),
            }
            for key, cell in pooled.items()
        }
        results["sampled"] = sampler.by_leg()
        results["gateway_intent_tokens"] = {t: intent_tokens(urls[t]) for t in gateways}
        write(out, "intent_ab.json", results)
    finally:
        for proc in gateways.values():
            stop(proc)
        for engine in engines:
            engine.stop(30)
    log(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
