"""Overload on the CPU (issue 37): a fake engine of a set capacity behind one gateway process, driven below, past
and again below that capacity in one open-loop schedule, with the gateway's admission limit on and (``--compare``)
off, side by side in one run.

The fake engine (``shipyard.testing.fake_openai --capacity N``) generates N requests at once, each taking
``--service-ms``; more wait their turn, as requests wait inside an engine past its knee. Its capacity is
N / service time (4 / 50 ms = 80 req/s). The schedule: ``--low`` x capacity for ``--before`` s, ``--high`` x
capacity for ``--overload`` s, ``--low`` x capacity for ``--after`` s (non-streamed chat, one token).

    .venv/bin/python benchmarks/overload_cpu.py --compare --out benchmarks/results/DATE-cpu-overload

Writes overload.json (per variant: settings, the summary of ``shipyard.bench.overload`` and every request).
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
import tempfile
from pathlib import Path
from typing import Any

import httpx
from gateway_overhead import wait_ok  # benchmarks/ is on the path when a benchmark runs

from shipyard.bench.load import run_arrivals
from shipyard.bench.overload import Phase, overload_summary, phased_offsets
from shipyard.bench.scenarios import RequestSpec
from shipyard.engine import free_port
from shipyard.engine.process import wait_until_ready

KEY = "sk-overload"


class OneToken:
    name = "one-token"

    def request(self, index: int) -> RequestSpec:
        body = {"model": "fake", "messages": [{"role": "user", "content": f"ticket {index}"}], "max_tokens": 1}
        return RequestSpec("/v1/chat/completions", body, False)


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args,
        env={**os.environ, **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_variant(args: argparse.Namespace, admission: dict[str, str], folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    engine_port, gateway_port = free_port(), free_port()
    engine_url, gateway_url = f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{gateway_port}"
    fake = start(
        [sys.executable, "-m", "shipyard.testing.fake_openai", "--port", str(engine_port), "--model", "fake"]
        + ["--capacity", str(args.capacity), "--ttft", str(args.service_ms / 1000)],
        {},
        folder / "engine.log",
    )
    env = {"SHIPYARD_API_KEYS": KEY, "SHIPYARD_DATA_DIR": str(folder / "data")}
    env |= {f"SHIPYARD_ADMISSION__{name.upper()}": value for name, value in admission.items()}
    gateway = start(
        [sys.executable, "-m", "shipyard.cli", "serve", "--no-engine", "--upstream", engine_url]
        + ["--port", str(gateway_port)],
        env,
        folder / "gateway.log",
    )
    capacity = args.capacity / (args.service_ms / 1000)
    phases = [
        Phase("before", args.low * capacity, args.before),
        Phase("overload", args.high * capacity, args.overload),
        Phase("after", args.low * capacity, args.after),
    ]
    try:
        wait_ok(f"{engine_url}/health", 60)
        wait_until_ready(gateway, gateway_url, 90, "gateway", poll_s=0.1)
        for _ in range(20):  # connections and code paths warm
            httpx.post(
                f"{gateway_url}/v1/chat/completions",
                json=OneToken().request(0).body,
                headers={"authorization": f"Bearer {KEY}"},
                timeout=10,
            )
        offsets, _ = phased_offsets(phases)
        records = asyncio.run(
            run_arrivals(gateway_url, api_key=KEY, workload=OneToken(), offsets=offsets, origin_in_s=0.2, timeout_s=120)
        )
        metrics = httpx.get(f"{gateway_url}/metrics", timeout=10).text
    finally:
        stop(gateway)
        stop(fake)
    summary = overload_summary(records, phases)
    shed_lines = [line for line in metrics.splitlines() if line.startswith("shipyard_admission_")]
    return {
        "admission": admission,
        "capacity_req_per_s": capacity,
        "summary": summary,
        "gateway_metrics": shed_lines,
        "requests": [r.row() for r in sorted(records, key=lambda r: r.scheduled or 0.0)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--capacity", type=int, default=4, help="requests the fake engine generates at once")
    parser.add_argument("--service-ms", type=float, default=50.0, help="each request's time in the fake engine")
    parser.add_argument("--low", type=float, default=0.5, help="load before and after, x capacity")
    parser.add_argument("--high", type=float, default=1.5, help="the overload, x capacity")
    parser.add_argument("--before", type=float, default=3.0)
    parser.add_argument("--overload", type=float, default=5.0)
    parser.add_argument("--after", type=float, default=6.0)
    parser.add_argument("--max-in-flight", default=None, help="per replica: a number or adaptive (default: capacity)")
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--queue-timeout-ms", type=float, default=20.0)
    parser.add_argument("--compare", action="store_true", help="also run without an admission limit")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    admission = {
        "max_in_flight": args.max_in_flight or str(args.capacity),
        "queue_size": str(args.queue_size),
        "queue_timeout_s": str(args.queue_timeout_ms / 1000),
    }
    work = Path(tempfile.mkdtemp(prefix="overload-"))
    variants = {"admission": run_variant(args, admission, work / "admission")}
    if args.compare:
        variants["no_limit"] = run_variant(args, {}, work / "no_limit")
    report = {
        "experiment": "overload_cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load": {k: str(v) for k, v in vars(args).items()},
        "variants": variants,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overload.json").write_text(json.dumps(report, indent=1))
    for name, variant in variants.items():
        print(name, json.dumps(variant["summary"], indent=1))


if __name__ == "__main__":
    main()
