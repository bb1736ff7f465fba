"""Issue 13 on the lent GPU: the highest /v1/intent rate whose P99 stays within 82 ms and 40 ms, through the
gateway and straight to vLLM in the same run, for one engine configuration per call.

Uses the campaign's helpers (staged vLLM 0.26.0 kit, Qwen2.5-7B shape with dummy weights, ``shipyard serve`` as
users run it, ``shipyard bench`` as the load). Per configuration: one engine, one gateway (``intent.decode``
shortest, the default: one token), then open-loop rate sweeps of ``--scenario intent`` (gateway) and
``--scenario intent-engine`` (the same first chat completion straight to vLLM), the stop-string and full decodes
straight to vLLM at 200 req/s for comparison, and ``--find-max --slo e2e=82`` and ``e2e=40`` through the gateway;
legs that would start past ``--budget-s`` are skipped (and listed). ``--workers 1,2`` sweeps the gateway once per
process count (``shipyard serve --workers``), find-max on the count that went highest. A sampler records, every
0.25 s, vLLM's running/waiting requests and the CPU of vLLM's API server, its engine core and the gateway, so the
bottleneck at the ceiling can be named; ``shipyard bench`` itself reports its achieved rate, send lag and CPU.

    bash .gpu/bin/stage.sh && source .gpu/bin/env.sh && export PYTHONPATH=$PWD/src:$PYTHONPATH
    python3 benchmarks/intent_ceiling.py --config bf16    --out $OUT/intent
    python3 benchmarks/intent_ceiling.py --config latency --out $OUT/intent
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from gpu_campaign import (
    BASE_ARGS,
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
from intent_decode_cpu import intent_tokens

from shipyard.engine.spec import PROFILE_OVERRIDES, Profile

API_SERVERS_4 = {"extra_args": (*BASE_ARGS, "--api-server-count", "4")}
CONFIGS: dict[str, dict[str, Any]] = {
    "bf16": {},
    "latency": dict(PROFILE_OVERRIDES[Profile.LATENCY]),  # FP8 weights, prefix caching, 2,048-token chunks
    "bf16-api4": API_SERVERS_4,  # four vLLM API server processes in front of the one engine core
    "latency-api4": {**PROFILE_OVERRIDES[Profile.LATENCY], **API_SERVERS_4},
}
OVERLOADED_MS = 1000.0
"""A sweep stops after the first level whose P99 passes this (the queue only grows from there)."""


class Sampler:
    """vLLM's queue and the serving processes' CPU, sampled on a thread; ``mark`` names the leg that runs."""

    def __init__(self, engine_url: str, engine_pid: int, gateway_pid: int, every_s: float = 0.25) -> None:
        self.engine_urls, self.every_s = [engine_url], every_s
        self.procs: dict[str, list[psutil.Process]] = {"vllm_api_server": [], "vllm_engine_core": []}
        self._add_engine_processes(engine_pid)
        self.gateway(gateway_pid)
        self.samples: list[dict[str, Any]] = []
        self.leg = "-"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _add_engine_processes(self, pid: int) -> None:
        api = psutil.Process(pid)
        children = api.children(recursive=True)
        core = [c for c in children if "EngineCore" in " ".join([c.name(), *c.cmdline()])]
        self.procs["vllm_api_server"] += [api, *(c for c in children if c not in core)]
        self.procs["vllm_engine_core"] += core

    def add_engine(self, url: str, pid: int) -> None:
        """One more engine (replicas on the same GPU): its CPU and queue add to the first's. Call before
        entering."""
        self.engine_urls.append(url)
        self._add_engine_processes(pid)

    def gateway(self, pid: int) -> None:
        """Sample the gateway ``pid`` from now on: its process and its serving workers (``--workers``)."""
        primary = psutil.Process(pid)
        self.procs["gateway"] = [primary, *primary.children(recursive=True)]
        for proc in self.procs["gateway"]:
            proc.cpu_percent(None)

    def _queue(self, http: httpx.Client) -> dict[str, float]:
        values: dict[str, float] = {}
        for url in self.engine_urls:
            for line in http.get(f"{url}/metrics").text.splitlines():
                for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
                    if line.startswith(name + "{") or line.startswith(name + " "):
                        key = name.split(":")[1]
                        values[key] = values.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        return values

    def _run(self) -> None:
        for group in self.procs.values():
            for proc in group:
                proc.cpu_percent(None)
        with httpx.Client(timeout=5) as http:
            while not self._stop.wait(self.every_s):
                row: dict[str, Any] = {"t": time.time(), "leg": self.leg}
                for name, group in self.procs.items():
                    row[f"{name}_cpu"] = sum(p.cpu_percent(None) for p in group if p.is_running()) / 100
                try:
                    row.update(self._queue(http))
                except httpx.HTTPError:
                    pass
                self.samples.append(row)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def by_leg(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per leg: mean and peak of each series (CPU in cores)."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        legs = sorted({s["leg"] for s in self.samples if s["leg"] != "-"})
        for leg in legs:
            rows = [s for s in self.samples if s["leg"] == leg]
            keys = [k for k in rows[0] if k not in ("t", "leg")]
            out[leg] = {
                k: {
                    "mean": round(sum(r.get(k, 0.0) for r in rows) / len(rows), 3),
                    "max": round(max(r.get(k, 0.0) for r in rows), 3),
                }
                for k in keys
            }
        return out


def highest_rate_within(runs: list[dict[str, Any]], bound_ms: float) -> float | None:
    """The highest rate of ``shipyard bench`` runs (``summary["runs"]`` entries) with no error and P99 within
    ``bound_ms``; None when none held."""
    return max((r["rate"] for r in runs if not r["errors"] and r["e2e_ms"]["p99"] <= bound_ms), default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", choices=list(CONFIGS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rates", default="100,200,300,400,500,600,800,1000,1200")
    parser.add_argument("--duration", default="5")
    parser.add_argument("--legs", default="gateway,direct,compare,findmax82,findmax40")
    parser.add_argument("--compare-rate", default="200")
    parser.add_argument(
        "--workers",
        default="1",
        help="gateway processes to sweep, comma-separated (shipyard serve --workers); find-max uses the best",
    )
    parser.add_argument(
        "--labels", type=Path, help="labels YAML for the gateway (intent_labels_file) and the direct legs [packaged]"
    )
    parser.add_argument(
        "--budget-s", type=float, default=540, help="legs that would start after this many seconds are skipped"
    )
    args = parser.parse_args()
    out = args.out / args.config
    work = out / "work"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    flags = CONFIGS[args.config]
    results: dict[str, Any] = {**meta(f"intent_ceiling_{args.config}"), "config": args.config, "flags": flags}
    started = time.monotonic()
    engine = start_engine(work, args.config, **flags)
    results["engine_start_s"] = round(time.monotonic() - started, 1)
    labels = ["--intent-labels", str(args.labels.resolve())] if args.labels else []
    worker_counts = [int(n) for n in args.workers.split(",")]

    def gateway_with(workers: int) -> Any:
        env = {"SHIPYARD_WORKERS": str(workers)}
        if args.labels:
            env["SHIPYARD_INTENT_LABELS_FILE"] = str(args.labels.resolve())
        started_gw = time.monotonic()
        proc = start_gateway(work, engine.url, env=env)
        wait_for_workers(proc, workers)
        time.sleep(5 if workers > 1 else 0)  # the serving workers' own start-up (imports, the state, probes)
        log(f"gateway with {workers} process(es) ready in {time.monotonic() - started_gw:.1f} s")
        return proc

    gateway = gateway_with(worker_counts[0])
    results["workers"] = worker_counts
    results["labels"] = str(args.labels) if args.labels else "packaged"
    gw_url = f"http://127.0.0.1:{GATEWAY_PORT}"
    common = ["--model", "qwen", "--duration", args.duration, "--warmup", "2", "--seed", "13"]
    legs: dict[str, Any] = {}
    results["legs"] = legs
    results["skipped"] = []
    assert engine.pid is not None and gateway.pid is not None
    sampler = Sampler(engine.url, engine.pid, gateway.pid)

    def run_leg(leg: str, body: Any) -> None:
        if time.monotonic() - started > args.budget_s:
            results["skipped"].append(leg)
            log(f"skipped {leg}: past the {args.budget_s:.0f} s budget")
            return
        sampler.leg = leg
        legs[leg] = body()
        write(out, "intent_ceiling.json", {**results, "sampled": sampler.by_leg()})

    def sweep(leg: str, url: str, *load: str) -> list[dict[str, Any]]:
        """One bench per rate, stopping after the first overloaded level."""
        summaries: list[dict[str, Any]] = []
        for rate in args.rates.split(","):
            summary = bench(work / leg / rate, url, *common, *load, "--rate", rate)
            summaries.append(summary)
            run = summary["runs"][0]
            if run["errors"] or run["e2e_ms"]["p99"] > OVERLOADED_MS:
                break
        return summaries

    def find_max(bound: str, start: str) -> Any:
        load = ("--scenario", "intent", "--rate", start, "--find-max", "--slo", f"e2e={bound}", "--max-level", "3200")
        return bench(work / f"find-max-{bound}", gw_url, *common, *load)

    def gateway_leg(workers: int) -> str:
        return "gateway-sweep" if workers == 1 else f"gateway-w{workers}-sweep"

    def best_rate(leg: str, bound: str) -> float | None:
        return highest_rate_within([s["runs"][0] for s in legs.get(leg, [])], float(bound))

    wanted = args.legs.split(",")
    engine_leg = ("--scenario", "intent-engine", *labels)
    try:
        with sampler:
            # the gateway first: it reads the engine's tokenizer on its first requests (the sweep's warm-up)
            if "gateway" in wanted:
                for i, workers in enumerate(worker_counts):
                    if i:
                        stop(gateway)
                        gateway = gateway_with(workers)
                        sampler.gateway(gateway.pid)
                    leg = gateway_leg(workers)
                    run_leg(leg, lambda leg=leg: sweep(leg, gw_url, "--scenario", "intent"))
            if "direct" in wanted:
                run_leg("direct-sweep", lambda: sweep("direct-sweep", engine.url, *engine_leg))
            if "compare" in wanted:  # the other decodes, straight to vLLM, at one rate
                for mode in ("stop-strings", "full"):
                    leg = f"direct-{mode}-{args.compare_rate}"
                    run_leg(
                        leg,
                        lambda m=mode, leg=leg: bench(
                            work / leg, engine.url, *common, *engine_leg, "--intent-decode", m,
                            "--rate", args.compare_rate,
                        ),
                    )  # fmt: skip
            # find-max runs on the worker count whose sweep held the bound at the highest rate
            best = max(worker_counts, key=lambda w: (best_rate(gateway_leg(w), "82") or 0, -w))
            if any(f"findmax{b}" in wanted for b in ("82", "40")) and best != worker_counts[-1]:
                stop(gateway)
                gateway = gateway_with(best)
                sampler.gateway(gateway.pid)
            results["find_max_workers"] = best
            for bound in ("82", "40"):
                if f"findmax{bound}" in wanted:  # from the sweep's best rate within the bound (else 50 req/s)
                    start = f"{best_rate(gateway_leg(best), bound) or 50:g}"
                    run_leg(f"gateway-find-max-{bound}", lambda b=bound, s=start: find_max(b, s))
        results["gateway_intent_tokens"] = intent_tokens(gw_url)  # every classification the gateway made
    finally:
        stop(gateway)
        engine.stop(30)
    results["sampled"] = sampler.by_leg()
    write(out, "intent_ceiling.json", results)
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in sampler.samples))
    log(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
