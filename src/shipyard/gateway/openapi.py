"""The gateway's OpenAPI document, made to tell the truth.

The forwarding routes read their bodies themselves (a byte pipe, validated with pydantic models, unknown fields
passed through), so FastAPI cannot see them. ``document_api`` adds what it cannot: each route's request body
(the models the gateway validates with), every status it answers with, and errors in OpenAI's shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from shipyard.gateway.admin import RolloutRequest
from shipyard.gateway.proxy import (
    API_ROUTES,
    CHAT,
    COMPLETIONS,
    COUNT_TOKENS,
    DETOKENIZE,
    EMBEDDINGS,
    MESSAGES,
    POOLING,
    RERANK,
    RESPONSES,
    SCORE,
    TOKENIZE,
    ApiRoute,
)
from shipyard.tasks.intent import IntentRequest
from shipyard.tasks.reply import ReplyRequest

ROUTE_SUMMARIES: dict[ApiRoute, str] = {
    CHAT: "OpenAI chat completions (streaming as SSE), forwarded to a replica serving the model",
    COMPLETIONS: "OpenAI text completions (streaming as SSE)",
    RESPONSES: "OpenAI Responses API (streaming as SSE)",
    MESSAGES: "Anthropic Messages API (streaming as SSE), as vLLM serves it; the key may come as x-api-key",
    COUNT_TOKENS: "Anthropic's token count of a Messages request (messages.count_tokens), as vLLM serves it",
    TOKENIZE: "vLLM's tokenizer: a prompt or chat messages to token ids",
    DETOKENIZE: "vLLM's tokenizer: token ids to text",
    EMBEDDINGS: "OpenAI embeddings, from a served pooling model (e.g. all-MiniLM-L6-v2)",
    POOLING: "vLLM's pooling route, for a served pooling model",
    SCORE: "vLLM's score route (cross-encoder or embedding similarity), for a served pooling model",
    RERANK: "vLLM's rerank route (Jina/Cohere shape), for a served pooling model",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the gateway answers with, in OpenAI's shape."""

    error: ErrorDetail = Field(description="What was wrong and how to fix it")


_WHY = {
    400: "Invalid JSON, a removed field (guided_*), or a limit of the served model: max_tokens over its context "
    "length (code max_tokens_too_large), a prompt longer than its context (the engine's own 400)",
    401: "Missing, malformed or unknown API key",
    404: "A model this gateway does not serve (code model_not_found; GET /v1/models lists them)",
    409: "A rollout command that conflicts with the current state",
    413: "Request body larger than max_body_bytes",
    422: "A field with a wrong type or value (param names it)",
    429: "The key is over its requests/tokens per minute or concurrent requests limit (Retry-After, x-ratelimit-*)",
    502: "The engine failed or answered something invalid",
    503: "No replica serving the model is ready (Retry-After)",
    504: "The engine did not finish a non-streamed answer within upstream_read_timeout_s (stream it, or ask for "
    "fewer max_tokens)",
}
_API = (400, 401, 404, 413, 422, 429, 502, 503, 504)
_READ_ONLY = (401, 429, 503)
_ADMIN = (400, 401, 404, 409, 413, 422, 503)

# path -> method -> (request body model or None, error statuses, whether 200 may be an SSE stream)
_OPERATIONS: dict[str, dict[str, tuple[type[BaseModel] | None, tuple[int, ...], bool]]] = {
    **{
        route.path: {"post": (route.schema, _API, route in (CHAT, COMPLETIONS, RESPONSES, MESSAGES))}
        for route in API_ROUTES.values()
    },
    "/v1/models": {"get": (None, _READ_ONLY, False)},
    "/v1/models/{model_id}": {"get": (None, (401, 404, 422, 429, 503), False)},
    "/v1/intent": {"post": (IntentRequest, _API, False)},
    "/predict": {"post": (IntentRequest, _API, False)},
    "/v1/reply": {"post": (ReplyRequest, _API, False)},
    "/ready": {"get": (None, (503,), False)},
    "/admin/deployments": {"get": (None, (401,), False)},
    "/admin/rollouts": {"get": (None, (401,), False), "post": (RolloutRequest, _ADMIN, False)},
    "/admin/rollouts/current": {"get": (None, (401, 404), False)},
    "/admin/rollouts/current/promote": {"post": (None, (401, 404, 409), False)},
    "/admin/rollouts/current/rollback": {"post": (None, (401, 404, 409), False)},
}


def _schemas() -> dict[str, Any]:
    models: list[type[BaseModel]] = [ErrorResponse]
    for operations in _OPERATIONS.values():
        models += [model for model, _, _ in operations.values() if model is not None and model not in models]
    _, top = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    return dict(top.get("$defs", {}))


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def document_api(app: FastAPI) -> None:
    """Replace ``app.openapi`` with FastAPI's document plus request bodies, statuses and error shapes."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes, description=__doc__)
        components = doc.setdefault("components", {})
        components.setdefault("schemas", {}).update(_schemas())
        components["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        }
        for path, operations in doc.get("paths", {}).items():
            for method, operation in operations.items():
                model, errors, streams = _OPERATIONS.get(path, {}).get(method, (None, (), False))
                if model is not None:
                    operation["requestBody"] = {
                        "required": True,
                        "content": {"application/json": {"schema": _ref(model)}},
                    }
                responses = operation.setdefault("responses", {})
                for status in [s for s in responses if s not in ("200", "202")]:
                    del responses[status]  # FastAPI's own 422 shape is not what the gateway answers
                if path.startswith(("/v1/", "/tokenize", "/detokenize", "/predict", "/admin/")):
                    operation["security"] = [{"bearer": []}] + (
                        [{"x-api-key": []}] if path in (MESSAGES.path, COUNT_TOKENS.path) else []
                    )
                if streams:
                    responses.setdefault("200", {"description": "Successful Response"})["content"] = {
                        "application/json": {"schema": {"type": "object"}},
                        "text/event-stream": {"schema": {"type": "string"}},
                    }
                elif model is not None and path in {r.path for r in API_ROUTES.values()}:
                    responses["200"] = {
                        "description": "The engine's answer",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                if path == "/metrics":
                    responses["200"] = {
                        "description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                for status in errors:
                    responses[str(status)] = {
                        "description": _WHY[status],
                        "content": {"application/json": {"schema": _ref(ErrorResponse)}},
                    }
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
