from __future__ import annotations

from shipyard.gateway.sse import StreamScan

CHUNK = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
DONE = b"data: [DONE]\n\n"


def test_whole_events_pass_through_unchanged() -> None:
    scan = StreamScan()
    assert scan.feed(CHUNK + CHUNK) == CHUNK + CHUNK
    assert scan.events == 2 and not scan.done


def test_partial_events_wait_for_their_end() -> None:
    scan = StreamScan()
    stream = CHUNK + USAGE + DONE
    out = b"".join(scan.feed(stream[i : i + 7]) for i in range(0, len(stream), 7)) + scan.flush()
    assert out == stream
    assert scan.completion_tokens == 2 and scan.prompt_tokens == 3 and scan.done


def test_injected_usage_event_is_dropped_but_counted() -> None:
    scan = StreamScan(drop_usage=True)
    assert scan.feed(CHUNK + USAGE + DONE) == CHUNK + DONE
    assert scan.completion_tokens == 2


def test_usage_riding_on_a_content_chunk_is_kept() -> None:
    scan = StreamScan(drop_usage=True)
    both = b'data: {"choices":[{"delta":{"content":"a"}}],"usage":{"completion_tokens":1}}\n\n'
    assert scan.feed(both) == both and scan.completion_tokens == 1


def test_garbled_usage_is_forwarded_not_fatal() -> None:
    scan = StreamScan(drop_usage=True)
    bad = b'data: {"usage":{oops\n\n'
    assert scan.feed(bad) == bad and scan.completion_tokens is None
