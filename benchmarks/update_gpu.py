"""Whole-model updates of the Qwen2.5-7B shape on one GPU, through `shipyard serve` itself: in place vs blue-green.

Run on the device (after the shared/gpu kit's staging): writes real random-weight safetensors checkpoints of the
Qwen2.5-7B shape (as shared/gpu/device/inplace_probe.sh does: ~15 GB each, different seeds) unless they exist,
starts `shipyard serve` on the first (both engines of a blue-green fit: gpu_memory_utilization 0.42 each), and
under N streaming clients (128 output tokens, ignore_eos) plus greedy checkers rolls out the other version:
`--strategy inplace` for each --streams level, and with --blue-green the same update as blue-green too.

    python3 benchmarks/update_gpu.py --out $OUT/update --streams 16 64
    python3 benchmarks/update_gpu.py --out $OUT/update-bg --streams 16 --blue-green

Writes update-gpu.json under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import update_cpu  # noqa: E402  (the same stack, checkers and measurements as on the CPU)
from update_cpu import Stack, update_under_load  # noqa: E402

MAKE_CHECKPOINT = r"""
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
folder, seed = sys.argv[1], int(sys.argv[2])
torch.manual_seed(seed)
cfg = AutoConfig.from_pretrained(folder)
with torch.device("meta"):
    m = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
shard, size, idx, n = {}, 0, {}, 0
def flush():
    global shard, size, n
    if shard:
        n += 1; name = f"model-{n:05d}.safetensors"; save_file(shard, f"{folder}/{name}", metadata={"format": "pt"})
        idx.update({k: name for k in shard}); shard, size = {}, 0
for k, p in m.state_dict().items():
    shard[k] = (torch.randn(p.shape, dtype=torch.bfloat16, device="cuda") * 0.02).cpu(); size += p.numel() * 2
    if size > 4e9: flush()
flush()
json.dump({"metadata": {"total_size": sum(p.numel() * 2 for p in m.state_dict().values())}, "weight_map": idx},
          open(f"{folder}/model.safetensors.index.json", "w"))
"""


def checkpoint(folder: Path, seed: int) -> float:
    """A real random-weight checkpoint of the Qwen2.5-7B shape in ``folder``; seconds it took (0 if present)."""
    if (folder / "model.safetensors.index.json").is_file():
        return 0.0
    started = time.monotonic()
    subprocess.run(["bash", ".gpu/bin/mkmodel.sh", str(folder)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-c", MAKE_CHECKPOINT, str(folder), str(seed)], check=True)
    return round(time.monotonic() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--streams", type=int, nargs="+", default=[16])
    parser.add_argument("--blue-green", action="store_true")
    parser.add_argument("--root", type=Path, default=Path("/root/update"))
    args = parser.parse_args()

    versions = [args.root / "qwen-a", args.root / "qwen-b"]
    made = {str(v): checkpoint(v, seed) for seed, v in enumerate(versions)}
    work = args.root / f"run-{int(time.time())}"
    work.mkdir(parents=True)
    update_cpu.MODEL = "qwen"
    update_cpu.PROMPTS = ["Tell me about ships."]
    stack = Stack(work, command="serve")  # no chat page on the device (no gradio there)
    stack.env.update(
        {
            "SHIPYARD_MODEL": str(versions[0]),
            "SHIPYARD_SERVED_MODEL_NAME": "qwen",
            "SHIPYARD_VERSION_LABEL": "a0",
            "SHIPYARD_ENGINE__PROFILE": "default",
            "SHIPYARD_ENGINE__MAX_MODEL_LEN": "4096",
            "SHIPYARD_ENGINE__GPU_MEMORY_UTILIZATION": "0.42",
            "SHIPYARD_ENGINE__STARTUP_TIMEOUT_S": "900",
        }
    )
    report: dict[str, Any] = {
        "command": " ".join(["benchmarks/update_gpu.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "gpu": _gpu()},
        "model": "Qwen2.5-7B shape, real random bf16 safetensors (~15 GB per version), max_model_len 4096",
        "checkpoint_written_s": made,
        "runs": [],
    }
    try:
        report["cold_start_s"] = round(stack.up(900), 1)
        print(f"cold start {report['cold_start_s']} s; checkpoints {made}", flush=True)
        expected = {"a0": update_cpu.greedy(stack.url, update_cpu.PROMPTS[0])[1]}
        current = 0
        for i, streams in enumerate(args.streams):
            target = versions[1 - current]
            version = f"{'ab'[1 - current]}{i + 1}"
            run = update_under_load(
                stack, target, version, expected, "--strategy", "inplace", streams=streams, max_tokens=128
            )
            run["checkers"] = run["checkers"].verdict(expected)
            report["runs"].append({"strategy": "inplace", "streams": streams, **run})
            current = 1 - current
            save(args.out, report)
        if args.blue_green:
            streams = args.streams[0]
            target = versions[1 - current]
            run = update_under_load(
                stack, target, f"{'ab'[1 - current]}-bg", expected, "--strategy", "blue-green", streams=streams,
                max_tokens=128,
            )  # fmt: skip
            run["checkers"] = run["checkers"].verdict(expected)
            report["runs"].append({"strategy": "blue-green", "streams": streams, **run})
            save(args.out, report)
    finally:
        stack.cli("stop", timeout=180)
        save(args.out, report)
        subprocess.run(["cp", str(stack.log), str(args.out / "up.log")], check=False)


def save(out: Path, report: dict[str, Any]) -> None:
    """Written after every run: a call cut short by its time limit still brings back what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "update-gpu.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    for run in report["runs"][-1:]:
        brief = {k: run.get(k) for k in ("strategy", "streams", "cli_s", "phase", "error", "load", "checkers")}
        print(json.dumps(brief, default=str), flush=True)


def _gpu() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
