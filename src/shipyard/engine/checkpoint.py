"""Whether a running engine can take another checkpoint's weights in place (vLLM ``reload_weights``).

Read from the folders alone, before anything is paused: the model config's architecture and shape, dtype and
quantization scheme, the tokenizer, and every tensor's name, dtype and shape from the safetensors headers (the
first 8 bytes give the header's length; no tensor data is read).

>>> first_difference(Path("/models/v1"), Path("/models/v2"))     # doctest: +SKIP
'tensor model.layers.0.mlp.up_proj.weight: shape [4864, 896] in the running version, [9728, 896] in the new one'
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

SHAPE_KEYS = (
    "architectures",
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
    "rope_theta",
    "torch_dtype",
    "dtype",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


class CheckpointError(ValueError):
    """A folder that is not a loadable safetensors checkpoint (the message says why)."""


def tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) over every ``*.safetensors`` file of ``folder``."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no *.safetensors files")
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        try:
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if not 0 < length < 100_000_000:
                    raise CheckpointError(f"{path} does not start with a safetensors header")
                header: dict[str, Any] = json.loads(handle.read(length))
        except (OSError, struct.error, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
        for name, info in header.items():
            if name != "__metadata__":
                found[name] = (str(info["dtype"]), tuple(int(d) for d in info["shape"]))
    return found


def _config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}/config.json cannot be read ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder}/config.json is not an object")
    return config


def _quantization(config: dict[str, Any]) -> Any:
    scheme = config.get("quantization_config")
    if not isinstance(scheme, dict):
        return scheme
    return {k: v for k, v in scheme.items() if k in ("quant_method", "format", "config_groups", "bits", "group_size")}


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def first_difference(running: Path, new: Path) -> str | None:
    """None when ``new`` can replace ``running``'s weights in place; otherwise the first difference, for people."""
    try:
        old_config, new_config = _config(running), _config(new)
        for key in SHAPE_KEYS:
            if old_config.get(key) != new_config.get(key):
                old, fresh = old_config.get(key), new_config.get(key)
                return f"config {key}: {old!r} in the running version, {fresh!r} in the new one"
        if _quantization(old_config) != _quantization(new_config):
            return "quantization scheme differs (quantization_config)"
        for name in TOKENIZER_FILES:
            if _digest(running / name) != _digest(new / name):
                return f"tokenizer file {name} differs"
        old_tensors, new_tensors = tensors(running), tensors(new)
    except CheckpointError as exc:
        return str(exc)
    for name in sorted(old_tensors.keys() | new_tensors.keys()):
        old, fresh = old_tensors.get(name), new_tensors.get(name)
        if old is None or fresh is None:
            where = "the new one" if old is None else "the running version"
            return f"tensor {name} is only in {where}"
        if old != fresh:
            return (
                f"tensor {name}: {old[0]} {list(old[1])} in the running version, "
                f"{fresh[0]} {list(fresh[1])} in the new one"
            )
    return None


GENERATIVE_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")


def model_kind(folder: Path) -> str:
    """``generate`` for a checkpoint with a language-model head (chat, completions), ``embed`` for the others
    vLLM serves as pooling models (a bare encoder such as all-MiniLM-L6-v2's ``BertModel``)."""
    architectures = _config(folder).get("architectures") or []
    if not architectures or any(str(a).endswith(GENERATIVE_SUFFIXES) for a in architectures):
        return "generate"
    return "embed"
