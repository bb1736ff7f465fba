"""A fake OpenAI-compatible server (the parts of vLLM's API the gateway uses), for fast tests and benchmarks.

It streams ``tokens`` chunks at ``token_rate`` per second after ``ttft_s``, honours ``stream_options``,
and can be told to misbehave. Run it alone: ``python -m shipyard.testing.fake_openai --port 9000``.

>>> fake = FakeOpenAI(model="fake", token_rate=50.0)      # an ASGI app: serve it with uvicorn
>>> fake.fault = Fault.DIE_MID_STREAM                       # next streams break after a few chunks
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import time
from collections import deque
from enum import Enum
from typing import Any

from starlette.types import Receive, Scope, Send

_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_JSON_HEADERS = [(b"content-type", b"application/json")]


class Fault(str, Enum):
    NONE = "none"
    SERVER_ERROR = "500"  # every completion answers 500
    DIE_MID_STREAM = "die"  # streams stop after `die_after` chunks without finishing the HTTP body
    HANG_MID_STREAM = "hang"  # streams go silent after `die_after` chunks
    UNHEALTHY = "unhealthy"  # /health answers 503
    HANG = "hang-all"  # every request is accepted and left unanswered until the fault is cleared (a SIGSTOPped engine)


class FakeOpenAI:
    def __init__(
        self,
        model: str = "fake-model",
        *,
        token_rate: float = 1000.0,
        ttft_s: float = 0.0,
        default_tokens: int = 16,
        max_model_len: int = 2048,
        fault: Fault = Fault.NONE,
        die_after: int = 3,
        capacity: int | None = None,
    ) -> None:
        self.model = model
        self.capacity = capacity
        """Requests generated at once (an engine's batch); more wait their turn, first come first served, and
        their latency grows with the backlog, as past an engine's knee. None: no bound."""
        self._slots: asyncio.Semaphore | None = None
        self.token_rate = token_rate
        self.ttft_s = ttft_s
        self.default_tokens = default_tokens
        self.max_model_len = max_model_len
        self.fault = fault
        self.die_after = die_after
        self.requests: list[dict[str, Any]] = []
        self.script: deque[str | tuple[str, str, str | None]] = deque()
        """Contents for the next non-streaming chat answers, in order (then the default answer); a tuple is
        (content, finish_reason, stop_reason)."""
        self.open_streams = 0
        self.cancelled_streams = 0
        self.json_answer: str | None = None
        """The answer to every request with a ``json_schema`` response format (a real engine would fill the
        schema); None: the default answer."""
        self.max_stop_strings: int | None = None
        """Refuse requests with more stop strings than this, as vLLM does (its ``VLLM_MAX_STOP_STRINGS``)."""
        self.adapters: dict[str, str] = {}
        """LoRA adapters loaded at run time (name -> path), served like vLLM serves them."""
        self.root: str | None = None
        """The folder listed as the model's ``root`` in ``/v1/models`` (vLLM lists the path it loaded)."""
        self.weights: str | None = None
        """The folder its weights were last loaded from (``/collective_rpc reload_weights``, vLLM's dev mode)."""
        self.reloads: list[str] = []
        self._open: asyncio.Event | None = None  # cleared while paused: new requests wait, as in vLLM
        self._generating = 0
        self.token_texts: dict[int, str] = {}
        """What each token id spells: a request with ``allowed_token_ids`` is answered with the first allowed
        token (one token, ``finish_reason`` length); ids outside these are refused, as vLLM refuses ids outside
        its vocabulary."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path, method = scope["path"], scope["method"]
        while self.fault is Fault.HANG:
            await asyncio.sleep(0.01)
        if path == "/health":
            status = 503 if self.fault is Fault.UNHEALTHY else 200
            await _respond(send, status, b"")
        elif path == "/v1/models":
            cards: list[dict[str, Any]] = [
                {"id": name, "object": "model", "owned_by": "fake", "max_model_len": self.max_model_len}
                for name in [self.model, *self.adapters]
            ]
            if self.root is not None:
                cards[0]["root"] = self.root
                for card in cards[1:]:
                    card.update(root=self.adapters[card["id"]], parent=self.model)
            await _respond(send, 200, json.dumps({"object": "list", "data": cards}).encode())
        elif method == "POST" and path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            request = json.loads(await _read_body(receive))
            if path.endswith("/load_lora_adapter"):
                self.adapters[request["lora_name"]] = request["lora_path"]
            elif self.adapters.pop(request["lora_name"], None) is None:
                await _respond(send, 404, b'{"error": {"message": "adapter not found", "type": "not_found_error"}}')
                return
            await _respond(send, 200, b'"ok"')
        elif path == "/fake/weights":  # what a test asks: which folder the weights came from
            await _respond(send, 200, json.dumps({"weights": self.weights, "reloads": self.reloads}).encode())
        elif method == "POST" and path in ("/pause", "/resume", "/reset_prefix_cache", "/collective_rpc"):
            await self._weights_route(path, await _read_body(receive), send)
        elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            body = await _read_body(receive)
            await self._complete(path, json.loads(body), receive, send)
        elif method == "POST" and path in _OTHER_ROUTES:
            request = json.loads(await _read_body(receive))
            self.requests.append(request)
            if request.get("model", self.model) not in (self.model, *self.adapters):
                await _respond(send, 404, b'{"error": {"message": "model not found", "type": "NotFoundError"}}')
            elif request.get("stream"):
                await _respond_sse(send, _OTHER_ROUTES[path](request, len(self.requests), True))
            else:
                await _respond(send, 200, json.dumps(_OTHER_ROUTES[path](request, len(self.requests), False)).encode())
        else:
            await _respond(send, 404, b'{"error": {"message": "not found", "type": "not_found_error"}}')

    async def _weights_route(self, path: str, body: bytes, send: Send) -> None:
        """vLLM's in-place weight update routes (``VLLM_SERVER_DEV_MODE=1``): ``/pause`` (running requests
        finish, new ones wait), ``/collective_rpc`` ``reload_weights`` from a folder that must exist on this host,
        ``/reset_prefix_cache``, ``/resume``."""
        if self._open is None:
            self._open = asyncio.Event()
            self._open.set()
        if path == "/pause":
            self._open.clear()
            while self._generating:
                await asyncio.sleep(0.005)
        elif path == "/resume":
            self._open.set()
        elif path == "/collective_rpc":
            request = json.loads(body or b"{}")
            folder = str((request.get("kwargs") or {}).get("weights_path", ""))
            if request.get("method") != "reload_weights" or not os.path.isdir(folder):
                message = f"reload_weights: no checkpoint folder {folder!r} on this host"
                await _respond(send, 500, json.dumps({"error": {"message": message}}).encode())
                return
            self.weights = folder
            self.reloads.append(folder)
        await _respond(send, 200, b"{}")

    async def _complete(self, path: str, request: dict[str, Any], receive: Receive, send: Send) -> None:
        if self._open is not None:
            await self._open.wait()
        self._generating += 1
        try:
            await self._complete_open(path, request, receive, send)
        finally:
            self._generating -= 1

    async def _complete_open(self, path: str, request: dict[str, Any], receive: Receive, send: Send) -> None:
        self.requests.append(request)
        if request.get("model", self.model) not in (self.model, *self.adapters):
            await _respond(send, 404, b'{"error": {"message": "model not found", "type": "NotFoundError"}}')
            return
        if self.fault is Fault.SERVER_ERROR:
            await _respond(send, 500, b'{"error": {"message": "injected failure", "type": "server_error"}}')
            return
        if refusal := self._refusal(request):
            await _respond(send, 400, json.dumps({"error": {"message": refusal, "type": "BadRequestError"}}).encode())
            return
        if self.capacity is not None:
            if self._slots is None:
                self._slots = asyncio.Semaphore(self.capacity)
            async with self._slots:
                await self._generate(path, request, receive, send)
        else:
            await self._generate(path, request, receive, send)

    async def _generate(self, path: str, request: dict[str, Any], receive: Receive, send: Send) -> None:
        chat = path.endswith("chat/completions")
        n_tokens = int(request.get("max_tokens") or request.get("max_completion_tokens") or self.default_tokens)
        usage = {"prompt_tokens": 7, "completion_tokens": n_tokens, "total_tokens": 7 + n_tokens}
        rid = f"fake-{len(self.requests)}"
        if not request.get("stream"):
            text, finish, stop_reason = self._answer(request, n_tokens)
            if (request.get("structured_outputs") or {}).get("choice"):
                n_tokens = max(len(text), 1)
                usage = {"prompt_tokens": 7, "completion_tokens": n_tokens, "total_tokens": 7 + n_tokens}
            await asyncio.sleep(self.ttft_s + max(n_tokens - 1, 0) / self.token_rate)
            message = {"role": "assistant", "content": text}
            choice: dict[str, Any] = (
                {"index": 0, "message": message, "finish_reason": finish, "stop_reason": stop_reason}
                if chat
                else {"index": 0, "text": text, "finish_reason": "length"}
            )
            payload = {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": 0,
                "model": request.get("model", self.model),
                "choices": [choice],
                "usage": usage,
            }
            if request.get("prompt_logprobs") is not None:
                payload.update(self._prompt_logprobs(request))
            await _respond(send, 200, json.dumps(payload).encode())
            return
        await self._stream(rid, chat, n_tokens, usage, request, receive, send)

    def _refusal(self, request: dict[str, Any]) -> str | None:
        """Why vLLM would refuse the request with a 400 (too many stop strings, token ids outside its vocabulary)."""
        stops = request.get("stop") or []
        if self.max_stop_strings is not None and isinstance(stops, list) and len(stops) > self.max_stop_strings:
            return f"body.stop: List should have at most {self.max_stop_strings} items, not {len(stops)}"
        allowed = request.get("allowed_token_ids")
        if allowed is not None and not set(allowed) <= set(self.token_texts):
            return "allowed_token_ids contains out-of-vocab token id"
        return None

    def _answer(self, request: dict[str, Any], n_tokens: int) -> tuple[str, str, str | None]:
        """(content, finish_reason, stop_reason): a scripted answer, the first allowed choice, or n_tokens tokens.

        A choice answer is cut like vLLM cuts it: at the earliest ``stop`` string (kept with
        ``include_stop_str_in_output``), else after ``max_tokens`` characters (one token each here)."""
        if self.script:
            scripted = self.script.popleft()
            return scripted if isinstance(scripted, tuple) else (scripted, "stop", None)
        if request.get("allowed_token_ids"):
            return self.token_texts[min(request["allowed_token_ids"])], "length", None
        if self.json_answer is not None and (request.get("response_format") or {}).get("type") == "json_schema":
            return self.json_answer, "stop", None
        choices = (request.get("structured_outputs") or {}).get("choice")
        if not choices:
            return " ".join(f"tok{i}" for i in range(n_tokens)), "length", None
        text = str(choices[0])
        hits = [(text.find(stop) + len(stop), stop) for stop in request.get("stop") or [] if stop in text]
        if hits:
            end, stop = min(hits)
            return (text[:end] if request.get("include_stop_str_in_output") else text[: end - len(stop)]), "stop", stop
        if len(text) > n_tokens:
            return text[:n_tokens], "length", None
        return text, "stop", None

    @staticmethod
    def _prompt_logprobs(request: dict[str, Any]) -> dict[str, Any]:
        """A shared 3-token prompt, then one token for the final assistant message with logprob -len(text)."""
        final = str(request["messages"][-1]["content"])
        token = 1000 + sum(map(ord, final))
        entries = [None, {"2": {"logprob": -0.1}}, {"3": {"logprob": -0.1}}, {str(token): {"logprob": -len(final)}}]
        return {"prompt_token_ids": [1, 2, 3, token], "prompt_logprobs": entries}

    async def _stream(
        self,
        rid: str,
        chat: bool,
        n_tokens: int,
        usage: dict[str, int],
        request: dict[str, Any],
        receive: Receive,
        send: Send,
    ) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = f'data: {{"id":"{rid}","object":"{obj}","created":0,"model":"{self.model}","choices":['.encode()
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        self.open_streams += 1
        disconnected = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        watcher = asyncio.create_task(watch())
        try:
            start = time.perf_counter() + self.ttft_s
            for i in range(n_tokens):
                delay = start + i / self.token_rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                while self.fault is Fault.HANG and not disconnected.is_set():
                    await asyncio.sleep(0.01)
                if disconnected.is_set():
                    self.cancelled_streams += 1
                    return
                if i == self.die_after and self.fault is Fault.DIE_MID_STREAM:
                    # The chunks sent so far reach the reader first: an HTTP client that sees the connection
                    # break raises at once and drops what it had buffered but not yet handed on (aiohttp's
                    # StreamReader), so without this pause a loaded machine lost them all (CI, 2026-12-07).
                    await asyncio.sleep(0.2)
                    raise ConnectionAbortedError("injected mid-stream death")
                if i == self.die_after and self.fault is Fault.HANG_MID_STREAM:
                    await disconnected.wait()
                    self.cancelled_streams += 1
                    return
                finish = '"length"' if i == n_tokens - 1 else "null"
                piece = f'{{"content":"tok{i} "}}' if chat else None
                choice = (
                    f'{{"index":0,"delta":{piece},"finish_reason":{finish}}}'
                    if chat
                    else f'{{"index":0,"text":"tok{i} ","finish_reason":{finish}}}'
                )
                await send(
                    {
                        "type": "http.response.body",
                        "body": head + choice.encode() + b"]}\n\n",
                        "more_body": True,
                    }
                )
            if (request.get("stream_options") or {}).get("include_usage"):
                tail = head + b'],"usage":' + json.dumps(usage).encode() + b"}\n\n"
                await send({"type": "http.response.body", "body": tail, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        finally:
            watcher.cancel()
            self.open_streams -= 1


def _tokenize(request: dict[str, Any], _: int, __: bool) -> dict[str, Any]:
    text = str(request.get("prompt") or json.dumps(request.get("messages")))
    tokens = [ord(c) for c in text]
    return {"count": len(tokens), "max_model_len": 2048, "tokens": tokens, "token_strs": None}


def _detokenize(request: dict[str, Any], _: int, __: bool) -> dict[str, Any]:
    return {"prompt": "".join(chr(int(t)) for t in request.get("tokens") or [] if 0 <= t < 0x110000)}


def _response(request: dict[str, Any], n: int, stream: bool) -> Any:
    """A Responses API answer ("resp-<n>" ids; a stream of created / delta / completed events when streaming)."""
    body = {
        "id": f"resp_fake{n}",
        "object": "response",
        "status": "completed",
        "previous_response_id": request.get("previous_response_id"),
        "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "tok0"}]}],
        "usage": {"input_tokens": 7, "output_tokens": 1, "total_tokens": 8},
    }
    if not stream:
        return body
    return [
        ("response.created", {"type": "response.created", "response": {**body, "status": "in_progress"}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "tok0"}),
        ("response.completed", {"type": "response.completed", "response": body}),
    ]


def _message(request: dict[str, Any], n: int, stream: bool) -> Any:
    """An Anthropic Messages answer (events message_start ... message_stop when streaming)."""
    body = {
        "id": f"msg_fake{n}",
        "type": "message",
        "role": "assistant",
        "model": request.get("model"),
        "content": [{"type": "text", "text": "tok0"}],
        "stop_reason": "max_tokens",
        "usage": {"input_tokens": 7, "output_tokens": 1},
    }
    if not stream:
        return body
    start = {**body, "content": [], "usage": {"input_tokens": 7, "output_tokens": 0}}
    return [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 1}}),
        ("message_stop", {"type": "message_stop"}),
    ]


def _embedding(request: dict[str, Any], _n: int, _stream: bool) -> dict[str, Any]:
    """A unit vector of 8 dimensions per input, the same for the same text (a pooling model's shape)."""
    texts = request.get("input", "")
    texts = [texts] if isinstance(texts, str) else list(texts)
    data = []
    for index, text in enumerate(texts):
        digest = hashlib.sha256(str(text).encode()).digest()
        raw = [b - 127.5 for b in digest[:8]]
        norm = sum(x * x for x in raw) ** 0.5 or 1.0
        data.append({"object": "embedding", "index": index, "embedding": [x / norm for x in raw]})
    usage = {"prompt_tokens": 3 * len(texts), "total_tokens": 3 * len(texts)}
    return {"object": "list", "model": request.get("model"), "data": data, "usage": usage}


_OTHER_ROUTES = {
    "/v1/embeddings": _embedding,
    "/tokenize": _tokenize,
    "/detokenize": _detokenize,
    "/v1/responses": _response,
    "/v1/messages": _message,
}


async def _respond_sse(send: Send, events: list[tuple[str, dict[str, Any]]]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
    for name, data in events:
        chunk = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON_HEADERS})
    await send({"type": "http.response.body", "body": body})


def main() -> None:  # pragma: no cover - exercised by benchmarks and the crash test as a subprocess
    import uvicorn

    from shipyard.gateway.server import fast_http, fast_loop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--model", default="fake-model", help="model id (a path's last part is used)")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--token-rate", type=float, default=1000.0)
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds before the first token")
    parser.add_argument("--tokens", type=int, default=16, help="tokens when the request sets no max_tokens")
    parser.add_argument("--capacity", type=int, default=None, help="requests generated at once (more wait)")
    args, _ = parser.parse_known_args()  # accepts (and ignores) the rest of vLLM's flags, like an engine would
    name = args.served_model_name or args.model.rstrip("/").rsplit("/", 1)[-1]
    fake = FakeOpenAI(
        name, token_rate=args.token_rate, ttft_s=args.ttft, default_tokens=args.tokens, capacity=args.capacity
    )
    fake.weights = args.model if os.path.isdir(args.model) else None
    uvicorn.run(
        fake,
        host=args.host,
        port=args.port,
        loop=fast_loop(),
        http=fast_http(),
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
