"""The gateway against a fake upstream on loopback, with the official openai SDK as the client."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from shipyard.testing import FakeOpenAI, Fault
from tests.helpers import wait_for
from tests.stack import Stack, start_stack

MESSAGES = [{"role": "user", "content": "hi"}]


def error_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    error: dict[str, object] = body["error"]
    return error


def test_chat_completion_non_streaming(stack: Stack) -> None:
    reply = stack.client().chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=5)
    assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_chat_completion_streaming_hides_injected_usage(stack: Stack) -> None:
    chunks = list(
        stack.client().chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=4, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "tok0 tok1 tok2 tok3 "
    assert all(c.choices for c in chunks), "the usage chunk the gateway asked for must not reach the client"
    assert stack.fake.requests[-1]["stream_options"] == {"include_usage": True}


def test_streaming_keeps_usage_when_client_asks(stack: Stack) -> None:
    chunks = list(
        stack.client().chat.completions.create(
            model="fake-model",
            messages=MESSAGES,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_completions_streaming_and_not(stack: Stack) -> None:
    client = stack.client()
    assert client.completions.create(model="fake-model", prompt="x", max_tokens=2).choices[0].text == "tok0 tok1"
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(model="fake-model", prompt="x", max_tokens=2, stream=True)
    )
    assert streamed == "tok0 tok1 "


def test_models_lists_upstream_models(stack: Stack) -> None:
    models = stack.client().models.list().data
    assert [m.id for m in models] == ["fake-model"]


def test_response_names_deployment_and_version(stack: Stack) -> None:
    with stack.http() as http:
        r = http.post("/v1/chat/completions", json={"model": "fake-model", "messages": MESSAGES})
    assert r.headers["x-shipyard-deployment"] == "blue" and r.headers["x-shipyard-version"] == "v1"


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer nope"}, "invalid_api_key"),
        ({"Authorization": "Basic abc"}, "invalid_api_key"),
    ],
)
def test_auth_rejections(stack: Stack, headers: dict[str, str], code: str) -> None:
    r = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": "fake-model", "messages": MESSAGES},
        headers=headers,
    )
    assert r.status_code == 401
    assert error_of(r)["code"] == code and error_of(r)["type"] == "authentication_error"
    assert not stack.fake.requests


def test_wrong_key_through_sdk_is_authentication_error(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError):
        stack.client(key="wrong").models.list()


def test_health_ready_metrics_need_no_key(stack: Stack) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(stack.url + path).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "param", "fragment"),
    [
        (b"{not json", 400, None, "not valid JSON"),
        (b"[1, 2]", 400, None, "JSON object"),
        (b"", 400, None, "empty request body"),
        (json.dumps({"model": "fake-model"}).encode(), 422, "messages", "Field required"),
        (
            json.dumps({"model": "fake-model", "messages": [{"role": "robot", "content": "x"}]}).encode(),
            422,
            "messages.0.role",
            "Input should be",
        ),
        (
            json.dumps({"model": "fake-model", "messages": MESSAGES, "stream": "yes"}).encode(),
            422,
            "stream",
            "boolean",
        ),
        (
            json.dumps({"model": "fake-model", "messages": MESSAGES, "temperature": 3}).encode(),
            422,
            "temperature",
            "less than or equal to 2",
        ),
        (json.dumps({"model": "nope", "messages": MESSAGES}).encode(), 404, "model", "available: fake-model"),
        (
            json.dumps({"model": "fake-model", "messages": MESSAGES, "max_tokens": 5000}).encode(),
            400,
            "max_tokens",
            "(1024)",
        ),
        (
            json.dumps({"model": "fake-model", "messages": MESSAGES, "guided_json": {}}).encode(),
            400,
            "guided_json",
            "structured_outputs",
        ),
        (
            json.dumps({"model": "fake-model", "messages": MESSAGES, "guided_choice": ["a"]}).encode(),
            400,
            "guided_choice",
            '"choice"',
        ),
    ],
)
def test_bad_input_gets_openai_error(stack: Stack, body: bytes, status: int, param: str | None, fragment: str) -> None:
    with stack.http() as http:
        r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = error_of(r)
    assert error["param"] == param
    assert fragment in str(error["message"])
    assert not stack.fake.requests, "a rejected request must never reach the engine"


def test_body_over_limit_is_413(fake: FakeOpenAI) -> None:
    for small in start_stack(fake, max_body_bytes=200):
        with small.http() as http:
            r = http.post("/v1/chat/completions", json={"model": "fake-model", "messages": MESSAGES * 20})
            assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
            # A chunked body (no content-length) is cut off at the limit too.
            r = http.post("/v1/chat/completions", content=iter([b'{"model": "fake-model", "x": "' + b"a" * 300]))
            assert r.status_code == 413


def test_unknown_route_is_openai_shaped_404(stack: Stack) -> None:
    r = httpx.get(f"{stack.url}/v1/nothing")
    assert r.status_code == 404 and "no such route" in str(error_of(r)["message"])


@pytest.mark.parametrize(
    "path",
    ["/pause", "/resume", "/collective_rpc", "/reset_prefix_cache", "/sleep", "/wake_up", "/is_sleeping"],
)
def test_engine_dev_routes_are_not_reachable_through_the_gateway(stack: Stack, path: str) -> None:
    """In-place updates drive these on the engine's loopback port; users (even with a key) get a 404."""
    r = httpx.post(f"{stack.url}{path}", headers={"Authorization": "Bearer sk-test-key"}, json={"method": "x"})
    assert r.status_code == 404 and "no such route" in str(error_of(r)["message"])


