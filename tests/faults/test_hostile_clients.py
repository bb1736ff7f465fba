"""Hostile (or broken) clients against the gateway as `shipyard serve` runs it (uvicorn with shipyard's config).

Promises: deep JSON and huge integers are a 400 in OpenAI's shape, never a 500; slow headers and bodies are
cut off by deadlines; a process serves at most ``max_connections`` at once (the rest get 503 at once); no body
is read before it is allowed (size from the header first, auth first where a key is needed), on every route;
a prompt list x n x max_tokens is charged against ``tpm`` before it runs; a stream whose client stops reading
frees the engine.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn

from shipyard.engine import free_port
from shipyard.gateway import create_app
from shipyard.gateway.server import uvicorn_config
from shipyard.router import Replica
from shipyard.settings import KeyLimits, load_settings
from shipyard.testing import FakeOpenAI
from tests.faults.report import record
from tests.helpers import ServerThread, wait_for

KEY = "sk-hostile"
ADMIN = "sk-admin-hostile"
AUTH = {"Authorization": f"Bearer {KEY}"}


@contextmanager
def served(fake: FakeOpenAI, **settings: Any) -> Iterator[tuple[str, Any]]:
    """The gateway under uvicorn exactly as ``shipyard serve`` configures it, in front of ``fake``."""
    with ServerThread(fake) as upstream:
        options = {"api_keys": KEY, "admin_keys": ADMIN, "health_interval_s": 0.2, **settings}
        app = create_app(load_settings(**options), [Replica(upstream.url, name="fake-0")])
        with uvicorn_serving(app) as url:
            assert wait_for(lambda: _ready(url), timeout=15)
            yield url, app


@contextmanager
def uvicorn_serving(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn with shipyard's configuration (deadlines, connection cap) on a free port."""
    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, "warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: server.started, timeout=15)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI("fake-model", token_rate=2000.0, default_tokens=8, max_model_len=1024)


BODY_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/tokenize", "/v1/intent"]


def test_deep_json_and_huge_integers_are_400_never_500(fake: FakeOpenAI) -> None:
    hostile = {
        "100,000 open brackets": b"[" * 100_000,
        "5,000-digit max_tokens": b'{"model": "fake-model", "max_tokens": ' + b"9" * 5000 + b"}",
        "objects 5,000 deep": b'{"a":' * 5000 + b"1" + b"}" * 5000,
    }
    with served(fake) as (url, _):
        statuses = {}
        for what, body in hostile.items():
            for route in [*BODY_ROUTES, "/predict"]:
                answer = httpx.post(f"{url}{route}", content=body, headers={**AUTH, "content-type": "application/json"})
                statuses[(what, route)] = answer.status_code
                assert answer.status_code == 400, (what, route, answer.status_code, answer.text[:200])
                error = answer.json()["error"]
                assert error["type"] == "invalid_request_error" and error["message"]
        assert httpx.get(f"{url}/ready").status_code == 200  # and it still serves
        record(
            "hostile bodies: deep JSON, 5,000-digit integers",
            "400 in OpenAI's shape, never 500",
            requests=len(statuses),
            answered_400=sum(s == 400 for s in statuses.values()),
        )


