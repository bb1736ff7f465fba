"""The GPU performance campaign (issue 4), run on the lent device with the staged vLLM 0.26.0 kit.

Every experiment starts what it measures itself (vLLM through shipyard's own ``EngineProcess``, the gateway
through ``shipyard serve``), drives it with ``shipyard bench`` (and ``vllm bench serve`` for the cross-check),
and writes raw files under ``--out``. The model is the Qwen2.5-7B-Instruct shape with dummy weights
(``.gpu/bin/mkmodel.sh``): real speed and memory, meaningless text, fixed output lengths (``ignore_eos``).

    bash .gpu/bin/stage.sh && source .gpu/bin/env.sh && export PYTHONPATH=$PWD/src:$PYTHONPATH
    python3 benchmarks/gpu_campaign.py hf        --out /tmp/campaign   # b: HF transformers generate()
    python3 benchmarks/gpu_campaign.py overhead  --out /tmp/campaign   # a, d and the vllm bench serve check
    python3 benchmarks/gpu_campaign.py ablation  --out /tmp/campaign --configs default,no-prefix-cache,fp8
    python3 benchmarks/gpu_campaign.py rollout   --out /tmp/campaign   # e: blue-green on one GPU under load
    python3 benchmarks/gpu_campaign.py multigpu  --out /tmp/campaign --layouts dp2,single   # issue 5, 2 GPUs
    python3 benchmarks/gpu_campaign.py multigpu  --out /tmp/campaign --layouts tp2
    python3 benchmarks/gpu_campaign.py sleep     --out /tmp/campaign   # issue 35: autoscale.idle: sleep
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from shipyard.engine import EngineProcess, EngineSpec  # noqa: E402
from shipyard.engine.process import wait_until_ready  # noqa: E402

MODEL = Path("/root/qwen2.5-7b")
KEY, ADMIN = "sk-campaign", "sk-campaign-admin"
ENGINE_PORT, GATEWAY_PORT = 8000, 8080
BASE_ARGS = ("--load-format", "dummy")
MAX_MODEL_LEN = 4096

# The tuning ablation: name -> EngineSpec fields on top of vLLM's defaults (bf16, prefix caching and chunked
# prefill on, max-num-batched-tokens chosen by vLLM).
ABLATION: dict[str, dict[str, Any]] = {
    "default": {},
    "no-prefix-cache": {"enable_prefix_caching": False},
    "batched-tokens-2048": {"max_num_batched_tokens": 2048},
    "batched-tokens-16384": {"max_num_batched_tokens": 16384},
    "fp8": {"quantization": "fp8"},
    "fp8-kv": {"kv_cache_dtype": "fp8"},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def device() -> dict[str, Any]:
    try:
        query = "--query-gpu=name,memory.total,driver_version"
        line = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0]
        name, memory, driver = (part.strip() for part in line.split(","))
        return {"gpu": name, "memory": memory, "driver": driver}
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError) as exc:
        return {"gpu": f"unknown ({exc})"}


def meta(experiment: str) -> dict[str, Any]:
    import torch

    return {
        "experiment": experiment,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python3", *sys.argv]),
        "device": device(),
        "torch": torch.__version__,
        "vllm": _vllm_version(),
        "model": "Qwen2.5-7B-Instruct shape, dummy weights, bf16 unless stated, max-model-len 4096",
    }


def _vllm_version() -> str:
    try:
        from importlib.metadata import version

        return version("vllm")
    except Exception as exc:  # the staged kit is not an installed distribution everywhere
        return f"unknown ({exc})"


def bench(out: Path, url: str, *args: str, key: str = KEY) -> dict[str, Any]:
    """``shipyard bench`` as a user runs it; returns its summary.json."""
    command = [sys.executable, "-m", "shipyard.cli", "bench", "--url", url, "--api-key", key, "--out", str(out)]
    log(" ".join(command[2:] + list(args)))
    done = subprocess.run([*command, *args], text=True, capture_output=True)
    print(done.stdout, done.stderr[-2000:] if done.returncode else "", flush=True)
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


def engine_for(
    work: Path, name: str, port: int = ENGINE_PORT, env: dict[str, str] | None = None, **fields: Any
) -> EngineProcess:
    """The campaign's engine (dummy-weight model, served as "qwen", 4k context) with ``fields`` on top; not
    started yet."""
    spec = EngineSpec(
        model=str(fields.pop("model", MODEL)),
        served_model_name="qwen",
        max_model_len=MAX_MODEL_LEN,
        **{"extra_args": BASE_ARGS, **fields},
    )
    return EngineProcess(spec, work / "logs" / f"engine-{name}.log", port=port, env=env)


def start_engine(work: Path, name: str, port: int = ENGINE_PORT, **fields: Any) -> EngineProcess:
    engine = engine_for(work, name, port, **fields)
    started = time.monotonic()
    engine.start()
    engine.wait_ready(600)
    log(f"engine {name} ready in {time.monotonic() - started:.0f} s: {' '.join(engine.spec.vllm_args(port))}")
    return engine


def start_gateway(
    work: Path,
    upstream: str | list[str] | None,
    env: dict[str, str] | None = None,
    model: Path = MODEL,
    port: int = GATEWAY_PORT,
) -> subprocess.Popen[bytes]:
    """``shipyard serve`` in front of ``upstream`` (one URL or several replicas; or managing its own engine of
    ``model`` when it is None)."""
    args = [sys.executable, "-m", "shipyard.cli", "serve", "--port", str(port), "--profile", "default"]
    if upstream:
        args += ["--no-engine"]
        for url in [upstream] if isinstance(upstream, str) else upstream:
            args += ["--upstream", url]
    else:
        args += ["--model", str(model)]
    base_env = {
        "SHIPYARD_API_KEYS": KEY,
        "SHIPYARD_ADMIN_KEYS": ADMIN,
        "SHIPYARD_DATA_DIR": str(work / "data"),
        "SHIPYARD_GATE_DATASET": str(ROOT / "data/intent/test.jsonl"),
    }
    log_file = open(work / "logs" / "gateway.log", "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        args, env={**os.environ, **base_env, **(env or {})}, stdout=log_file, stderr=log_file, start_new_session=True
    )
    wait_until_ready(proc, f"http://127.0.0.1:{port}", 900, str(work / "logs" / "gateway.log"))
    return proc


def wait_for_workers(proc: subprocess.Popen[bytes], workers: int, timeout_s: float = 60) -> None:
    """Until the gateway ``proc`` has spawned its ``workers - 1`` serving workers (``shipyard serve --workers``),
    at most ``timeout_s``."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while len(psutil.Process(proc.pid).children()) < workers - 1 and time.monotonic() < deadline:
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def write(out: Path, name: str, data: dict[str, Any]) -> None:
    (out / name).write_text(json.dumps(data, indent=1))
    log(f"wrote {out / name}")


