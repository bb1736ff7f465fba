"""Validation of OpenAI request bodies before they reach an engine.

Only the fields the gateway must be sure of are typed; every other field passes through to vLLM untouched.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from shipyard.gateway.errors import OpenAIError

# vLLM removed these request fields; it ignores them silently, which would return unconstrained text.
REMOVED_FIELDS = {
    "guided_json": 'structured_outputs: {"json": <schema>} (or response_format: {"type": "json_schema", ...})',
    "guided_regex": 'structured_outputs: {"regex": <pattern>}',
    "guided_choice": 'structured_outputs: {"choice": [...]}',
    "guided_grammar": 'structured_outputs: {"grammar": <grammar>}',
    "guided_decoding_backend": "the engine's --structured-outputs-config (a server setting)",
    "guided_whitespace_pattern": "structured_outputs: {...} with the engine's whitespace settings",
}


class _Passthrough(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class ChatMessage(_Passthrough):
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[dict[str, Any]] | None = None


class _Sampling(_Passthrough):
    model: str = Field(min_length=1)
    stream: StrictBool = False
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=16)
    stream_options: dict[str, Any] | None = None

    def output_limit(self) -> int | None:
        """The most tokens this request may generate, as the client asked."""
        return self.max_tokens


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise OpenAIError(400, "empty request body: send a JSON object", code="invalid_json")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "request body must be a JSON object", code="invalid_json")
    return data


def reject_removed_fields(data: dict[str, Any]) -> None:
    for name, replacement in REMOVED_FIELDS.items():
        if name in data:
            raise OpenAIError(
                400,
                f"'{name}' was removed from vLLM and would be silently ignored; use {replacement} instead",
                param=name,
                code="unsupported_parameter",
            )


M = TypeVar("M", bound=BaseModel)


def validate(schema: type[M], data: dict[str, Any]) -> M:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise OpenAIError(422, f"{param or 'body'}: {err['msg']}", param=param, code="invalid_value") from None
