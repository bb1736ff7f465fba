"""Task endpoints on the gateway: /v1/intent, /predict and /v1/reply, each a validated engine call."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from shipyard.gateway.errors import OpenAIError
from shipyard.gateway.intent import Classifier
from shipyard.gateway.proxy import Proxy
from shipyard.gateway.schemas import parse_json_object, validate
from shipyard.tasks.intent import (
    IntentDecode,
    IntentRequest,
    IntentResponse,
    LabelSet,
    label_probabilities,
    score_bodies,
)
from shipyard.tasks.reply import (
    DEFAULT_TEMPLATE,
    DraftError,
    ReplyRequest,
    ReplyResponse,
    ReplyTemplate,
    parse_draft,
    render_reply,
    reply_body,
)

REPLY_ATTEMPTS = 2


def install_task_routes(
    app: FastAPI,
    proxy: Proxy,
    authorize: Any,
    labels: LabelSet,
    templates: dict[str, ReplyTemplate],
    decode: IntentDecode = IntentDecode.SHORTEST,
    intent_model: str | None = None,
    reply_model: str | None = None,
    *,
    hot: dict[str, Callable[[Request], Awaitable[Response]]],
) -> None:
    """``intent_model``/``reply_model``: what a request that names no model runs on (else: the only one served).
    ``hot``: where the short task routes are registered to be answered without the router walk
    (``errors.HotRoutes``); their answers are serialised by pydantic at once instead of by FastAPI's response
    model machinery (the same JSON)."""
    classifier = Classifier(proxy, decode)

    async def classify(request: Request, route: str) -> IntentResponse:
        authorize(request)
        async with proxy.accounted(route) as outcome:
            started = time.perf_counter()
            data = parse_json_object(await proxy.read_body(request))
            parsed = validate(IntentRequest, data)
            label_set = LabelSet.from_names(parsed.labels) if parsed.labels else labels
            model = outcome.model = proxy.resolve_model(parsed.model or intent_model)
            scoring = score_bodies(model, label_set, parsed.text) if parsed.scores else []
            (outcome.replica, intent), *scored = await asyncio.gather(
                classifier.label_of(model, label_set, parsed.text), *(proxy.call_json(model, body) for body in scoring)
            )
            scores = label_probabilities(label_set.labels, [a for _, a in scored]) if parsed.scores else None
            return IntentResponse(
                intent=intent, scores=scores, model=model, latency_ms=round((time.perf_counter() - started) * 1000, 2)
            )

    @app.post("/v1/intent", response_model=IntentResponse)
    async def intent(request: Request) -> IntentResponse:
        """Classify a text into one of the configured (or given) labels; the answer is always one of them."""
        return await classify(request, "intent")

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, str]:
        """Drop-in for the common FastAPI+vLLM intent service: ``{"text"}`` -> ``{"intent"}``."""
        return {"intent": (await classify(request, "predict")).intent}

    async def intent_hot(request: Request) -> Response:
        answer = await classify(request, "intent")
        return Response(answer.model_dump_json().encode(), media_type="application/json")

    async def predict_hot(request: Request) -> Response:
        answer = await classify(request, "predict")
        return Response(json.dumps({"intent": answer.intent}).encode(), media_type="application/json")

    hot["/v1/intent"] = intent_hot
    hot["/predict"] = predict_hot

    @app.post("/v1/reply", response_model=ReplyResponse)
    async def reply(request: Request) -> ReplyResponse:
        """Summarise a complaint conversation and write a templated reply, validated against a JSON schema."""
        authorize(request)
        async with proxy.accounted("reply") as outcome:
            started = time.perf_counter()
            data = parse_json_object(await proxy.read_body(request))
            parsed = validate(ReplyRequest, data)
            name = parsed.template or DEFAULT_TEMPLATE
            if name not in templates:
                raise OpenAIError(
                    400,
                    f"unknown template '{name}'; available: {', '.join(sorted(templates))}",
                    param="template",
                    code="unknown_template",
                )
            template = templates[name]
            model = outcome.model = proxy.resolve_model(parsed.model or reply_model)
            problems: list[str] = []
            for _ in range(REPLY_ATTEMPTS):
                outcome.replica, answer = await proxy.call_json(model, reply_body(model, template, parsed.messages))
                try:
                    draft = parse_draft(answer)
                except (DraftError, KeyError, IndexError, TypeError) as exc:
                    problems.append(str(exc))
                    continue
                return ReplyResponse(
                    summary=draft.summary,
                    reply=render_reply(template, draft),
                    template=name,
                    model=model,
                    latency_ms=round((time.perf_counter() - started) * 1000, 2),
                )
            raise OpenAIError(
                502,
                f"the model's answer failed validation {REPLY_ATTEMPTS} times: {'; '.join(problems)}",
                code="invalid_engine_answer",
            )
