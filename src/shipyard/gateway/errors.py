"""Errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}


class OpenAIError(Exception):
    """An error the gateway answers in OpenAI's shape.

    >>> raise OpenAIError(404, "model 'x' is not served; available: smollm2", param="model", code="model_not_found")
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code or str(status)}}


def sse_error_event(status: int, message: str, code: str) -> bytes:
    """An SSE event that OpenAI clients raise as an error (the openai SDK raises ``APIError``)."""
    return b"data: " + json.dumps(error_body(status, message, code=code)).encode() + b"\n\n"


def install_error_handlers(app: FastAPI) -> None:
    async def on_openai_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OpenAIError)
        return exc.response()

    async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = str(exc.detail) if exc.detail else "error"
        if exc.status_code == 404:
            message = f"{message}: no such route (see /docs for the API)"
        return OpenAIError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return OpenAIError(422, f"{param or 'body'}: {first['msg']}", param=param).response()

    app.add_exception_handler(OpenAIError, on_openai_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)


class HotRoutes:
    """The OpenAI routes the gateway forwards (``POST /v1/chat/completions``...), answered without Starlette's
    router, FastAPI's request handler and the exception middleware around them: each of those layers costs
    every request a little, together a tenth of the gateway's CPU per short request (py-spy, issue 37). Their
    endpoints take the raw request and parse and validate the body themselves, so nothing is skipped but the
    walk: an ``OpenAIError`` is answered here as the exception handler would, anything else goes up to the
    server error middleware as before. The routes stay registered in the app (the OpenAPI document, 405s)."""

    def __init__(self, app: ASGIApp, routes: Mapping[str, Callable[[Request], Awaitable[Response]]]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except OpenAIError as exc:
            response = exc.response()
        await response(scope, receive, send)
