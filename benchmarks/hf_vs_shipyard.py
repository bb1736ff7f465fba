"""Issue 25, item 2, on the lent GPU: the highest Poisson request rate an HF-transformers service and shipyard
each hold with P99 end-to-end ≤ --slo-ms (5,000) and no errors, on one workload (512-token prompts, 128 tokens
out), one after the other in the same call on the same card, through the same load generator (`shipyard bench
--find-max`).

HF: `benchmarks/hf_server.py` (``generate`` on batches of whatever waits, up to 16). shipyard: `shipyard serve`
(one vLLM engine, the gateway in front). Model: the kit's Qwen2.5-7B-Instruct shape, dummy weights, bf16.

    bash .gpu/bin/stage.sh && source .gpu/bin/env.sh && export PYTHONPATH=$PWD/src:$PYTHONPATH
    python3 benchmarks/hf_vs_shipyard.py --out /root/out/hf-vs --budget-s 560

Writes hf_vs_shipyard.json (and each bench run's folder) under --out. HF's find-max gets 40% of --budget-s and is
killed at it without a summary (as on 2026-12-06 with --slo-ms 20000): give it room for its slow levels.
Measured: benchmarks/results/2026-12-06-h100/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_campaign import KEY, MODEL, log, meta, start_gateway, stop  # noqa: E402

WORKLOAD = [
    "--scenario", "random", "--endpoint", "completions", "--no-stream", "--input-tokens", "512",
    "--output-tokens", "128", "--find-max", "--duration", "15", "--warmup", "3",
    "--timeout", "60", "--no-resources",
]  # fmt: skip


def find_max(
    url: str, model: str, start: float, limit: float, out: Path, deadline: float, slo_ms: int
) -> dict[str, Any]:
    args = [sys.executable, "-m", "shipyard.cli", "bench", "--url", url, "--api-key", KEY, "--model", model]
    args += [*WORKLOAD, "--slo", f"e2e={slo_ms}", "--rate", str(start), "--max-level", str(limit), "--out", str(out)]
    try:
        subprocess.run(args, check=True, timeout=max(deadline - time.monotonic(), 10))
    except subprocess.TimeoutExpired:
        log(f"find-max on {url} cut at the budget")
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    runs = summary.get("runs", [])
    best = (summary.get("find_max") or {}).get("max_rate")
    at_best = next((r for r in runs if r.get("rate") == best), None)
    return {
        "max_rate": best,
        "output_tok_per_s_at_max": at_best and at_best["output_tok_per_s"],
        "e2e_p99_ms_at_max": at_best and at_best["e2e_ms"]["p99"],
        "runs": [
            {
                "rate": r.get("rate"),
                "achieved_rate": r.get("achieved_rate"),
                "requests": r["requests"],
                "errors": r["errors"],
                "e2e_p50_ms": r["e2e_ms"].get("p50"),
                "e2e_p99_ms": r["e2e_ms"].get("p99"),
                "output_tok_per_s": r["output_tok_per_s"],
            }
            for r in runs
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=560)
    parser.add_argument("--slo-ms", type=int, default=5000, help="P99 end-to-end bound both must hold")
    parser.add_argument("--hf-max-batch", type=int, default=16)
    args = parser.parse_args()
    began = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    report: dict[str, Any] = {**meta("hf-vs-shipyard"), "workload": " ".join(WORKLOAD)}

    log("HF transformers server ...")
    with open(args.out / "logs" / "hf.log", "ab") as hf_log:
        hf = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks/hf_server.py"), "--model", str(MODEL), "--dummy", "--port",
             "9000", "--max-batch", str(args.hf_max_batch)],
            stdout=hf_log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get("http://127.0.0.1:9000/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        report["hf"] = find_max(
            "http://127.0.0.1:9000", "hf", 0.25, 64, args.out / "hf", began + args.budget_s * 0.4, args.slo_ms
        )
        report["hf"]["max_batch"] = args.hf_max_batch
        log(f"HF: {report['hf']['max_rate']} req/s")
    finally:
        os.killpg(hf.pid, signal.SIGKILL)
        hf.wait()
    time.sleep(3)  # its GPU memory back

    log("shipyard serve (one vLLM engine) ...")
    work = args.out / "shipyard-serve"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env = {"SHIPYARD_ENGINE__EXTRA_ARGS": json.dumps(["--load-format", "dummy", "--max-model-len", "4096"])}
    gateway = start_gateway(work, None, env)
    report["shipyard_ready_s"] = round(time.monotonic() - started, 1)
    try:
        report["shipyard"] = find_max(
            "http://127.0.0.1:8080", "qwen2.5-7b", 4, 256, args.out / "shipyard", began + args.budget_s, args.slo_ms
        )
        log(f"shipyard: {report['shipyard']['max_rate']} req/s")
    finally:
        stop(gateway)
    hf_rate, ours = report["hf"]["max_rate"], report["shipyard"]["max_rate"]
    report["rate_ratio"] = round(ours / hf_rate, 2) if hf_rate and ours else None
    (args.out / "hf_vs_shipyard.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("hf", "shipyard")}, indent=2))


if __name__ == "__main__":
    main()
