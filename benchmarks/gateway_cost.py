"""CPU per request of the gateway for short, non-streamed requests (issue 37), side by side in one run.

One fake OpenAI engine (``shipyard.testing.fake_openai``: a minimal ASGI server answering at once) and, in front
of it, one process of each server under test. For each (server, route, key) the same closed-loop load is sent
(``--requests`` at ``--concurrency`` in flight, HTTP/1.1 keep-alive from an aiohttp client in this process) and
the CPU time (user + system) the *server's* process used over the round is divided by the requests answered:

- ``engine``: straight to the fake engine (the floor for a Python ASGI server);
- ``shipyard``: ``shipyard serve --no-engine --workers 1 --upstream FAKE`` with two keys, ``free`` (no limits) and
  ``limited`` (requests/min, tokens/min and concurrency limits, counted in-process, high enough never to refuse);
- ``litellm`` (with ``--litellm PATH``, the ``litellm`` command of a virtualenv holding ``litellm[proxy]``): its
  proxy with ``--num_workers 1`` and one model pointing at the same fake engine.

Routes: ``chat`` (``/v1/chat/completions``, ``max_tokens: 1``), ``completions``, ``intent`` (``/v1/intent``, the
packaged labels) and ``predict`` (``/predict``); the last two are shipyard's own. Rounds alternate the servers
(engine, shipyard, litellm, engine, ...) to cancel drift.

    .venv/bin/python benchmarks/gateway_cost.py --out benchmarks/results/DATE-cpu-gateway-cost \\
        [--litellm /work/venvs/litellm/bin/litellm]

Writes ``gateway_cost.json`` (every round, the command, the machine) and ``gateway_cost.md`` (the table).
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
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil

from shipyard.engine import free_port
from shipyard.stats import percentile

FREE, LIMITED = "sk-free-bench", "sk-limited-bench"
MESSAGES = [{"role": "user", "content": "Where is my parcel? It was due on Monday."}]
BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/v1/chat/completions", {"model": "fake", "messages": MESSAGES, "max_tokens": 1}),
    "completions": ("/v1/completions", {"model": "fake", "prompt": "Where is my parcel?", "max_tokens": 1}),
    "intent": ("/v1/intent", {"text": "Where is my parcel? It was due on Monday."}),
    "predict": ("/predict", {"text": "Where is my parcel? It was due on Monday."}),
}


def wait_ok(url: str, timeout: float = 90, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def start(args: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        args, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU of a server: the process and any children it started (uvicorn's workers)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


async def closed_loop(url: str, path: str, body: dict[str, Any], key: str, requests: int, concurrency: int) -> dict:
    payload = json.dumps(body).encode()
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    left = requests
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                t0 = time.perf_counter()
                async with session.post(url + path, data=payload, headers=headers) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    lat = sorted(latencies)
    return {
        "requests": len(latencies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "wall_s": wall,
        "request_per_s": len(latencies) / wall,
        "latency_ms": {q: percentile(lat, p) * 1000 for q, p in (("p50", 50), ("p99", 99))},
    }


def litellm_config(folder: Path, upstream: str) -> Path:
    config = folder / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: fake\n"
        "    litellm_params:\n"
        "      model: openai/fake\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: none\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {FREE}\n"
    )
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--routes", default="chat,completions,intent,predict")
    parser.add_argument("--litellm", type=Path, help="the litellm command of a virtualenv with litellm[proxy]")
    parser.add_argument("--workers", type=int, default=1, help="shipyard serve --workers")
    parser.add_argument(
        "--before", type=Path, help="another shipyard checkout (e.g. a `git worktree` of an older commit), served too"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    routes = args.routes.split(",")

    tmp = Path(tempfile.mkdtemp(prefix="gateway-cost-"))
    ports = {name: free_port() for name in ("engine", "shipyard", "before", "litellm")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    py = sys.executable

    def gateway(name: str, src: Path | None) -> subprocess.Popen[bytes]:
        return start(
            [py, "-m", "shipyard.cli", "serve", "--no-engine", "--upstream", urls["engine"]]
            + ["--port", str(ports[name]), "--workers", str(args.workers)],
            env={
                "SHIPYARD_API_KEYS": f"free:{FREE},limited:{LIMITED}",
                "SHIPYARD_LIMITS__LIMITED__RPM": "10000000",
                "SHIPYARD_LIMITS__LIMITED__TPM": "1000000000",
                "SHIPYARD_LIMITS__LIMITED__CONCURRENT": "10000",
                "SHIPYARD_DATA_DIR": str(tmp / f"data-{name}"),
                **({"PYTHONPATH": str(src / "src")} if src else {}),
            },
            log=tmp / f"{name}.log",
        )

    procs: dict[str, subprocess.Popen[bytes]] = {
        "engine": start(
            [py, "-m", "shipyard.testing.fake_openai", "--port", str(ports["engine"]), "--model", "fake"],
            log=tmp / "engine.log",
        ),
        "shipyard": gateway("shipyard", None),
    }
    if args.before:
        procs["before"] = gateway("before", args.before)
    if args.litellm:
        config = litellm_config(tmp, urls["engine"])
        procs["litellm"] = start(
            [str(args.litellm), "--config", str(config), "--port", str(ports["litellm"]), "--num_workers", "1"],
            env={"LITELLM_LOG": "ERROR", "NO_DOCS": "True"},
            log=tmp / "litellm.log",
        )
    cases: list[tuple[str, str, str]] = []  # (server, route, key)
    for route in routes:
        if route in ("chat", "completions"):
            cases.append(("engine", route, FREE))
        cases += [("shipyard", route, FREE), ("shipyard", route, LIMITED)]
        if args.before:
            cases += [("before", route, FREE), ("before", route, LIMITED)]
        if args.litellm and route in ("chat", "completions"):
            cases.append(("litellm", route, FREE))
    rounds: list[dict[str, Any]] = []
    try:
        wait_ok(f"{urls['engine']}/health")
        wait_ok(f"{urls['shipyard']}/ready")
        if args.before:
            wait_ok(f"{urls['before']}/ready")
        if args.litellm:
            wait_ok(f"{urls['litellm']}/health/liveliness", timeout=180)
        processes = {name: psutil.Process(proc.pid) for name, proc in procs.items()}
        for server, route, key in cases:  # warm each path once (imports, connection pools, caches)
            path, body = BODIES[route]
            asyncio.run(closed_loop(urls[server], path, body, key, 200, args.concurrency))
        for repeat in range(args.rounds):
            for server, route, key in cases:
                path, body = BODIES[route]
                before = cpu_seconds(processes[server])
                result = asyncio.run(closed_loop(urls[server], path, body, key, args.requests, args.concurrency))
                used = cpu_seconds(processes[server]) - before
                row = {
                    "server": server,
                    "route": route,
                    "key": "limited" if key == LIMITED else "free",
                    "round": repeat,
                    "cpu_s": used,
                    "cpu_ms_per_request": 1000 * used / result["requests"],
                    "request_per_core_s": result["requests"] / used if used else None,
                    **result,
                }
                rounds.append(row)
                print(
                    f"{server:9s} {route:12s} {row['key']:8s} #{repeat}: {row['cpu_ms_per_request']:.3f} ms CPU/req, "
                    f"{result['request_per_s']:.0f} req/s, p50 {result['latency_ms']['p50']:.1f} ms, "
                    f"statuses {result['statuses']}",
                    flush=True,
                )
    finally:
        for proc in procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)

    table = ["| server | route | key | CPU per request, ms (each round) | requests/s per core | req/s | P50 ms |"]
    table.append("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for server, route, key in cases:
        rows = [r for r in rounds if (r["server"], r["route"], r["key"]) == (server, route, _key_name(key))]
        cpu = " / ".join(f"{r['cpu_ms_per_request']:.3f}" for r in rows)
        per_core = sum(r["request_per_core_s"] or 0 for r in rows) / len(rows)
        rps = sum(r["request_per_s"] for r in rows) / len(rows)
        p50 = sum(r["latency_ms"]["p50"] for r in rows) / len(rows)
        table.append(f"| {server} | {route} | {_key_name(key)} | {cpu} | {per_core:.0f} | {rps:.0f} | {p50:.1f} |")
    report = {
        "experiment": "gateway_cost",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        },
        "load": {k: str(v) for k, v in vars(args).items()},
        "rounds": rounds,
    }
    (args.out / "gateway_cost.json").write_text(json.dumps(report, indent=1))
    (args.out / "gateway_cost.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def _key_name(key: str) -> str:
    return "limited" if key == LIMITED else "free"


if __name__ == "__main__":
    main()
