"""Task datasets (JSONL). Malformed lines are reported with their line number and skipped, or rejected."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class DatasetError(ValueError):
    """A dataset cannot be used (missing, empty, or malformed in strict mode)."""


class IntentExample(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    text: str = Field(min_length=1)
    label: str = Field(min_length=1)
    ambiguous: bool = False
    alt_label: str | None = None
    tags: list[str] = Field(default_factory=list)


class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: str = Field(pattern="^(system|user|assistant)$")
    content: str = Field(min_length=1)


class ReplyExample(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    messages: list[Turn] = Field(min_length=1)
    reference: str = Field(min_length=1)
    template: str | None = None


E = TypeVar("E", bound=BaseModel)


@dataclass
class Dataset(Generic[E]):
    path: Path
    examples: list[E]
    skipped: list[str] = field(default_factory=list)
    """One ``line N: problem`` entry per malformed line that was left out."""


def load_jsonl(
    path: Path, schema: type[E], *, strict: bool = False, check: Callable[[E], str | None] | None = None
) -> Dataset[E]:
    """Parse every line with ``schema``; bad lines are collected (or raise in ``strict`` mode)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc.strerror}") from None
    examples: list[E] = []
    skipped: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        problem: str | None = None
        try:
            data: Any = json.loads(line)
            example = schema.model_validate(data)
            problem = check(example) if check else None
        except json.JSONDecodeError as exc:
            problem = f"not JSON ({exc.msg})"
        except ValidationError as exc:
            err = exc.errors()[0]
            problem = f"{'.'.join(str(p) for p in err['loc']) or 'line'}: {err['msg']}"
        if problem:
            if strict:
                raise DatasetError(f"{path} line {number}: {problem}")
            skipped.append(f"line {number}: {problem}")
        else:
            examples.append(example)
    if not examples:
        raise DatasetError(f"{path} has no usable examples" + (f" ({skipped[0]}, ...)" if skipped else ""))
    return Dataset(path, examples, skipped)


def load_intent_dataset(path: Path, labels: list[str], *, strict: bool = False) -> Dataset[IntentExample]:
    known = set(labels)

    def check(example: IntentExample) -> str | None:
        return None if example.label in known else f"label {example.label!r} is not in the label set"

    return load_jsonl(path, IntentExample, strict=strict, check=check)


def load_reply_dataset(path: Path, *, strict: bool = False) -> Dataset[ReplyExample]:
    def check(example: ReplyExample) -> str | None:
        return None if any(t.role == "user" for t in example.messages) else "no user message"

    return load_jsonl(path, ReplyExample, strict=strict, check=check)


CHECKOUT = Path(__file__).resolve().parents[3]
"""The source checkout of an editable install (its data/ holds the task datasets)."""


def project_data(relative: str) -> Path:
    """``data/...`` under the working directory when it is there, else in the checkout shipyard runs from."""
    path = Path(relative)
    return path if path.exists() or not (CHECKOUT / path).exists() else CHECKOUT / path
