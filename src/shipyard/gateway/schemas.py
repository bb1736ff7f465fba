"""Validation of OpenAI request bodies before they reach an engine.

Only the fields the gateway must be sure of are typed; every other field passes through to vLLM untouched.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError, model_validator

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


def _no_removed_fields(schema: dict[str, Any]) -> None:
    """In the JSON schema: the removed ``guided_*`` fields may not appear (the gateway answers 400)."""
    for name, replacement in REMOVED_FIELDS.items():
        schema.setdefault("properties", {})[name] = {"not": {}, "description": f"Removed from vLLM; use {replacement}"}


class _Passthrough(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _ApiRequest(_Passthrough):
    """A body forwarded to the engine: unknown fields pass through, the removed ``guided_*`` ones are refused."""

    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra=_no_removed_fields)

    def sequences(self) -> int:
        """How many sequences it generates (each up to ``output_limit`` tokens)."""
        return 1

    def output_limit(self) -> int | None:
        """Most tokens one sequence may generate (None: nothing generated, or no limit asked for)."""
        return None


def _integral(value: Any) -> Any:
    """JSON Schema counts 1.0 as an integer (and so do vLLM and the OpenAI API): take it as 1."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


JsonInt = Annotated[int, BeforeValidator(_integral)]
PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_integral)]

_MODEL = "A model this gateway serves (GET /v1/models); another is a 404 (model_not_found)."
_LIMIT = "At most the served model's context length (or the gateway's max_tokens_limit); more is a 400."


class ChatMessage(_Passthrough):
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[dict[str, Any]] | None = None


class _Sampling(_ApiRequest):
    model: str = Field(min_length=1, description=_MODEL)
    stream: StrictBool = False
    max_tokens: PositiveInt | None = Field(default=None, description=_LIMIT)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: Annotated[int, Field(ge=1, le=16), BeforeValidator(_integral)] | None = None
    stream_options: dict[str, Any] | None = None

    def output_limit(self) -> int | None:
        """The most tokens this request may generate, as the client asked."""
        return self.max_tokens

    def sequences(self) -> int:
        """How many sequences it generates (each up to ``output_limit`` tokens)."""
        return self.n or 1


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = Field(default=None, description=_LIMIT)

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[JsonInt] | list[list[JsonInt]]

    def sequences(self) -> int:
        prompts = (
            1
            if isinstance(self.prompt, str) or not self.prompt or isinstance(self.prompt[0], int)
            else len(self.prompt)
        )
        return prompts * (self.n or 1)


class ResponsesRequest(_ApiRequest):
    """OpenAI's Responses API (``POST /v1/responses``)."""

    model: str = Field(min_length=1, description=_MODEL)
    input: str | list[dict[str, Any]]
    stream: StrictBool = False
    max_output_tokens: PositiveInt | None = Field(default=None, description=_LIMIT)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    previous_response_id: str | None = Field(
        default=None,
        min_length=1,
        description="Continues a stored response. vLLM keeps a response's state in the replica that made it "
        "(when started with VLLM_ENABLE_RESPONSES_API_STORE=1): the gateway sends the request there, or answers "
        "400 when that replica is not serving any more.",
    )

    def output_limit(self) -> int | None:
        return self.max_output_tokens


class AnthropicMessage(_Passthrough):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(_ApiRequest):
    """Anthropic's Messages API (``POST /v1/messages``), as vLLM serves it."""

    model: str = Field(min_length=1, description=_MODEL)
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: PositiveInt = Field(description=_LIMIT)
    stream: StrictBool = False
    system: str | list[dict[str, Any]] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)

    def output_limit(self) -> int | None:
        return self.max_tokens


class CountTokensRequest(_ApiRequest):
    """Anthropic's ``POST /v1/messages/count_tokens`` (the SDK's ``messages.count_tokens``), as vLLM serves it."""

    model: str = Field(min_length=1, description=_MODEL)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None

    def sequences(self) -> int:
        return 0  # nothing is generated: only the input counts (its estimate) against tpm


def _exactly_one_input(schema: dict[str, Any]) -> None:
    """In the JSON schema: exactly one of ``prompt`` / ``messages``, neither of them null."""
    _no_removed_fields(schema)
    for name in ("prompt", "messages"):
        options = schema["properties"][name].pop("anyOf")
        schema["properties"][name].update(next(o for o in options if o.get("type") != "null"))
        schema["properties"][name].pop("default", None)
    schema["oneOf"] = [{"required": ["prompt"]}, {"required": ["messages"]}]


class TokenizeRequest(_ApiRequest):
    """vLLM's ``POST /tokenize``: a ``prompt`` or chat ``messages`` (rendered with the model's template)."""

    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra=_exactly_one_input)

    model: str | None = Field(default=None, min_length=1, description=_MODEL + " Default: the only one served.")
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if ("prompt" in self.model_fields_set) == ("messages" in self.model_fields_set) or (
            self.prompt is None and self.messages is None
        ):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class PoolingRequest(_ApiRequest):
    """vLLM's pooling routes (``/pooling``, ``/score``, ``/rerank``): forwarded as they are, to the model named."""

    model: str = Field(min_length=1, description=_MODEL)

    def sequences(self) -> int:
        return 0  # nothing is generated: only the inputs count (their estimate) against tpm


class EmbeddingRequest(PoolingRequest):
    """OpenAI's embeddings (``POST /v1/embeddings``), as vLLM serves them for a pooling model."""

    input: str | list[str] | list[JsonInt] | list[list[JsonInt]] = Field(
        description="Text, texts, token ids, or lists of token ids"
    )
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: PositiveInt | None = None


class DetokenizeRequest(_ApiRequest):
    """vLLM's ``POST /detokenize``."""

    model: str | None = Field(default=None, min_length=1, description=_MODEL + " Default: the only one served.")
    tokens: list[Annotated[int, Field(ge=0, lt=2**31), BeforeValidator(_integral)]] = Field(max_length=1_000_000)


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise OpenAIError(400, "empty request body: send a JSON object", code="invalid_json")
    try:
        data = json.loads(body)
    except RecursionError:
        raise OpenAIError(400, "request body is nested too deeply to be a request", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, a bad encoding, an integer over Python's 4,300-digit limit
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
