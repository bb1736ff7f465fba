from __future__ import annotations

import json
import math
import random

import pytest

from shipyard.bench import percentile, summarize
from shipyard.bench.load import LoadResult, RequestRecord, Slo, find_max


def test_percentile_matches_hand_computed_linear_interpolation() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 99) == 10
    assert percentile([3, 1, 2], 0) == 1 and percentile([3, 1, 2], 100) == 3
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_percentile_agrees_with_numpy() -> None:
    np = pytest.importorskip("numpy")
    rng = random.Random(7)
    sample = [rng.expovariate(1 / 30) for _ in range(1001)]
    for q in (1, 50, 90, 99, 99.9):
        assert percentile(sample, q) == pytest.approx(float(np.percentile(sample, q)))


def test_summarize() -> None:
    assert summarize([1.0, 2.0, 3.0]) == {"p50": 2.0, "p90": 2.8, "p99": pytest.approx(2.98), "mean": 2.0, "max": 3.0}
    assert all(math.isnan(v) for v in summarize([]).values())


def test_failed_requests_stay_in_the_denominator_and_warmup_is_excluded() -> None:
    records = [
        RequestRecord(started=-1.0, ttft_s=0.5, e2e_s=1, status=200, done=True, chunk_times=[-0.5, 0.5]),  # warm-up
        RequestRecord(
            started=0.1, ttft_s=0.01, e2e_s=1, output_tokens=2, status=200, done=True, chunk_times=[0.2, 0.3]
        ),
        RequestRecord(started=0.2, status=503, error="HTTP 503: busy"),
        RequestRecord(started=0.3, ttft_s=0.02, status=200, error="upstream failed mid-stream", chunk_times=[1.5]),
    ]
    summary = LoadResult(concurrency=2, window_s=1.0, records=records).summary()
    assert summary["requests"] == 3 and summary["errors"] == 2
    assert summary["ttft_ms"]["p50"] == pytest.approx(10.0)
    assert summary["output_tok_per_s"] == 3.0  # tokens at 0.5, 0.2, 0.3; the one at 1.5 is past the window
    assert summary["error_samples"] == ["HTTP 503: busy", "upstream failed mid-stream"]


def _level(p99_ms: float, errors: int = 0) -> LoadResult:
    """A load level whose requests all took ``p99_ms`` end to end (``errors`` of them failed)."""
    records = [RequestRecord(started=0.1, ttft_s=0.001, e2e_s=p99_ms / 1000, status=200, done=True)] * 10
    records += [RequestRecord(started=0.1, status=500, error="boom")] * errors
    return LoadResult(concurrency=1, window_s=1.0, records=records)


def test_slo_is_met_at_p99_only_without_errors() -> None:
    slo = Slo(e2e_ms=100)
    assert slo.met_at_p99(_level(90).summary())
    assert not slo.met_at_p99(_level(110).summary())
    assert not slo.met_at_p99(_level(10, errors=1).summary())
    assert not Slo(ttft_ms=5).met_at_p99(LoadResult(1, 1.0, []).summary())


@pytest.mark.parametrize(("capacity", "integer", "expected"), [(37, True, 37), (1000, True, 64), (0.5, True, None)])
def test_find_max_doubles_then_bisects(capacity: float, integer: bool, expected: float | None) -> None:
    """A server that meets a 100 ms SLO up to ``capacity`` and misses it above: find_max lands on it exactly."""
    tried: list[float] = []

    def measure(level: float) -> LoadResult:
        tried.append(level)
        return _level(50 if level <= capacity else 500)

    best, runs = find_max(measure, Slo(e2e_ms=100), start=1, limit=64, integer=integer)
    assert best == expected and len(runs) == len(tried)
    if capacity == 37:
        assert tried[:7] == [1, 2, 4, 8, 16, 32, 64] and tried[7:] == [48, 40, 36, 38, 37]


