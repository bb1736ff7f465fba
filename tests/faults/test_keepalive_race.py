"""An engine closes an idle kept-alive connection just as the gateway sends the next request on it.

Seen on an H100 (2026-12-06, `benchmarks/results/2026-12-06-h100/hf-vs-20s/`): above ~64 req/s the gateway met
"Server disconnected" / "Connection reset by peer" on connections vLLM's 5 s idle timer was closing, took the only
replica out of rotation for each one, and answered 503 `no_replica_ready` to everyone until the next health probe
(36–181 errors a run).

Promise: a request whose connection the engine closed without answering is sent again on a fresh connection;
the only replica stays in rotation and the client gets its answer. A replica that really died is still taken
out (its fresh connection is refused) and the client gets the 503.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai

from shipyard.gateway import create_app
from shipyard.router import Replica
from shipyard.settings import load_settings
from tests.faults.report import record
from tests.helpers import ServerThread, wait_for

KEY = "sk-keepalive"
ANSWER = {
    "id": "cmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


class ClosingEngine:
    """HTTP/1.1 on loopback that keeps connections alive, but closes a connection without a word when a second
    POST arrives on it: the engine's idle timer firing as the request goes out, every time."""

    def __init__(self) -> None:
        self.port = 0
        self.closed_under_a_request = 0
        self.answered = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()
        # stopped: close the server and end every connection's task here, so none is left to the garbage collector
        server.close()
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        posts = 0
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                lines = head.decode().split("\r\n")
                length = next(
                    (int(v) for k, _, v in (ln.partition(":") for ln in lines) if k.lower() == "content-length"), 0
                )
                await reader.readexactly(length)
                if lines[0].startswith("POST"):
                    posts += 1
                    if posts > 1:
                        self.closed_under_a_request += 1
                        return  # closed without an answer
                    body = json.dumps(ANSWER).encode()
                    self.answered += 1
                else:  # GET /health, /v1/models
                    body = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.close()

    @contextmanager
    def running(self) -> Iterator[ClosingEngine]:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        assert self._started.wait(5)
        try:
            yield self
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            thread.join(timeout=5)


def test_a_connection_the_engine_closes_under_a_request_is_retried_fresh_and_the_replica_stays() -> None:
    with ClosingEngine().running() as engine:
        replica = Replica(f"http://127.0.0.1:{engine.port}", name="only")
        # a long keep-alive on the gateway's side so the pooled connection is reused (the race, every time)
        settings = load_settings(api_keys=KEY, health_interval_s=30, upstream_keepalive_s=60)
        with ServerThread(create_app(settings, [replica])) as gw:
            assert wait_for(lambda: httpx.get(f"{gw.url}/ready").status_code == 200)
            sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0, timeout=10)
            answers = [
                sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]) for _ in range(6)
            ]
            assert [a.choices[0].message.content for a in answers] == ["hi"] * 6
            assert engine.closed_under_a_request >= 5, "the race was not produced: the test proves nothing"
            replicas = httpx.get(f"{gw.url}/ready").json()["replicas"]
            assert [r["ready"] for r in replicas] == [True]
            metrics = httpx.get(f"{gw.url}/metrics").text
            assert 'shipyard_retries_total{reason="reconnect"}' in metrics
            record(
                "engine closes a kept-alive connection as the next request goes out (its idle timer)",
                "the request is sent again on a fresh connection; the only replica stays in rotation",
                answered=f"{len(answers)}/6",
                connections_closed_under_a_request=engine.closed_under_a_request,
            )


def test_the_gateway_lets_idle_connections_go_before_vllm_does() -> None:
    assert load_settings().upstream_keepalive_s < 5.0  # vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE default
