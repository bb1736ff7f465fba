"""Gateway overhead: the same fixed-rate streaming load sent straight to an upstream and through the gateway.

The upstream is shipyard's fake OpenAI server streaming at a set token rate, so engine noise is out and any
difference is the gateway's. Legs alternate (direct, gateway, direct, gateway, ...) to cancel drift.

    .venv/bin/python benchmarks/gateway_overhead.py --concurrency 64 --token-rate 50 --out results/DIR

Writes gateway_overhead.json (every leg's summary and per-request records, the headline numbers, the command,
the machine). Targets for the 2-core CPU machine: added P50 TTFT <= 2 ms, throughput ratio >= 0.97.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from shipyard.bench.load import run_closed_loop
from shipyard.bench.scenarios import RandomWorkload
from shipyard.engine import free_port

KEY = "sk-bench"


def wait_ok(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--token-rate", type=float, default=50.0, help="tokens/s of each stream")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per request")
    parser.add_argument("--ttft", type=float, default=0.0, help="fake engine's time to first token, s")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per leg")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    up_port, gw_port = free_port(), free_port()
    upstream_url, gateway_url = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{gw_port}"
    fake = start(
        [
            "-m",
            "shipyard.testing.fake_openai",
            "--port",
            str(up_port),
            "--model",
            "fake",
            "--token-rate",
            str(args.token_rate),
            "--ttft",
            str(args.ttft),
        ]
    )
    gateway = start(
        ["-m", "shipyard.cli", "serve", "--no-engine", "--upstream", upstream_url, "--port", str(gw_port)],
        env={"SHIPYARD_API_KEYS": KEY, "SHIPYARD_DATA_DIR": str(args.out / ".data")},
    )
    legs: list[dict[str, Any]] = []
    try:
        wait_ok(f"{upstream_url}/health")
        wait_ok(f"{gateway_url}/ready")
        gw_proc = psutil.Process(gateway.pid)
        for repeat in range(args.repeats):
            for target, url in (("direct", upstream_url), ("gateway", gateway_url)):
                gw_proc.cpu_percent()
                result = asyncio.run(
                    run_closed_loop(
                        url,
                        api_key=KEY,
                        workload=RandomWorkload("fake", input_tokens=32, output_tokens=args.tokens),
                        concurrency=args.concurrency,
                        duration_s=args.duration,
                        warmup_s=args.warmup,
                    )
                )
                leg = {
                    "target": target,
                    "repeat": repeat,
                    "gateway_cpu_percent": gw_proc.cpu_percent(),
                    "summary": result.summary(),
                    "requests": [r.row() for r in result.records],
                }
                legs.append(leg)
                s = leg["summary"]
                print(
                    f"{target:8s} #{repeat}: {s['requests']} req, {s['errors']} err, "
                    f"TTFT p50 {s['ttft_ms']['p50']:.2f} ms p99 {s['ttft_ms']['p99']:.2f} ms, "
                    f"{s['output_tok_per_s']:.0f} tok/s, gateway CPU {leg['gateway_cpu_percent']:.0f}%",
                    flush=True,
                )
    finally:
        for proc in (gateway, fake):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)

    def mean_of(target: str, key: str, stat: str | None = None) -> float:
        values = [leg["summary"][key][stat] if stat else leg["summary"][key] for leg in legs if leg["target"] == target]
        return sum(values) / len(values)

    headline = {
        "added_ttft_p50_ms": mean_of("gateway", "ttft_ms", "p50") - mean_of("direct", "ttft_ms", "p50"),
        "added_ttft_p99_ms": mean_of("gateway", "ttft_ms", "p99") - mean_of("direct", "ttft_ms", "p99"),
        "throughput_ratio": mean_of("gateway", "output_tok_per_s") / mean_of("direct", "output_tok_per_s"),
        "direct_tok_per_s": mean_of("direct", "output_tok_per_s"),
        "gateway_tok_per_s": mean_of("gateway", "output_tok_per_s"),
        "errors": sum(leg["summary"]["errors"] for leg in legs),
    }
    report = {
        "experiment": "gateway_overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        },
        "load": vars(args) | {"out": str(args.out)},
        "headline": headline,
        "legs": legs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gateway_overhead.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(headline, indent=2))


if __name__ == "__main__":
    main()