def test_find_max_on_rates_stops_within_precision() -> None:
    best, runs = find_max(
        lambda r: _level(50 if r <= 130 else 500), Slo(e2e_ms=100), start=10, limit=1e6, integer=False
    )
    assert best is not None and 130 * 0.95 <= best <= 130 and len(runs) < 20


def test_itl_and_tpot_come_from_chunk_times_and_usage() -> None:
    record = RequestRecord(started=0, ttft_s=0.1, e2e_s=0.5, output_tokens=5, chunk_times=[0.1, 0.2, 0.3, 0.4, 0.5])
    assert record.tpot_s == pytest.approx(0.1) and record.itl_s == pytest.approx([0.1] * 4)
    assert record.row()["tpot_ms"] == pytest.approx(100.0) and "chunk_times" not in record.row()


def test_workloads_are_deterministic_and_shaped() -> None:
    from shipyard.bench.scenarios import TOKEN_ID_RANGE, ChatWorkload, DatasetWorkload, RandomWorkload

    tokens = RandomWorkload("m", input_tokens=512, output_tokens=64, endpoint="completions")
    first = tokens.request(0)
    assert first.path == "/v1/completions" and len(first.body["prompt"]) == 512
    assert all(TOKEN_ID_RANGE[0] <= t < TOKEN_ID_RANGE[1] for t in first.body["prompt"])
    assert first.body == tokens.request(0).body and first.body != tokens.request(1).body
    assert first.body["ignore_eos"] and first.body["max_tokens"] == 64 and first.body["stream_options"]
    words = RandomWorkload("m", input_tokens=100, stream=False).request(3)
    assert len(words.body["messages"][0]["content"].split()) == 100 and not words.stream
    # --no-stream on completions is read as one JSON answer (it was read as a stream: every request "truncated")
    plain = RandomWorkload("m", endpoint="completions", stream=False).request(0)
    assert plain.body["stream"] is False and not plain.stream
    with pytest.raises(ValueError):
        RandomWorkload("m", endpoint="embeddings")

    chat = ChatWorkload("m", system_tokens=50, turn_tokens=5, output_tokens=7, conversations=2, turns=3)
    turn0, other, turn1 = chat.request(0), chat.request(1), chat.request(2)
    assert turn0.body["messages"][0] == other.body["messages"][0]  # the shared system prompt
    assert len(turn0.body["messages"]) == 2 and len(turn1.body["messages"]) == 4
    assert turn1.body["messages"][1] == turn0.body["messages"][1]  # conversation 0's history is its prefix
    later = chat.request(6)  # the next group of conversations: same system prompt, new conversation
    assert later.body["messages"][0] == turn0.body["messages"][0] and later.body != turn0.body
    assert len(later.body["messages"]) == 2
    sent = [json.dumps(chat.request(i).body) for i in range(50)]
    assert len(set(sent)) == 50  # nothing is ever sent twice
    document = ChatWorkload("m", system_tokens=5, turn_tokens=5, output_tokens=7, conversations=1, first_turn_tokens=40)
    opening, follow_up = document.request(0).body["messages"], document.request(1).body["messages"]
    assert len(opening[1]["content"].split()) == 40 and follow_up[1] == opening[1]  # every turn repeats it
    assert len(follow_up[3]["content"].split()) == 5

    intent = DatasetWorkload("intent", [{"text": "where is my card"}], model="m").request(5)
    assert intent.path == "/v1/intent" and intent.body == {"text": "where is my card", "model": "m"}
    reply = DatasetWorkload("reply", [{"messages": [{"role": "user", "content": "late"}], "template": "standard"}])
    assert reply.request(0).body == {"messages": [{"role": "user", "content": "late"}], "template": "standard"}


def test_resource_table_marks_a_level_too_short_to_sample() -> None:
    from shipyard.bench.report import _resource_lines

    sampled = {"gateway_cpu_pct": {"mean": 12.0, "peak": 20.0}}
    lines = _resource_lines([{"concurrency": 1, "resources": {}}, {"concurrency": 2, "resources": sampled}])
    assert lines[2].endswith("| — |") and "12" in lines[3]