# ---------------------------------------------------------------------------------------------------------------


def hf_baseline(out: Path, args: argparse.Namespace) -> None:
    """b. HF transformers ``generate`` on the same shape: 512 in / 128 out, batch 1 (what a naive server does for
    each request) and batch 16 (its best case: a static batch of 16)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = json.loads((MODEL / "config.json").read_text())
    cfg = Qwen2Config(**{k: v for k, v in config.items() if k != "architectures"})
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    rows = []
    for batch in (1, 16):
        ids = torch.randint(1000, 20000, (batch, 512), device="cuda")
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm-up
        times = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        # time to first token of generate(): one prefill + one decode step
        torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        ttft = time.perf_counter() - started
        best = min(times)
        rows.append(
            {
                "batch": batch,
                "e2e_ms_runs": [round(t * 1000, 1) for t in times],
                "e2e_ms": round(best * 1000, 1),
                "ttft_ms": round(ttft * 1000, 1),
                "tpot_ms": round((best - ttft) / 127 * 1000, 2),
                "output_tok_per_s": round(batch * 128 / best, 1),
            }
        )
        log(f"HF generate batch {batch}: {rows[-1]}")
    write(out, "hf_baseline.json", {**meta("hf_baseline"), "rows": rows})
    del model
    torch.cuda.empty_cache()


def overhead(out: Path, args: argparse.Namespace) -> None:
    """a. direct vs gateway, 512/128 streaming, concurrency 1/16/64/256; then the ``vllm bench serve``
    cross-check (same server, same load) and d. /v1/intent open loop at 100/200/400 req/s."""
    work = out / "overhead"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    engine = start_engine(work, "default")
    direct = engine.url
    gateway = start_gateway(work, direct)
    gw_url = f"http://127.0.0.1:{GATEWAY_PORT}"
    load = ["--endpoint", "completions", "--input-tokens", "512", "--output-tokens", "128", "--model", "qwen"]
    load += ["--duration", str(args.duration), "--warmup", "3"]
    try:
        legs: dict[str, Any] = {}
        for level in args.levels.split(","):
            for target, url in (("direct", direct), ("gateway", gw_url)):
                legs[f"{target}-c{level}"] = bench(work / f"{target}-c{level}", url, *load, "--concurrency", level)
        write(out, "gateway_overhead.json", {**meta("gateway_overhead"), "legs": legs})

        # vllm bench serve against the engine, then shipyard bench with the same load and request count
        validation: dict[str, Any] = {}
        vb = work / "vllm-bench"
        vb.mkdir(exist_ok=True)
        command = [
            sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "vllm",
            "--base-url", direct, "--model", "qwen", "--tokenizer", str(MODEL), "--dataset-name", "random",
            "--random-input-len", "512", "--random-output-len", "128", "--num-prompts", str(args.validation_prompts),
            "--max-concurrency", "16", "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,90,99", "--save-result", "--result-dir", str(vb), "--result-filename",
            "vllm_bench.json",
        ]  # fmt: skip
        log(" ".join(command[2:]))
        done = subprocess.run(command, capture_output=True, text=True)
        print(done.stdout[-3000:], done.stderr[-2000:], flush=True)
        validation["vllm_bench_serve"] = (
            json.loads((vb / "vllm_bench.json").read_text()) if done.returncode == 0 else {"error": done.stderr[-2000:]}
        )
        for key in ("input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors"):
            if isinstance(validation["vllm_bench_serve"], dict):
                validation["vllm_bench_serve"].pop(key, None)
        validation["shipyard_bench"] = bench(
            work / "shipyard-c16-validation",
            direct,
            *load[:8],
            "--concurrency",
            "16",
            "--requests",
            str(args.validation_prompts),
            "--warmup",
            "0",
        )
        write(out, "validation.json", {**meta("vllm_bench_validation"), **validation})

        intent = bench(
            work / "intent",
            gw_url,
            *("--scenario", "intent", "--rate", args.intent_rates, "--duration", "10", "--warmup", "2"),
        )
        write(out, "intent_slo.json", {**meta("intent_slo"), "bench": intent})
    finally:
        stop(gateway)
        engine.stop(30)


def ablation(out: Path, args: argparse.Namespace) -> None:
    """c. One engine per configuration; chat (shared prefixes) at c=64, random 512/128 at c=64 and c=4."""
    work = out / "ablation"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    results_file = out / "ablation.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {**meta("ablation"), "configs": {}}
    for name in args.configs.split(","):
        engine = start_engine(work, name, **ABLATION[name])
        try:
            common = ["--model", "qwen", "--duration", str(args.duration), "--warmup", "3", "--output-tokens", "128"]
            rows = {
                "chat_c64": bench(
                    work / f"{name}-chat", engine.url, *common, "--scenario", "chat", "--concurrency", "64"
                ),
                "random": bench(
                    work / f"{name}-random",
                    engine.url,
                    *common,
                    *("--endpoint", "completions", "--input-tokens", "512", "--concurrency", "4,64"),
                ),
            }
            results["configs"][name] = {"flags": ABLATION[name], "runs": rows}
        finally:
            engine.stop(30)
        write(out, "ablation.json", results)


def output_tokens_per_request(gateway_url: str, route: str) -> dict[str, float]:
    """From the gateway's own counters: requests on ``route`` and output tokens (a task route's answer has no
    usage block, the gateway still counts what the engine generated)."""
    text = httpx.get(gateway_url + "/metrics", timeout=30).text
    requests = tokens = 0.0
    for line in text.splitlines():
        if line.startswith("shipyard_requests_total{") and f'route="{route}"' in line:
            requests += float(line.rsplit(" ", 1)[1])
        elif line.startswith("shipyard_output_tokens_total{"):
            tokens += float(line.rsplit(" ", 1)[1])
    return {"requests": requests, "output_tokens": tokens, "per_request": tokens / requests if requests else 0.0}


def repeat(out: Path, args: argparse.Namespace) -> None:
    """Repeats of the noisiest cells of the first pass: direct vs gateway at c=256 (A B A B, longer windows),
    and /v1/intent at 200 req/s with the output tokens per classification read from the gateway's counters."""
    work = out / "repeat"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    engine = start_engine(work, "default")
    gateway = start_gateway(work, engine.url)
    gw_url = f"http://127.0.0.1:{GATEWAY_PORT}"
    load = ["--endpoint", "completions", "--input-tokens", "512", "--output-tokens", "128", "--model", "qwen"]
    load += ["--duration", str(args.duration), "--warmup", "5", "--concurrency", "256"]
    try:
        legs: dict[str, Any] = {}
        for attempt in (1, 2):
            for target, url in (("direct", engine.url), ("gateway", gw_url)):
                legs[f"{target}-c256-{attempt}"] = bench(work / f"{target}-c256-{attempt}", url, *load)
        write(out, "repeat_c256.json", {**meta("gateway_overhead_c256_repeat"), "legs": legs})
        intent = bench(work / "intent", gw_url, "--scenario", "intent", "--rate", "200", "--duration", "10")
        tokens = output_tokens_per_request(gw_url, "intent")
        write(out, "intent_tokens.json", {**meta("intent_tokens"), "bench": intent, "gateway_counters": tokens})
    finally:
        stop(gateway)
        engine.stop(30)