def _connect(url: str) -> socket.socket:
    port = int(url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Send ``trickle`` a byte every 0.2 s until the server closes; how long it took (None: still open)."""
    started = time.monotonic()
    sock.settimeout(0.2)
    for byte in trickle or b"\0" * 1000:
        if time.monotonic() - started > seconds:
            return None
        try:
            if trickle:
                sock.sendall(bytes([byte]))
            data = sock.recv(65536)
            if data == b"" or data.startswith(b"HTTP/1.1 408"):
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    return None


def test_slow_headers_are_cut_off_at_the_header_deadline(fake: FakeOpenAI) -> None:
    with served(fake, header_timeout_s=1.0) as (url, _):
        sock = _connect(url)
        slowloris = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 500
        took = _closed_within(sock, 5.0, trickle=slowloris)
        assert took is not None and took <= 2.5, f"a slow client held its connection for {took} s"
        sock.close()
        assert _ready(url)
        record(
            "slow headers (one byte every 0.2 s)",
            "connection closed at the header deadline",
            closed_after_s=round(took, 2),
        )


def test_a_slow_body_gets_408_at_the_body_deadline(fake: FakeOpenAI) -> None:
    with served(fake, body_timeout_s=1.0) as (url, _):
        sock = _connect(url)
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"model": ')
        sock.settimeout(5)
        started = time.monotonic()
        answer = sock.recv(65536)
        took = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer, answer[:300]
        assert took <= 2.5
        sock.close()


def test_a_process_serves_at_most_max_connections_and_refuses_the_rest_at_once(fake: FakeOpenAI) -> None:
    with served(fake, max_connections=4, header_timeout_s=30.0) as (url, _):
        idle = [_connect(url) for _ in range(4)]
        for sock in idle:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished: held open
        time.sleep(0.2)
        started = time.monotonic()
        refused = httpx.get(f"{url}/health", timeout=5)
        assert refused.status_code == 503 and time.monotonic() - started < 1.0
        for sock in idle:
            sock.close()
        assert wait_for(lambda: _ready(url), timeout=5)


def test_no_body_is_read_before_it_is_allowed_on_any_route(fake: FakeOpenAI) -> None:
    """A body declared larger than the limit: 413 before reading it; no key where one is needed: 401 before
    reading it. The body is never sent, so a route that tried to read it would wait (and time out here)."""
    with served(fake, max_body_bytes=1000) as (url, app):
        routes = sorted(
            {r.path for r in app.routes if "POST" in getattr(r, "methods", set()) and "{" not in r.path}  # type: ignore[attr-defined]
        )
        assert "/v1/chat/completions" in routes and "/admin/rollouts" in routes
        outcomes = {}
        for route in routes:
            key = ADMIN if route.startswith("/admin/") else KEY
            for auth, expected in ((f"Bearer {key}", 413), ("", 401)):
                sock = _connect(url)
                head = (
                    f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000000\r\n"
                )
                sock.sendall((head + (f"Authorization: {auth}\r\n" if auth else "") + "\r\n").encode())
                sock.settimeout(3)
                answer = sock.recv(65536)
                sock.close()
                status = int(answer.split(b" ", 2)[1]) if answer else 0
                outcomes[(route, bool(auth))] = status
                if not auth:
                    assert status in (401, 413), (route, answer[:200])  # refused either way, nothing read
                elif route.endswith(("/promote", "/rollback")):
                    assert status == 409, (route, answer[:200])  # takes no body: answered without reading one
                else:
                    assert status == expected, (route, answer[:200])
        record(
            "bodies declared over the limit, with and without keys, every POST route",
            "refused before a byte of the body is read",
            routes=len(routes),
            refused=sum(s in (401, 413) for s in outcomes.values()),
        )


def test_prompt_lists_times_n_are_charged_against_tpm_before_they_run(fake: FakeOpenAI) -> None:
    with served(fake, limits={"default": KeyLimits(tpm=5000)}) as (url, app):
        sent = len(fake.requests)
        body = {"model": "fake-model", "prompt": ["hi"] * 10, "n": 16, "max_tokens": 100}
        refused = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH)
        assert refused.status_code == 429 and "may use up to" in refused.json()["error"]["message"]
        assert len(fake.requests) == sent, "it reached the engine"
        too_many = httpx.post(f"{url}/v1/completions", json={**body, "prompt": ["hi"] * 1000}, headers=AUTH)
        assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "too_many_sequences"
        ok = httpx.post(f"{url}/v1/completions", json={**body, "prompt": "hi", "n": 2, "max_tokens": 8}, headers=AUTH)
        assert ok.status_code == 200
        # a stream for a limited key asks vLLM for usage in every chunk, so a disconnect is still charged
        with httpx.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True},
            headers=AUTH,
        ) as answer:
            next(answer.iter_bytes())
        assert fake.requests[-1]["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
        (usage,) = app.state.limiter.local._usage.values()  # the one key's window
        assert wait_for(
            lambda: sum(n for _, n in usage.tokens.values()) < 5000 and all(n > 0 for _, n in usage.tokens.values()),
            timeout=5,
        )


def test_a_stream_whose_client_stops_reading_frees_the_engine(fake: FakeOpenAI) -> None:
    fake.token_rate, fake.max_model_len = 100_000.0, 300_000
    with served(fake, write_timeout_s=1.0) as (url, _):
        sock = _connect(url)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        body = (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], '
            b'"stream": true, "max_tokens": 200000}'
        )
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        started = time.monotonic()
        # never read: the socket buffers fill, the gateway's write deadline passes, the engine is told to stop
        assert wait_for(lambda: fake.cancelled_streams >= 1, timeout=20, interval=0.1), "the engine kept generating"
        record(
            "a streaming client that stops reading",
            "the write deadline ends the stream and aborts the engine's request",
            engine_freed_after_s=round(time.monotonic() - started, 2),
        )
        sock.close()


def test_a_serving_worker_reads_nothing_before_the_admin_key_and_the_size_limit(tmp_path: Any) -> None:
    """A serving worker (``--workers N``) forwards the admin API and the docs to its primary: it checks the
    admin key and the declared size before reading a byte of the body (the primary is not even running here)."""
    settings = load_settings(api_keys=KEY, admin_keys=ADMIN, max_body_bytes=1000)
    app = create_app(settings, [], primary_socket=str(tmp_path / "primary.sock"))
    with uvicorn_serving(app) as url:
        for auth, expected in (("", 401), (f"Bearer {KEY}", 401), (f"Bearer {ADMIN}", 413)):
            sock = _connect(url)
            head = "POST /admin/rollouts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            head += "Content-Length: 5000000\r\n" + (f"Authorization: {auth}\r\n" if auth else "") + "\r\n"
            sock.sendall(head.encode())
            sock.settimeout(3)
            answer = sock.recv(65536)
            sock.close()
            assert answer.startswith(f"HTTP/1.1 {expected}".encode()), (auth, answer[:200])
