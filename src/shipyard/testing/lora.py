"""A small random LoRA adapter in PEFT's on-disk format, for exercising runtime LoRA loading without training."""

from __future__ import annotations

import json
from pathlib import Path


def write_random_adapter(
    folder: Path, base_model_dir: Path, *, rank: int = 8, seed: int = 0, scale: float = 0.01
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (q_proj, v_proj) for a Llama-style base."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((base_model_dir / "config.json").read_text())
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // int(config["num_attention_heads"]))
    kv_out = int(config.get("num_key_value_heads", config["num_attention_heads"])) * head_dim
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(int(config["num_hidden_layers"])):
        for module, out_features in (("q_proj", hidden), ("v_proj", kv_out)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * scale
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * scale
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors")
    )
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "base_model_name_or_path": str(base_model_dir),
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": 2 * rank,
                "lora_dropout": 0.0,
                "bias": "none",
                "target_modules": ["q_proj", "v_proj"],
                "fan_in_fan_out": False,
                "inference_mode": True,
            },
            indent=2,
        )
    )
    return folder