def latency_profile(out: Path, args: argparse.Namespace) -> None:
    """The ``latency`` profile candidate (FP8 weights + prefix caching + 2048-token prefill chunks): the ablation's
    scenarios and /v1/intent at 100/200/400 req/s through the gateway."""
    work = out / "latency"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    flags = {"quantization": "fp8", "enable_prefix_caching": True, "max_num_batched_tokens": 2048}
    engine = start_engine(work, "fp8-2048", **flags)
    gateway = start_gateway(work, engine.url)
    gw_url = f"http://127.0.0.1:{GATEWAY_PORT}"
    common = ["--model", "qwen", "--duration", str(args.duration), "--warmup", "3", "--output-tokens", "128"]
    try:
        rows = {
            "chat_c64": bench(work / "chat", engine.url, *common, "--scenario", "chat", "--concurrency", "64"),
            "random": bench(
                work / "random",
                engine.url,
                *common,
                *("--endpoint", "completions", "--input-tokens", "512", "--concurrency", "4,64"),
            ),
        }
        intent = bench(work / "intent", gw_url, "--scenario", "intent", "--rate", args.intent_rates, "--duration", "10")
        tokens = output_tokens_per_request(gw_url, "intent")
        write(
            out,
            "latency_profile.json",
            {**meta("latency_profile"), "flags": flags, "runs": rows, "intent": intent, "gateway_counters": tokens},
        )
    finally:
        stop(gateway)
        engine.stop(30)


