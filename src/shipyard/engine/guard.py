"""The engine key on every route of a vLLM server, not only vLLM's own guarded prefixes.

vLLM's ``--api-key`` guards paths under ``/v1`` (and a few more); its ``/invocations`` serves chat and
completions, and ``/tokenize``, ``/pooling``, ``/pause``, ``/collective_rpc``, ``/sleep`` answer anyone who
reaches the port. shipyard starts every engine with ``--middleware shipyard.engine.guard.EngineKeyGuard``
(vLLM adds it to its app), which answers 401 to any request but ``/health`` that does not carry the key of
``VLLM_API_KEY`` as a Bearer token; ``/metrics`` also takes ``ENGINE_METRICS_TOKEN`` when it is set (a scrape
token for Prometheus that cannot call the model). Without ``VLLM_API_KEY`` it lets everything through, as vLLM
does.

>>> os.environ["VLLM_API_KEY"] = "sk-engine-..."   # doctest: +SKIP
>>> # vllm serve MODEL --middleware shipyard.engine.guard.EngineKeyGuard
"""

from __future__ import annotations

import hmac
import json
import os

from starlette.types import ASGIApp, Receive, Scope, Send

GUARD = "shipyard.engine.guard.EngineKeyGuard"
"""The import path vLLM's ``--middleware`` takes."""
OPEN_PATHS = frozenset({"/health"})
"""What anyone may ask (the kubelet's and the gateway's probes carry no key)."""
METRICS_TOKEN_ENV = "ENGINE_METRICS_TOKEN"


class EngineKeyGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.key = os.environ.get("VLLM_API_KEY") or ""
        self.metrics_token = os.environ.get(METRICS_TOKEN_ENV) or ""

    def allows(self, path: str, authorization: str) -> bool:
        if not self.key or path in OPEN_PATHS:
            return True
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        if hmac.compare_digest(token.encode(), self.key.encode()):
            return True
        return (
            bool(self.metrics_token)
            and path == "/metrics"
            and hmac.compare_digest(token.encode(), self.metrics_token.encode())
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
        if self.allows(scope["path"], authorization):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps(
            {
                "error": {
                    "message": "this engine answers only to the key its gateway holds",
                    "type": "authentication_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
