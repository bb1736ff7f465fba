"""Customer-service replies: the model summarises the complaint and writes the variable parts of a template
under a JSON schema; shipyard validates the draft and renders the reply from the template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shipyard.tasks.config import TaskConfigError, packaged, read_yaml_mapping

DEFAULT_TEMPLATE = "standard"


class ReplyTemplate(BaseModel):
    """Fixed ``greeting``/``closing`` text, and instructions for the parts the model writes."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    greeting: str = Field(min_length=1)
    apology: str = Field(min_length=1)
    resolution: str = Field(min_length=1)
    closing: str = Field(min_length=1)


def load_templates(path: Path | None = None) -> dict[str, ReplyTemplate]:
    """Read a templates YAML (name -> template); None means the packaged ones."""
    source = path or packaged("reply_templates.yaml")
    templates: dict[str, ReplyTemplate] = {}
    for name, body in read_yaml_mapping(source).items():
        try:
            templates[str(name)] = ReplyTemplate.model_validate(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise TaskConfigError(f"{source}: template {name!r} field {where or '?'}: {err['msg']}") from None
    return templates


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1, max_length=8000)


def _reply_schema(schema: dict[str, Any]) -> None:
    """The JSON schema says what the validator checks: at least one customer (user) message."""
    schema["properties"]["messages"]["contains"] = {"type": "object", "properties": {"role": {"const": "user"}}}


class ReplyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_reply_schema)

    messages: list[Message] = Field(min_length=1, max_length=50)
    template: str | None = Field(
        default=None, description="One of the gateway's configured templates; another is a 400 (unknown_template)."
    )
    model: str | None = None

    @field_validator("messages")
    @classmethod
    def _has_customer_turn(cls, value: list[Message]) -> list[Message]:
        if not any(m.role == "user" for m in value):
            raise ValueError("the conversation needs at least one user (customer) message")
        return value


class Summary(BaseModel):
    issue: str = Field(min_length=3, max_length=240)
    demands: list[str] = Field(max_length=5)
    sentiment: Literal["negative", "neutral", "positive"]

    @field_validator("demands")
    @classmethod
    def _non_empty_items(cls, value: list[str]) -> list[str]:
        if any(not item.strip() for item in value):
            raise ValueError("demands must not contain empty strings")
        return [item.strip() for item in value]


class ReplyDraft(BaseModel):
    """What the model must produce (validated before anything is returned)."""

    summary: Summary
    apology: str = Field(min_length=3, max_length=320)
    resolution_steps: list[str] = Field(min_length=1, max_length=3)

    @field_validator("resolution_steps")
    @classmethod
    def _non_empty_steps(cls, value: list[str]) -> list[str]:
        if any(len(step.strip()) < 3 for step in value):
            raise ValueError("each resolution step must be a sentence")
        return [step.strip() for step in value]


class ReplyResponse(BaseModel):
    summary: Summary
    reply: str
    template: str
    model: str
    latency_ms: float


# Written out (no $ref) so every structured-output backend accepts it; mirrors ReplyDraft.
DRAFT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "summary": {
            "type": "object",
            "properties": {
                "issue": {"type": "string", "minLength": 3, "maxLength": 240},
                "demands": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1, "maxLength": 120},
                    "maxItems": 5,
                },
                "sentiment": {"type": "string", "enum": ["negative", "neutral", "positive"]},
            },
            "required": ["issue", "demands", "sentiment"],
            "additionalProperties": False,
        },
        "apology": {"type": "string", "minLength": 3, "maxLength": 320},
        "resolution_steps": {
            "type": "array",
            "items": {"type": "string", "minLength": 3, "maxLength": 240},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["summary", "apology", "resolution_steps"],
    "additionalProperties": False,
}


def longest_draft_chars(schema: Mapping[str, Any]) -> int:
    """Characters of the longest JSON the draft schema allows (every string and list at its maximum, no
    whitespace): every string of it has a ``maxLength``, so the grammar closes each one in bounded time."""
    kind = schema.get("type")
    if kind == "object":
        props = schema["properties"]
        return 2 + len(props) - 1 + sum(len(json.dumps(k)) + 1 + longest_draft_chars(v) for k, v in props.items())
    if kind == "array":
        items = int(schema["maxItems"])
        return 2 + max(items - 1, 0) + items * longest_draft_chars(schema["items"])
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"])
    return 2 + int(schema["maxLength"])


DRAFT_MAX_TOKENS = 600
"""The draft's token budget. Every string of the schema is bounded (``longest_draft_chars``: 1,997 characters at
most), so no field can run on until the budget ends; 600 tokens hold the longest draft at 3.3 characters a token
(these tokenizers take 3-4 on this English text). A budget sized for 2 characters a token (1,062) was tried and
not kept: a small quantized model's looping answers run to whatever the budget is, and the CPU evaluations of
every version (the quantize search) pay for it."""


def reply_body(model: str, template: ReplyTemplate, messages: Sequence[Message]) -> dict[str, Any]:
    conversation = "\n".join(f"{m.role.upper()}: {m.content}" for m in messages if m.role != "system")
    system = (
        "You are a customer-support assistant. Read the conversation between a customer (USER) and support "
        "(ASSISTANT) and answer with JSON only:\n"
        "- summary.issue: the customer's problem in one sentence\n"
        "- summary.demands: what the customer asks us to do, as short phrases\n"
        "- summary.sentiment: negative, neutral or positive\n"
        f"- apology: {template.apology}\n"
        f"- resolution_steps: {template.resolution}"
    )
    return {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": conversation}],
        "temperature": 0,
        # Small models loop under greedy decoding; a mild penalty keeps the JSON strings short and varied.
        "repetition_penalty": 1.15,
        "max_tokens": DRAFT_MAX_TOKENS,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "support_reply", "schema": DRAFT_SCHEMA, "strict": True},
        },
    }


class DraftError(ValueError):
    """The model's answer is not a valid draft; the message says why."""


def parse_draft(completion: Mapping[str, Any]) -> ReplyDraft:
    choice = completion["choices"][0]
    content = choice["message"].get("content") or ""
    if choice.get("finish_reason") == "length":
        raise DraftError("the answer was cut off at max_tokens before the JSON was complete")
    try:
        return ReplyDraft.model_validate(json.loads(content))
    except json.JSONDecodeError as exc:
        raise DraftError(f"the answer is not JSON: {exc.msg} at char {exc.pos}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "draft"
        raise DraftError(f"the answer does not match the schema: {where}: {err['msg']}") from None


def render_reply(template: ReplyTemplate, draft: ReplyDraft) -> str:
    steps = "\n".join(f"{i}. {step}" for i, step in enumerate(draft.resolution_steps, 1))
    return f"{template.greeting}\n\n{draft.apology}\n\n{steps}\n\n{template.closing}"