def rollout(out: Path, args: argparse.Namespace) -> None:
    """e. Two replicas on one GPU (0.4 of its memory each): blue-green from v1 to v2 under 64 streams."""
    work = out / "rollout"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    v1, v2 = Path("/root/qwen-v1"), Path("/root/qwen-v2")
    for target in (v1, v2):
        if not target.exists():
            shutil.copytree(MODEL, target)
    env = {
        "SHIPYARD_ENGINE__GPU_MEMORY_UTILIZATION": "0.4",
        "SHIPYARD_ENGINE__MAX_MODEL_LEN": str(MAX_MODEL_LEN),
        "SHIPYARD_ENGINE__EXTRA_ARGS": json.dumps(list(BASE_ARGS)),
        "SHIPYARD_SERVED_MODEL_NAME": "qwen",
        "SHIPYARD_VERSION_LABEL": "v1",
    }
    gateway = start_gateway(work, None, env, model=v1)
    try:
        result = bench(
            work / "bench",
            f"http://127.0.0.1:{GATEWAY_PORT}",
            *("--scenario", "rollout", "--deploy", str(v2), "--deploy-version", "v2", "--admin-key", ADMIN),
            *("--concurrency", "64", "--duration", str(args.rollout_duration), "--warmup", "3", "--rollout-at", "10"),
            *("--output-tokens", "128", "--model", "qwen"),
        )
        write(out, "rollout.json", {**meta("rollout_gpu"), "bench": result})
    finally:
        stop(gateway)


