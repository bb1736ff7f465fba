"""``shipyard prepare merge``: fold a LoRA adapter into its base model with peft (``merge_and_unload``, safe merge),
keeping the base's dtype, tokenizer, chat template and generation config, so the result is a plain HF folder
that vLLM (and any quantizer) loads like the base.

The adapter is checked against the base before anything is loaded: every module it adapts must exist in the base
with the shapes the adapter was trained for, or the merge stops with the first mismatch named.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
"""Copied from the base, then from the adapter folder where it has its own (a tokenizer with added tokens)."""


class MergeError(ValueError):
    """The merge cannot be done; the message names the problem in one line."""


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError:
        raise MergeError(f"{what}: {path} is missing") from None
    except ValueError as exc:
        raise MergeError(f"{what}: {path} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise MergeError(f"{what}: {path} is not a JSON object")
    return data


def _tensor_shapes(folder: Path, prefix: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the safetensors files of ``folder`` whose name starts with ``prefix``,
    read from the headers only."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(folder.glob(f"{prefix}*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def check_adapter(base: Path, adapter: Path) -> dict[str, Any]:
    """The adapter's config, once every adapted module is known to fit the base; MergeError otherwise."""
    _read_json(base / "config.json", "base model")
    config = _read_json(adapter / "adapter_config.json", "LoRA adapter")
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"adapter {adapter} is a {config.get('peft_type')} adapter, not LoRA")
    if not any((adapter / name).is_file() for name in ADAPTER_WEIGHTS):
        raise MergeError(f"adapter {adapter} has no weights ({' or '.join(ADAPTER_WEIGHTS)})")
    base_shapes = _tensor_shapes(base, "model")
    if not base_shapes:
        raise MergeError(f"base model {base} has no safetensors weights")
    if not (adapter / ADAPTER_WEIGHTS[0]).is_file():
        return config  # .bin adapters: shapes are checked by peft while loading
    for name, shape in sorted(_tensor_shapes(adapter, "adapter_model").items()):
        module, _, kind = name.partition(".lora_")
        if not kind:
            continue
        base_name = module.removeprefix("base_model.model.") + ".weight"
        expected = base_shapes.get(base_name)
        if expected is None:
            raise MergeError(
                f"adapter {adapter} adapts {base_name.removesuffix('.weight')}, which the base {base} does not have "
                f"(base_model_name_or_path in the adapter: {config.get('base_model_name_or_path')!r})"
            )
        out_features, in_features = expected[0], expected[-1]
        if kind.startswith("A") and shape[-1] != in_features or kind.startswith("B") and shape[0] != out_features:
            raise MergeError(
                f"adapter {adapter} does not fit base {base}: {module.removeprefix('base_model.model.')} is "
                f"{out_features}x{in_features} in the base, the adapter's lora_{kind.split('.')[0]} is "
                f"{'x'.join(map(str, shape))} (trained for another base: "
                f"{config.get('base_model_name_or_path')!r})"
            )
    return config


def merge_lora(base: Path, adapter: Path, out: Path, *, dtype: str | None = None) -> dict[str, Any]:
    """Write the merged model into ``out`` (an empty folder); returns the recipe to record in the manifest."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_config = check_adapter(base, adapter)
    base_config = _read_json(base / "config.json", "base model")
    dtype_name = dtype or str(base_config.get("torch_dtype") or base_config.get("dtype") or "float32")
    torch_dtype = getattr(torch, dtype_name, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise MergeError(f"unknown dtype {dtype_name!r} (use bfloat16, float16 or float32)")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch_dtype)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as exc:  # shape or key mismatches found while loading (.bin)
        raise MergeError(f"adapter {adapter} does not load onto base {base}: {str(exc).splitlines()[0]}") from None
    merged = peft_model.merge_and_unload(safe_merge=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    copied = []
    for source in (base, adapter):
        for name in SIDE_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, out / name)
                copied.append(f"{source.name}/{name}")
    return {
        "step": "merge",
        "base": str(base),
        "adapter": str(adapter),
        "dtype": dtype_name,
        "lora": {k: adapter_config.get(k) for k in ("r", "lora_alpha", "target_modules", "base_model_name_or_path")},
        "safe_merge": True,
        "tied_embeddings": bool(base_config.get("tie_word_embeddings")),
        "copied": copied,
    }
