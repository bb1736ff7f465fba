from __future__ import annotations

import math
import random

import pytest

from shipyard.bench import percentile, summarize
from shipyard.bench.stream_load import LoadResult, RequestRecord


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
        RequestRecord(started=-1.0, ttft_s=0.5, e2e_s=1, status=200, done=True, token_times=[-0.5, 0.5]),  # warm-up
        RequestRecord(
            started=0.1, ttft_s=0.01, e2e_s=1, output_tokens=2, status=200, done=True, token_times=[0.2, 0.3]
        ),
        RequestRecord(started=0.2, status=503, error="HTTP 503: busy"),
        RequestRecord(started=0.3, ttft_s=0.02, status=200, error="upstream failed mid-stream", token_times=[1.5]),
    ]
    summary = LoadResult(concurrency=2, window_s=1.0, records=records).summary()
    assert summary["requests"] == 3 and summary["errors"] == 2
    assert summary["ttft_ms"]["p50"] == pytest.approx(10.0)
    assert summary["output_tok_per_s"] == 3.0  # tokens at 0.5, 0.2, 0.3; the one at 1.5 is past the window
    assert summary["error_samples"] == ["HTTP 503: busy", "upstream failed mid-stream"]