def gpu_memory_mib() -> int | None:
    try:
        line = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()[0]  # fmt: skip
        return int(line.strip())
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError):
        return None


def sleep_mode(out: Path, args: argparse.Namespace) -> None:
    """Issue 35: ``autoscale.idle: sleep`` through shipyard's own scaler on one GPU. Two replicas (0.4 of the
    GPU each); ``/admin/scale`` to 1: the scaler drains one and puts its engine to sleep (vLLM's sleep mode,
    level 1); then back to 2: it wakes that engine instead of starting one. Times each step, the GPU memory in
    use after each, and one chat request through the gateway after each."""
    work = out / "sleep"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    import yaml

    config = work / "shipyard.yaml"
    entry = {
        "name": "qwen",
        "source": str(MODEL),
        "version": "v1",
        "replicas": 2,
        "engine": {
            "gpu_memory_utilization": 0.4,
            "max_model_len": MAX_MODEL_LEN,
            "extra_args": [*BASE_ARGS, "--enforce-eager"],  # no graph capture: two engines start in the call
        },
        "autoscale": {
            "min_replicas": 1,
            "max_replicas": 2,
            "idle": "sleep",
            "target_waiting": 2,
            "scale_in_after_s": 3600,
        },  # fmt: skip
    }
    config.write_text(yaml.safe_dump({"models": [entry]}))
    env = {
        **os.environ,
        "SHIPYARD_API_KEYS": KEY,
        "SHIPYARD_ADMIN_KEYS": ADMIN,
        "SHIPYARD_DATA_DIR": str(work / "data"),
    }
    log_file = open(work / "logs" / "gateway.log", "ab")  # noqa: SIM115 - lives as long as the process
    args_ = [sys.executable, "-m", "shipyard.cli", "serve", "--config", str(config), "--port", str(GATEWAY_PORT),
             "--profile", "default"]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(args_, env=env, stdout=log_file, stderr=log_file, start_new_session=True)
    url = f"http://127.0.0.1:{GATEWAY_PORT}"
    admin = {"Authorization": f"Bearer {ADMIN}"}
    result: dict[str, Any] = {**meta("sleep_gpu"), "settings": entry, "steps": []}
    try:
        wait_until_ready(proc, url, args.ready_timeout, str(work / "logs" / "gateway.log"))
        result["two_engines_started_s"] = round(time.monotonic() - started, 1)

        def chat() -> dict[str, Any]:
            t0 = time.monotonic()
            answer = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                                json={"model": "qwen", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 16, "ignore_eos": True})  # fmt: skip
            return {"status": answer.status_code, "seconds": round(time.monotonic() - t0, 3)}

        def scale_to(n: int, done: Any) -> dict[str, Any]:
            t0 = time.monotonic()
            httpx.post(f"{url}/admin/scale", headers=admin, json={"replicas": n}, timeout=30).raise_for_status()
            status: dict[str, Any] = {}
            while time.monotonic() - t0 < 600:
                status = httpx.get(f"{url}/admin/scale", headers=admin, timeout=30).json()
                if done(status["replicas"]):
                    break
                time.sleep(0.1)
            return {"to": n, "seconds": round(time.monotonic() - t0, 2), "replicas": status.get("replicas"),
                    "gpu_memory_used_mib": gpu_memory_mib(), "request_after": chat()}  # fmt: skip

        result["gpu_memory_used_mib_two_awake"] = gpu_memory_mib()
        result["request_before"] = chat()
        result["steps"].append(scale_to(1, lambda r: r["sleeping"] == 1 and r["serving"] == 1))
        result["steps"].append(scale_to(2, lambda r: r["serving"] == 2 and r["sleeping"] == 0))
        audit = work / "data" / "audit.jsonl"
        result["audit"] = [
            json.loads(line)
            for line in (audit.read_text().splitlines() if audit.exists() else [])
            if '"replica_' in line or '"scale_' in line or "wake" in line
        ]
    finally:
        stop(proc)
        subprocess.run([sys.executable, "-m", "shipyard.cli", "stop"], env=env, capture_output=True, timeout=120)
    write(out, "sleep.json", result)


