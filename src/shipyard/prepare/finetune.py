"""``shipyard prepare finetune``: a small, seeded LoRA (peft) on the intent train set, on CPU.

Each example is exactly what ``/v1/intent`` sends (its system prompt with the label descriptions, the user's text)
followed by the label as the assistant's answer; the loss covers the answer only. The adapter is saved in PEFT's
format (``adapter_config.json`` + ``adapter_model.safetensors``) with a ``training_report.json`` (loss per step).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class FinetuneError(ValueError):
    """Fine-tuning cannot be done; the message says why in one line."""


def intent_examples(path: Path, labels_file: Path | None = None) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt messages, answer) per line of an intent JSONL, rendered as the intent endpoint asks."""
    from shipyard.tasks.datasets import DatasetError, load_intent_dataset
    from shipyard.tasks.intent import load_labels, system_prompt

    labels = load_labels(labels_file)
    try:
        data = load_intent_dataset(path, labels.labels)
    except DatasetError as exc:
        raise FinetuneError(str(exc)) from None
    system = system_prompt(labels)
    return [
        ([{"role": "system", "content": system}, {"role": "user", "content": e.text}], e.label) for e in data.examples
    ]


def finetune_lora(
    base: Path,
    data: Path,
    out: Path,
    *,
    epochs: int = 2,
    rank: int = 8,
    alpha: int = 16,
    learning_rate: float = 5e-4,
    batch_size: int = 8,
    seed: int = 0,
    max_steps: int | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train a LoRA adapter of ``base`` on ``data`` and save it into ``out``; returns the training report."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    examples = intent_examples(data)
    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.05, target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    encoded = []
    for messages, answer in examples:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]
        encoded.append((full_ids, labels))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses: list[float] = []
    started = time.perf_counter()
    step = 0
    total = max_steps or epochs * ((len(encoded) + batch_size - 1) // batch_size)
    for _epoch in range(epochs):
        order = list(range(len(encoded)))
        random.shuffle(order)
        for start in range(0, len(order), batch_size):
            batch = [encoded[i] for i in order[start : start + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
            attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
            targets = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
            loss = model(input_ids=input_ids, attention_mask=attention, labels=targets).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(round(loss.detach().item(), 4))
            step += 1
            if step % 10 == 0 or step == total:
                say(f"  step {step}/{total}: loss {losses[-1]:.3f} ({time.perf_counter() - started:.0f} s)")
            if step >= total:
                break
        if step >= total:
            break
    model.save_pretrained(str(out))
    report = {
        "base": str(base),
        "data": str(data),
        "examples": len(encoded),
        "epochs": epochs,
        "steps": step,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "rank": rank,
        "alpha": alpha,
        "target_modules": TARGET_MODULES,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "losses": losses,
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=1))
    return report
