"""Two gateways sharing one state in Redis, behind nginx: a rollout through one is followed by the other; SIGKILL of
one under streaming load; its restart adopts the running engines.

Everything is real except the engines: redis-server and nginx (Debian's, config from `shipyard deploy
nginx-config`), two `shipyard serve` processes started as users start them (gateway 1 with an engine, gateway 2
with --no-engine and the same state_url), and engines that are shipyard's fake OpenAI server (200 tokens/s,
started by gateway 1 as it starts vLLM: `engine.vllm_command`), so the run takes seconds on 2 cores.

    .venv/bin/python benchmarks/gateway_failover.py --out reports/control/2026-12-02-cpu

Writes failover.json under --out.
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

from shipyard.bench.rollout_load import StreamingClients
from shipyard.engine import free_port
from shipyard.engine.process import wait_until_ready
from shipyard.ops import NginxConfig, render_nginx
from shipyard.testing.services import Nginx, RedisServer

API_KEY, ADMIN_KEY = "sk-failover-user", "sk-failover-admin"
FAKE_ENGINE = [sys.executable, "-m", "shipyard.testing.fake_openai", "--token-rate", "200", "--ttft", "0.02"]


class Gateway:
    """One `shipyard serve` process and how to reach it."""

    def __init__(self, name: str, work: Path, state_url: str, engine: Path | None) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = work / name
        self.log = work / f"{name}.log"
        self.args = [sys.executable, "-m", "shipyard.cli", "serve", "--port", str(self.port)]
        self.args += ["--model", str(engine), "--served-model-name", "m"] if engine else ["--no-engine"]
        self.env = {
            **os.environ,
            "SHIPYARD_API_KEYS": API_KEY,
            "SHIPYARD_ADMIN_KEYS": ADMIN_KEY,
            "SHIPYARD_DATA_DIR": str(self.data_dir),
            "SHIPYARD_STATE_URL": state_url,
            "SHIPYARD_GATEWAY_ID": name,
            "SHIPYARD_HEALTH_INTERVAL_S": "0.2",
            "SHIPYARD_LEASE_TTL_S": "3",
            "SHIPYARD_ENGINE__VLLM_COMMAND": json.dumps(FAKE_ENGINE),
            "SHIPYARD_ENGINE__PROFILE": "default",
            "SHIPYARD_WARMUP_REQUESTS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> float:
        """Start it; seconds until /ready answers 200."""
        started = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_until_ready(self.proc, self.url, timeout_s, str(self.log), poll_s=0.05)
        return time.monotonic() - started

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        response = httpx.request(method, self.url + path, json=body, headers=headers, timeout=30)
        if response.status_code >= 400:
            raise RuntimeError(f"{self.name} {path}: HTTP {response.status_code} {response.text}")
        return response.json()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def model_folder(work: Path, name: str) -> Path:
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    return folder


def chat(url: str) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})


class Prober:
    """Non-streaming requests through nginx, one every 20 ms, each with its outcome and start time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[tuple[float, int | str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            at = time.monotonic()
            try:
                self.results.append((at, chat(self.url).status_code))
            except httpx.HTTPError as exc:
                self.results.append((at, type(exc).__name__))
            time.sleep(0.02)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def follow_time(one: Gateway, two: Gateway, work: Path) -> dict[str, Any]:
    """Roll v2 out through gateway 1; when did gateway 2 apply the switch (its weights: green only)?"""
    accepted = one.admin("POST", "/admin/rollouts", {"target": str(model_folder(work, "v2")), "version": "v2"})
    seen_green: float | None = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        described = two.admin("GET", "/admin/deployments")
        weights = {name: d["weight"] for name, d in described["deployments"].items()}
        if seen_green is None and weights.get("green") == 1.0 and not weights.get("blue"):
            seen_green = time.time()
        current = one.admin("GET", "/admin/rollouts/current")
        if current["phase"] in ("done", "failed") and seen_green is not None:
            break
        time.sleep(0.02)
    switched = next(h for h in current["history"] if h["phase"] == "switching")
    switched_at = current["requested_at"] + switched["at_s"]
    return {
        "rollout": accepted["id"],
        "phase": current["phase"],
        "error": current["error"],
        "gateway2_followed_after_s": None if seen_green is None else round(seen_green - switched_at, 3),
        "served_by_gateway2": chat(two.url).headers.get("x-shipyard-version"),
    }


def kill_under_load(one: Gateway, two: Gateway, edge: str, streams: int) -> dict[str, Any]:
    with StreamingClients(edge, API_KEY, "m", clients=streams, max_tokens=60) as load, Prober(edge) as prober:
        time.sleep(2.0)
        killed_at = time.monotonic()
        killed_on_load_clock = load.now()
        assert one.proc is not None
        one.proc.kill()
        one.proc.wait()
        time.sleep(4.0)
    records = list(load.records)
    cut = [r for r in records if not r.ok and r.started < killed_on_load_clock]
    after = [r for r in records if r.started >= killed_on_load_clock + 0.05]
    probes_after = [status for at, status in prober.results if at > killed_at]
    return {
        "streams": streams,
        "stream_requests": len(records),
        "streams_cut_by_the_kill": len(cut),
        "stream_errors": sorted({r.error or f"HTTP {r.status}" for r in cut})[:3],
        "streams_started_after_the_kill": len(after),
        "streams_failed_after_the_kill": sum(1 for r in after if not r.ok),
        "requests_after_the_kill": len(probes_after),
        "requests_failed_after_the_kill": sum(1 for s in probes_after if s != 200),
        "requests_failed_around_the_kill": sum(1 for at, s in prober.results if s != 200),
        "served_by_gateway2_after": chat(two.url).status_code,
    }


def run(out: Path, streams: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="shipyard-failover-"))
    with RedisServer(work / "redis") as redis:
        one = Gateway("gateway1", work, redis.url, model_folder(work, "v1"))
        two = Gateway("gateway2", work, redis.url, None)
        try:
            first_start = one.start()
            two.start()
            config = NginxConfig(
                server_name="localhost",
                gateways=(f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}"),
                tls_certificate=None,
                tls_certificate_key=None,
                http_port=free_port(),
            )
            with Nginx(work / "nginx", render_nginx(config)):
                edge = f"http://127.0.0.1:{config.http_port}"
                assert chat(edge).status_code == 200
                follow = follow_time(one, two, work)
                engines_before = {
                    r["name"]: r["pid"]
                    for d in one.admin("GET", "/admin/deployments")["deployments"].values()
                    for r in d["replicas"]
                }
                kill = kill_under_load(one, two, edge, streams)
                restart_s = one.start()
                after = one.admin("GET", "/admin/deployments")
                engines_after = {r["name"]: r["pid"] for d in after["deployments"].values() for r in d["replicas"]}
                restart = {
                    "ready_after_s": round(restart_s, 3),
                    "first_start_s": round(first_start, 3),
                    "same_engines": engines_after == engines_before,
                    "engines": engines_after,
                    "serves": chat(one.url).headers.get("x-shipyard-version"),
                }
        finally:
            one.stop()
            two.stop()
            subprocess.run([sys.executable, "-m", "shipyard.cli", "stop"], env=one.env, capture_output=True, timeout=60)
    report = {
        "command": "benchmarks/gateway_failover.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "setup": "nginx -> 2 shipyard gateways (state in redis-server) -> fake engines at 200 tok/s",
        "follow": follow,
        "kill": kill,
        "restart": restart,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "failover.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--streams", type=int, default=16)
    args = parser.parse_args()
    print(json.dumps(run(args.out, args.streams), indent=2))


if __name__ == "__main__":
    main()