def test_upstream_error_status_passes_through(stack: Stack) -> None:
    stack.fake.fault = Fault.SERVER_ERROR
    with pytest.raises(openai.InternalServerError):
        stack.client().chat.completions.create(model="fake-model", messages=MESSAGES)


def test_unready_upstream_gives_503_with_retry_after(stack: Stack) -> None:
    stack.fake.fault = Fault.UNHEALTHY
    assert wait_for(lambda: httpx.get(f"{stack.url}/ready").status_code == 503)
    with stack.http() as http:
        r = http.post("/v1/chat/completions", json={"model": "fake-model", "messages": MESSAGES})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert error_of(r)["type"] == "service_unavailable"
    stack.fake.fault = Fault.NONE
    assert wait_for(lambda: httpx.get(f"{stack.url}/ready").status_code == 200)


def test_mid_stream_death_ends_with_error_event(stack: Stack) -> None:
    stack.fake.fault = Fault.DIE_MID_STREAM
    received: list[str] = []
    started = time.monotonic()
    with pytest.raises(openai.APIError, match="upstream"):
        for chunk in stack.client().chat.completions.create(
            model="fake-model", messages=MESSAGES, max_tokens=10, stream=True
        ):
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "tok0 tok1 tok2 "
    assert time.monotonic() - started < 2


def test_silent_upstream_hits_read_timeout_with_error_event(fake: FakeOpenAI) -> None:
    fake.fault = Fault.HANG_MID_STREAM
    for slow in start_stack(fake, upstream_read_timeout_s=0.5):
        with pytest.raises(openai.APIError, match="read timeout"):
            list(
                slow.client().chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=10, stream=True)
            )


def test_an_answer_slower_than_the_read_timeout_is_a_504_that_says_what_to_do(fake: FakeOpenAI) -> None:
    """Issue 34 item 12: a non-streamed answer still being generated when the gateway stops waiting was a 502
    upstream_error "ReadTimeout"; it is a 504 naming the limit, streaming and max_tokens."""
    fake.token_rate = 20.0  # 40 tokens: 2 s, past the 0.5 s read timeout
    for slow in start_stack(fake, upstream_read_timeout_s=0.5):
        with slow.http() as http:
            r = http.post("/v1/chat/completions", json={"model": "fake-model", "messages": MESSAGES, "max_tokens": 40})
        assert r.status_code == 504, r.text
        error = error_of(r)
        assert error["code"] == "upstream_timeout" and "0.5 s" in error["message"]
        assert "stream" in error["message"] and "max_tokens" in error["message"]


def test_client_disconnect_aborts_upstream_stream(stack: Stack) -> None:
    stack.fake.token_rate = 20.0
    with (
        stack.http() as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "fake-model", "messages": MESSAGES, "max_tokens": 200, "stream": True},
        ) as r,
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    assert wait_for(lambda: stack.fake.cancelled_streams == 1, timeout=3)
    assert wait_for(lambda: stack.fake.open_streams == 0, timeout=3)
    metrics = httpx.get(f"{stack.url}/metrics").text
    labels = 'deployment="blue",model="fake-model",route="chat",status="499",version="v1"'
    assert f"shipyard_requests_total{{{labels}}} 1.0" in metrics


