"""Issue 13 on the lent GPU: the highest /v1/intent rate whose P99 stays within 82 ms and 40 ms, through the
gateway and straight to vLLM in the same run, for one engine configuration per call.

Uses the campaign's helpers (staged vLLM 0.26.0 kit, Qwen2.5-7B shape with dummy weights, ``shipyard serve`` as
users run it, ``shipyard bench`` as the load). Per configuration: one engine, one gateway (shortest decode, the
default), then open-loop rate sweeps of ``--scenario intent`` (gateway) and ``--scenario intent-engine`` (the
same chat completions straight to vLLM), the full-decode path at 200 req/s on both for comparison, and
``--find-max --slo e2e=82`` through the gateway. A sampler records, every 0.25 s, vLLM's running/waiting
requests and the CPU of vLLM's API server, its engine core and the gateway, so the bottleneck at the ceiling
can be named; ``shipyard bench`` itself reports its achieved rate, send lag and CPU.

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
from gpu_campaign import BASE_ARGS, GATEWAY_PORT, bench, log, meta, start_engine, start_gateway, stop, write

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
        self.engine_url, self.every_s = engine_url, every_s
        api = psutil.Process(engine_pid)
        children = api.children(recursive=True)
        core = [c for c in children if "EngineCore" in " ".join([c.name(), *c.cmdline()])]
        self.procs = {"vllm_api_server": [api, *(c for c in children if c not in core)], "vllm_engine_core": core}
        self.procs["gateway"] = [psutil.Process(gateway_pid)]
        self.samples: list[dict[str, Any]] = []
        self.leg = "-"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _queue(self, http: httpx.Client) -> dict[str, float]:
        values: dict[str, float] = {}
        for line in http.get(f"{self.engine_url}/metrics").text.splitlines():
            for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
                if line.startswith(name + "{") or line.startswith(name + " "):
                    values[name.split(":")[1]] = values.get(name.split(":")[1], 0.0) + float(line.rsplit(" ", 1)[1])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", choices=list(CONFIGS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rates", default="100,200,300,400,500,600,800,1000")
    parser.add_argument("--duration", default="5")
    parser.add_argument("--find-max-start", default="200")
    parser.add_argument("--legs", default="gateway,direct,full,findmax")
    args = parser.parse_args()
    out = args.out / args.config
    work = out / "work"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    flags = CONFIGS[args.config]
    results: dict[str, Any] = {**meta(f"intent_ceiling_{args.config}"), "config": args.config, "flags": flags}
    started = time.monotonic()
    engine = start_engine(work, args.config, **flags)
    results["engine_start_s"] = round(time.monotonic() - started, 1)
    gateway = start_gateway(work, engine.url)
    gw_url = f"http://127.0.0.1:{GATEWAY_PORT}"
    common = ["--model", "qwen", "--duration", args.duration, "--warmup", "2", "--seed", "13"]
    legs: dict[str, Any] = {}
    results["legs"] = legs
    assert engine.pid is not None and gateway.pid is not None
    sampler = Sampler(engine.url, engine.pid, gateway.pid)

    def sweep(leg: str, url: str, *load: str) -> None:
        """One bench per rate, stopping after the first overloaded level; the leg's summaries in a list."""
        sampler.leg = leg
        legs[leg] = []
        for rate in args.rates.split(","):
            summary = bench(work / leg / rate, url, *common, *load, "--rate", rate)
            legs[leg].append(summary)
            run = summary["runs"][0]
            if run["errors"] or run["e2e_ms"]["p99"] > OVERLOADED_MS:
                break
        write(out, "intent_ceiling.json", {**results, "sampled": sampler.by_leg()})

    wanted = args.legs.split(",")
    try:
        with sampler:
            if "gateway" in wanted:
                sweep("gateway-sweep", gw_url, "--scenario", "intent")
            if "direct" in wanted:
                sweep("direct-sweep", engine.url, "--scenario", "intent-engine")
            if "full" in wanted:
                sampler.leg = "direct-full-200"
                legs[sampler.leg] = bench(
                    work / sampler.leg, engine.url, *common, "--scenario", "intent-engine", "--intent-decode", "full",
                    "--rate", "200",
                )  # fmt: skip
            if "findmax" in wanted:
                sampler.leg = "gateway-find-max-82"
                legs[sampler.leg] = bench(
                    work / sampler.leg,
                    gw_url,
                    *common,
                    *("--scenario", "intent", "--rate", args.find_max_start, "--find-max", "--slo", "e2e=82"),
                    *("--max-level", "3200"),
                )
            write(out, "intent_ceiling.json", {**results, "sampled": sampler.by_leg()})
            if "full" in wanted:
                stop(gateway)  # the old path for comparison: the same gateway with intent.decode=full
                gateway = start_gateway(work, engine.url, env={"SHIPYARD_INTENT__DECODE": "full"})
                sampler.procs["gateway"] = [psutil.Process(gateway.pid)]
                sampler.leg = "gateway-full-200"
                legs[sampler.leg] = bench(work / sampler.leg, gw_url, *common, "--scenario", "intent", "--rate", "200")
    finally:
        stop(gateway)
        engine.stop(30)
    results["sampled"] = sampler.by_leg()
    write(out, "intent_ceiling.json", results)
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in sampler.samples))
    log(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