# Multi-GPU layouts (issue 5): name -> one entry per engine, each (GPU indices, EngineSpec fields).
LAYOUTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "single": [("0", {})],
    "dp2": [("0", {}), ("1", {})],
    # vLLM 0.26 fuses all-reduce + RMSNorm through FlashInfer's "mnnvl" backend on Hopper TP, which needs NVLink
    # multicast: off here (the first TP2 start died in it with an illegal memory access), so the fusion is off.
    "tp2": [
        (
            "0,1",
            {
                "tensor_parallel_size": 2,
                "extra_args": (*BASE_ARGS, "--compilation-config", '{"pass_config": {"fuse_allreduce_rms": false}}'),
            },
        )
    ],
}
# NVLink multicast must stay off on the lent machines (it can take the host's shared GPUs out of service);
# vLLM's symmetric-memory all-reduce would use multimem on Hopper, so TP uses its custom (CUDA IPC) all-reduce.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def multigpu(out: Path, args: argparse.Namespace) -> None:
    """Issue 5: the same model on two GPUs as tensor parallel 2 (one engine) or as two data-parallel replicas (one
    engine per GPU, both behind the gateway), plus one GPU alone for scale. Load: random 512/128 at
    ``--levels`` streams and the shared-prefix chat scenario at 64 and 256, all through the gateway."""
    for name, value in NO_MULTICAST.items():
        if os.environ.get(name, value) != value:
            raise SystemExit(f"{name}={os.environ[name]}: NVLink multicast must stay off on this machine")
    results_file = out / "multigpu.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {**meta("multigpu"), "layouts": {}}
    for layout in args.layouts.split(","):
        work = out / "multigpu" / layout
        (work / "logs").mkdir(parents=True, exist_ok=True)
        engines: list[EngineProcess] = []
        started = time.monotonic()
        try:
            # start every engine first, then wait: the replicas of dp2 load side by side
            for index, (gpus, fields) in enumerate(LAYOUTS[layout]):
                env = {"CUDA_VISIBLE_DEVICES": gpus, "VLLM_ALLREDUCE_USE_SYMM_MEM": "0", **NO_MULTICAST}
                engine = engine_for(work, str(index), ENGINE_PORT + index, env, **fields)
                engine.start()
                engines.append(engine)
            for engine in engines:
                engine.wait_ready(args.ready_timeout)
            start_s = time.monotonic() - started
            log(f"{layout}: {len(engines)} engine(s) ready in {start_s:.0f} s")
            gateway = start_gateway(work, [e.url for e in engines])
            gw_url = f"http://127.0.0.1:{GATEWAY_PORT}"
            common = ["--model", "qwen", "--duration", str(args.duration), "--warmup", "3", "--output-tokens", "128"]
            try:
                runs = {
                    "random": bench(
                        work / "random",
                        gw_url,
                        *common,
                        *("--endpoint", "completions", "--input-tokens", "512", "--concurrency", args.levels),
                    ),
                }
                if args.chat_levels:
                    runs["chat"] = bench(
                        work / "chat", gw_url, *common, "--scenario", "chat", "--concurrency", args.chat_levels
                    )
            finally:
                stop(gateway)
            results["layouts"][layout] = {
                "engines": [{"gpus": gpus, "flags": fields} for gpus, fields in LAYOUTS[layout]],
                "engine_start_s": round(start_s, 1),
                "runs": runs,
            }
            write(out, "multigpu.json", results)
        finally:
            for engine in engines:
                engine.stop(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("experiment", choices=[*EXPERIMENTS])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--levels", default="1,16,64,256")
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--validation-prompts", type=int, default=320)
    parser.add_argument("--intent-rates", default="100,200,400")
    parser.add_argument("--configs", default=",".join(ABLATION))
    parser.add_argument("--rollout-duration", type=float, default=150)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--chat-levels", default="64,256", help="multigpu: chat concurrencies ('' for none)")
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for the engines")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    EXPERIMENTS[args.experiment](args.out, args)


EXPERIMENTS = {
    "hf": hf_baseline,
    "overhead": overhead,
    "ablation": ablation,
    "rollout": rollout,
    "repeat": repeat,
    "latency": latency_profile,
    "multigpu": multigpu,
    "sleep": sleep_mode,
}

if __name__ == "__main__":
    main()