def test_metrics_count_requests_tokens_and_ttft(stack: Stack) -> None:
    client = stack.client()
    client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=3)
    list(client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=4, stream=True))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=MESSAGES)
    served = 'deployment="blue",model="fake-model",route="chat",status="200",version="v1"'
    # a stream is counted when the gateway closes it, which may be just after the client read its last event
    assert wait_for(lambda: f"shipyard_requests_total{{{served}}} 2.0" in httpx.get(f"{stack.url}/metrics").text)
    text = httpx.get(f"{stack.url}/metrics").text
    assert 'shipyard_requests_total{deployment="-",model="-",route="chat",status="404",version="-"} 1.0' in text
    assert 'shipyard_output_tokens_total{model="fake-model"} 7.0' in text
    ttft = 'shipyard_time_to_first_token_seconds_count{deployment="blue",model="fake-model",route="chat",version="v1"}'
    assert f"{ttft} 1.0" in text
    assert 'shipyard_deployment_replicas{deployment="blue",model="",state="ready",version="v1"} 1.0' in text
    assert 'shipyard_deployment_weight{deployment="blue",model=""} 1.0' in text
    assert 'shipyard_requests_in_flight{route="chat"} 0.0' in text
    assert "shipyard_replicas_ready 1.0" in text


def test_concurrent_streams_all_complete(stack: Stack) -> None:
    stack.fake.token_rate = 200.0
    results: list[str] = []

    def one() -> None:
        chunks = stack.client().chat.completions.create(
            model="fake-model", messages=MESSAGES, max_tokens=20, stream=True
        )
        results.append("".join(c.choices[0].delta.content or "" for c in chunks))

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 and all(r.count("tok") == 20 for r in results)


def test_client_gone_during_a_non_streaming_request_is_not_left_in_flight(stack: Stack) -> None:
    stack.fake.token_rate = 5.0  # 20 tokens: the engine works ~4 s
    with stack.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post(
            "/v1/chat/completions", json={"model": "fake-model", "messages": MESSAGES, "max_tokens": 20}, timeout=0.5
        )

    def in_flight() -> int:
        return int(httpx.get(f"{stack.url}/ready").json()["replicas"][0]["in_flight"])

    assert wait_for(lambda: in_flight() == 0, timeout=3)


def test_garbage_collections_are_timed_by_generation() -> None:
    import gc

    from shipyard.gateway.metrics import GatewayMetrics, GCWatch

    metrics = GatewayMetrics()
    watch = GCWatch(metrics)
    try:
        gc.collect()
        gc.collect(0)
        assert not metrics.gc_pause.collect()[0].samples  # nothing observed inside a collection
        assert len(watch.pending) >= 2
    finally:
        watch.stop()  # flushes
    counts = {
        s.labels["generation"]: s.value
        for family in metrics.registry.collect()
        if family.name == "shipyard_gc_pause_seconds"
        for s in family.samples
        if s.name.endswith("_count")
    }
    assert counts["2"] >= 1 and counts["0"] >= 1
    gc.collect()  # no longer watched
    assert sum(s.value for s in metrics.gc_pause.collect()[0].samples if s.name.endswith("_count")) == sum(
        counts.values()
    )


GC_IN_PROMETHEUS_LOCK = """
import gc, sys
from pathlib import Path
from shipyard.gateway import metrics as m

m.enable_multiprocess(Path(sys.argv[1]))
metrics = m.GatewayMetrics()
watch = m.GCWatch(metrics)
gc.set_threshold(1, 1, 1)  # a collection at nearly every allocation: some start inside prometheus_client's lock
keep = []
for i in range(3000):
    metrics.requests.labels(*[f"x{i}"] * len(metrics.requests._labelnames)).inc()  # new children: mmap writes
    keep.append([{}])
watch.stop()
print("pauses", sum(s.value for s in metrics.gc_pause.collect()[0].samples if s.name.endswith("_count")))
"""


def test_a_collection_inside_a_locked_metrics_write_does_not_deadlock(tmp_path: Path) -> None:
    """In multiprocess mode prometheus_client writes every value under one non-reentrant lock per process; a GC
    callback that observed there waited for itself (a serving worker hung in its first second on the H200)."""
    done = subprocess.run(
        [sys.executable, "-c", GC_IN_PROMETHEUS_LOCK, str(tmp_path / "metrics")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) > 100  # the collections were timed, after the fact
