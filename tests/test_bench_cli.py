"""`shipyard bench` against the fake upstream (set token rate) behind a real gateway."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from shipyard.bench.stream_load import Slo, arrival_offsets, parse_slo
from shipyard.cli import app
from tests.stack import API_KEY, Stack

runner = CliRunner()


def run_bench(stack: Stack, *args: str) -> Result:
    """`shipyard bench` against the stack's gateway with its key."""
    return runner.invoke(app, ["bench", "--url", stack.url, "--api-key", API_KEY, *args])


def test_arrival_schedules() -> None:
    assert arrival_offsets(10, 1.0, "constant") == [i / 10 for i in range(10)]
    poisson = arrival_offsets(100, 20.0, "poisson", seed=3)
    assert abs(len(poisson) / 20.0 - 100) / 100 < 0.05  # the seeded schedule itself holds the rate
    assert poisson == arrival_offsets(100, 20.0, "poisson", seed=3)
    with pytest.raises(ValueError):
        arrival_offsets(0, 1)


def test_parse_slo() -> None:
    assert parse_slo("ttft=200,e2e=2000") == Slo(200, 2000)
    for bad in ("ttft<200", "tpot=5", "ttft=fast"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_closed_loop_sweep_writes_summary_requests_report_plots(stack: Stack, tmp_path: Path) -> None:
    stack.fake.token_rate = 200.0
    out = tmp_path / "run"
    result = run_bench(
        stack,
        "--concurrency",
        "1,4",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--max-tokens",
        "10",
        "--out",
        str(out),
        "--slo",
        "ttft=1000,e2e=5000",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [r["concurrency"] for r in summary["runs"]] == [1, 4] and summary["model"] == "fake-model"
    four = summary["runs"][1]
    assert four["errors"] == 0 and four["requests"] > 0
    # 4 streams of 200 tok/s: about 800 tokens/s while measured
    assert 600 < four["output_tok_per_s"] < 880
    assert four["tpot_ms"]["p50"] == pytest.approx(5.0, rel=0.3)
    assert four["goodput"] == pytest.approx(four["request_per_s"])
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert {"run", "ok", "status", "ttft_ms", "e2e_ms", "output_tokens", "deployment", "error"} <= set(
        json.loads(lines[0])
    )
    for name in ("report.md", "latency_cdf.png", "latency_throughput.png"):
        assert (out / name).stat().st_size > 0


def test_open_loop_holds_its_arrival_rate(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "open"
    result = run_bench(
        stack, "--rate", "40", "--arrival", "constant", "--duration", "3", "--max-tokens", "4", "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    run = json.loads((out / "summary.json").read_text())["runs"][0]
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    starts = sorted(r["started"] for r in records)
    achieved = (len(starts) - 1) / (starts[-1] - starts[0])
    assert run["rate"] == 40 and run["requests"] == 120 and abs(achieved - 40) / 40 < 0.05


def test_failures_stay_in_the_denominator(stack: Stack, tmp_path: Path) -> None:
    from shipyard.testing import Fault

    stack.fake.fault = Fault.SERVER_ERROR
    out = tmp_path / "bad"
    result = run_bench(
        stack,
        "--concurrency",
        "2",
        "--duration",
        "1",
        "--warmup",
        "0",
        "--max-tokens",
        "4",
        "--model",
        "fake-model",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    run = json.loads((out / "summary.json").read_text())["runs"][0]
    assert run["requests"] > 0 and run["errors"] == run["requests"] and run["goodput"] == 0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--concurrency", "1", "--rate", "5"], "exactly one"),
        ([], "exactly one"),
        (["--concurrency", "a,b"], "comma-separated"),
        (["--rate", "-1"], "positive"),
        (["--rate", "1", "--slo", "ttft<5"], "SLO part"),
        (["--scenario", "chat", "--rate", "1"], "not available yet"),
    ],
)
def test_bad_bench_arguments(args: list[str], fragment: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", "--api-key", "k", "--model", "m", "--out", str(tmp_path), *args])
    assert result.exit_code == 1 and fragment in result.stderr, result.output
