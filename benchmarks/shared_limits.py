"""One limit across every gateway process: two `shipyard serve --workers 2` gateways on one redis-server, a key
with `rpm: 60`, hit from 8 connections (4 a gateway, a new connection per request so both processes of each
gateway answer) for `--seconds`; the requests admitted in each minute, and whether every answer carried
OpenAI's `x-ratelimit-*` headers.

Everything is real except the engine (shipyard's fake OpenAI server, so the run measures the gateways):

    .venv/bin/python benchmarks/shared_limits.py --seconds 120 --out benchmarks/results/2026-12-06-cpu-limits

Writes limits.json under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from shipyard.engine import free_port
from shipyard.engine.process import wait_until_ready
from shipyard.testing.services import RedisServer

KEY = "sk-limited"
RPM = 60
HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")


def start_gateway(name: str, work: Path, state_url: str, engine_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "SHIPYARD_API_KEYS": f"limited:{KEY}",
        "SHIPYARD_ADMIN_KEYS": "sk-limits-admin",
        "SHIPYARD_DATA_DIR": str(work / name),
        "SHIPYARD_STATE_URL": state_url,
        "SHIPYARD_GATEWAY_ID": name,
        "SHIPYARD_LIMITS__LIMITED__RPM": str(RPM),
        "SHIPYARD_HEALTH_INTERVAL_S": "0.5",
    }
    args = [sys.executable, "-m", "shipyard.cli", "serve", "--no-engine", "--upstream", engine_url]
    args += ["--port", str(port), "--workers", "2"]
    log = open(work / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(proc, url, 90, str(work / f"{name}.log"), poll_s=0.1)
    return proc, url


def hammer(url: str, until: float, results: list[tuple[float, int, bool]]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    while time.monotonic() < until:
        at = time.monotonic()
        try:
            answer = httpx.post(
                f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=10
            )
        except httpx.HTTPError:
            results.append((at, 0, False))
            continue
        results.append((at, answer.status_code, all(h in answer.headers for h in HEADERS)))
        if answer.status_code == 429:
            time.sleep(0.05)


class FakeEngine:
    """shipyard's fake OpenAI server as a process (the engine behind both gateways)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "shipyard.testing.fake_openai", "--port", str(self.port), "--model", "m"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> FakeEngine:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the fake engine did not start")

    def __exit__(self, *_: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def run(seconds: float, work: Path) -> dict[str, Any]:
    with RedisServer(work / "redis") as redis, FakeEngine() as engine:
        state_url = f"redis://127.0.0.1:{redis.port}/0"
        gateways = [start_gateway(f"gateway{i + 1}", work, state_url, engine.url) for i in range(2)]
        try:
            results: list[tuple[float, int, bool]] = []
            started = time.monotonic()
            threads = [
                threading.Thread(target=hammer, args=(gateways[i % 2][1], started + seconds, results)) for i in range(8)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            for index, (proc, _) in enumerate(gateways):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:  # seen once (2026-12-06, a full unit run): say what it waited on
                    proc.kill()
                    tail = (work / f"gateway{index + 1}.log").read_text(errors="replace").splitlines()[-40:]
                    raise RuntimeError(f"gateway{index + 1} did not stop within 60 s of SIGTERM; its log ends:\n"
                                       + "\n".join(tail)) from None  # fmt: skip
    admitted = sorted(at - started for at, status, _ in results if status == 200)
    per_minute = [sum(1 for t in admitted if m * 60 <= t < (m + 1) * 60) for m in range(int(-(-seconds // 60)))]
    most_in_any_window = max(
        (sum(1 for u in admitted if t <= u < t + 60) for t in admitted), default=0
    )  # the sliding window's own count, from each admitted request
    statuses: dict[str, int] = {}
    for _, status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "rpm": RPM,
        "seconds": seconds,
        "gateways": 2,
        "processes_per_gateway": 2,
        "connections": 8,
        "requests": len(results),
        "statuses": statuses,
        "admitted_per_minute": per_minute,
        "most_admitted_in_any_60s": most_in_any_window,
        "answers_without_ratelimit_headers": sum(1 for _, status, ok in results if status in (200, 429) and not ok),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shipyard-limits-") as tmp:
        report = run(args.seconds, Path(tmp))
    report.update(
        command=" ".join(sys.argv),
        date=datetime.date.today().isoformat(),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "limits.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
