"""`shipyard bench` against the fake upstream (set token rate) behind a real gateway."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from shipyard.bench.load import Slo, arrival_offsets, parse_slo
from shipyard.cli import app
from tests.stack import API_KEY, Stack
from tests.test_tasks import GOOD_DRAFT

runner = CliRunner()


def run_bench(stack: Stack, *args: str) -> Result:
    """`shipyard bench` against the stack's gateway with its key."""
    return runner.invoke(app, ["bench", "--url", stack.url, "--api-key", API_KEY, *args])


def test_arrival_schedules() -> None:
    assert arrival_offsets(10, 1.0, "constant") == [i / 10 for i in range(10)]
    poisson = arrival_offsets(100, 20.0, "poisson", seed=3)
    assert abs(len(poisson) / 20.0 - 100) / 100 < 0.05  # the seeded schedule itself holds the rate
    assert poisson == arrival_offsets(100, 20.0, "poisson", seed=3)
    assert len(arrival_offsets(100, arrival="poisson", count=250)) == 250
    assert arrival_offsets(4, arrival="constant", count=3) == [0, 0.25, 0.5]
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
        "--output-tokens",
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
    # 4 streams of 200 tok/s: at most 800 tokens/s while measured, less each request's own overhead (578 on a
    # loaded CI machine, 2026-12-07), and always the requests' own 10 tokens each
    assert 400 < four["output_tok_per_s"] < 880
    assert four["output_tok_per_s"] == pytest.approx(10 * four["request_per_s"], rel=0.1)
    assert four["tpot_ms"]["p50"] == pytest.approx(5.0, rel=0.3)
    assert four["goodput"] == pytest.approx(four["request_per_s"])
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert {"run", "ok", "status", "ttft_ms", "e2e_ms", "output_tokens", "deployment", "error"} <= set(
        json.loads(lines[0])
    )
    for name in ("report.md", "latency_cdf.png", "latency_throughput.png", "resources.png"):
        assert (out / name).stat().st_size > 0
    # The gateway and fake engine serve from this very process: it is found by its port and sampled.
    assert four["resources"]["engine_cpu_pct"]["peak"] > 0 and four["resources"]["engine_rss_mib"]["mean"] > 50
    assert four["itl_ms"]["p50"] == pytest.approx(5.0, rel=0.5)
    # Every prompt of the sweep (both levels, warm-up included) is new: no level reuses the prefix cache of another.
    prompts = [r["messages"][0]["content"] for r in stack.fake.requests]
    assert len(prompts) > 10 and len(set(prompts)) == len(prompts)
    assert isinstance(summary["seed"], int)


def test_open_loop_holds_its_arrival_rate(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "open"
    result = run_bench(
        stack, "--rate", "40", "--arrival", "constant", "--duration", "3", "--output-tokens", "4", "--out", str(out)
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
        "--output-tokens",
        "4",
        "--model",
        "fake-model",
        "--out",
        str(out),
    )
    # Still written, counted, and the exit status says the run measured nothing but failures.
    assert result.exit_code == 1 and "every request failed: HTTP 500" in result.stderr, result.output
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
        (["--scenario", "poetry", "--rate", "1"], "unknown scenario"),
        (["--scenario", "intent", "--rate", "1", "--slo", "ttft=50"], "needs streaming"),
        (["--scenario", "intent", "--rate", "1", "--dataset", "/nonexistent.jsonl"], "cannot read dataset"),
        (["--rate", "1,2", "--find-max", "--slo", "e2e=5"], "one starting level"),
        (["--rate", "1", "--find-max"], "needs --slo"),
        (["--concurrency", "1", "--duration", "2", "--requests", "3"], "not both"),
        (["--concurrency", "1.5"], "whole numbers"),
        (["--scenario", "rollout", "--concurrency", "4"], "--deploy"),
    ],
)
def test_bad_bench_arguments(args: list[str], fragment: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", "--api-key", "k", "--model", "m", "--out", str(tmp_path), *args])
    assert result.exit_code == 1 and fragment in result.stderr, result.output


@pytest.mark.parametrize("scenario", ["chat", "intent", "reply"])
def test_scenarios_run_through_the_gateway(stack: Stack, tmp_path: Path, scenario: str) -> None:
    stack.fake.token_rate = 1000.0
    if scenario == "reply":  # the fake answers every call with this valid draft
        stack.fake.script.extend([json.dumps(GOOD_DRAFT)] * 500)
    out = tmp_path / scenario
    args = ["--scenario", scenario, "--concurrency", "4", "--requests", "12", "--warmup", "0"]
    result = run_bench(stack, *args, "--output-tokens", "5", "--system-tokens", "40", "--out", str(out))
    assert result.exit_code == 0, result.output
    run = json.loads((out / "summary.json").read_text())["runs"][0]
    assert run["requests"] == 12 and run["errors"] == 0, run["error_samples"]
    paths = {"chat": "/v1/chat/completions", "intent": "/v1/intent", "reply": "/v1/reply"}
    if scenario == "chat":
        sent = stack.fake.requests[-1]
        assert sent["messages"][0]["role"] == "system" and len(sent["messages"][0]["content"].split()) > 40
        assert run["tpot_ms"]["p50"] > 0 and run["output_tok_per_s"] > 0
    else:
        assert all(r["ttft_ms"] is None for r in map(json.loads, (out / "requests.jsonl").read_text().splitlines()))
        assert run["e2e_ms"]["p50"] > 0
    assert json.loads((out / "summary.json").read_text())["workload"]["name"] == scenario
    assert paths[scenario]  # every scenario reached its endpoint (errors == 0 above)


def test_find_max_reports_the_highest_level_meeting_the_slo(stack: Stack, tmp_path: Path) -> None:
    stack.fake.token_rate = 500.0
    out = tmp_path / "max"
    result = run_bench(
        stack,
        *("--concurrency", "1", "--find-max", "--max-level", "4", "--slo", "e2e=5000", "--duration", "0.6"),
        *("--warmup", "0", "--output-tokens", "3", "--out", str(out)),
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["find_max"]["max_concurrency"] == 4 and [r["concurrency"] for r in summary["runs"]] == [1, 2, 4]
    missed = run_bench(
        stack,
        *("--concurrency", "1", "--find-max", "--slo", "e2e=0.001", "--duration", "0.5", "--warmup", "0"),
        *("--output-tokens", "3", "--out", str(tmp_path / "none")),
    )
    assert missed.exit_code == 0 and "already misses" in missed.stdout


def test_compare_two_runs(stack: Stack, tmp_path: Path) -> None:
    stack.fake.token_rate = 400.0
    for name in ("a", "b"):
        args = ["--concurrency", "1,2", "--requests", "4", "--warmup", "0", "--output-tokens", "4"]
        assert run_bench(stack, *args, "--out", str(tmp_path / name)).exit_code == 0
    result = runner.invoke(app, ["bench", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert {r["load"] for r in rows} == {"c=1", "c=2"} and "ttft_ms p50" in result.stdout
    for row in rows:
        assert row["change"] is None or row["change"] == pytest.approx((row["b"] - row["a"]) / row["a"])
    assert [r["a"] for r in rows if r["metric"] == "errors"] == [0, 0]
    bad = runner.invoke(app, ["bench", "compare", str(tmp_path / "a"), str(tmp_path / "missing")])
    assert bad.exit_code == 1 and "cannot read" in bad.stderr
