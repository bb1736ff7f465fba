"""`shipyard eval` end to end against the fake upstream behind a real gateway: artifacts and failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shipyard.cli import app
from tests.stack import API_KEY, Stack
from tests.test_tasks import GOOD_DRAFT

runner = CliRunner()


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_intent_writes_summary_predictions_report_and_plots(stack: Stack, tmp_path: Path) -> None:
    # The fake answers the first allowed label, "lost_card": 2 of these 3 are right.
    dataset = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "lost my card", "label": "lost_card"},
            {"text": "card gone", "label": "lost_card", "tags": ["typo"]},
            {"text": "where is my order", "label": "order_status"},
        ],
    )
    with dataset.open("a") as handle:
        handle.write("{broken\n")
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["eval", "intent", "--dataset", str(dataset), "--url", stack.url, "--api-key", API_KEY, "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "accuracy=0.667" in result.stdout
    assert "skipped line 4" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == 2 / 3 and summary["errors"] == 0
    assert summary["macro_f1"] == (0.8 + 0.0) / 2  # lost_card P=2/3 R=1 F1=.8 ; order_status F1=0
    assert set(summary["latency_ms"]) == {"p50", "p90", "p99", "mean", "max"}
    assert summary["skipped_lines"] == ["line 4: not JSON (Expecting property name enclosed in double quotes)"]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    for name in ("report.md", "confusion.png", "latency_cdf.png"):
        assert (out / name).stat().st_size > 0


def test_eval_reply_scores_replies_against_references(stack: Stack, tmp_path: Path) -> None:
    from shipyard.tasks import ReplyDraft, load_templates
    from shipyard.tasks.reply import render_reply

    exact = render_reply(load_templates()["standard"], ReplyDraft.model_validate(GOOD_DRAFT))
    rows: list[dict[str, object]] = [
        {"messages": [{"role": "user", "content": "my order is late"}], "reference": exact},
        {"messages": [{"role": "user", "content": "my card is lost"}], "reference": "Quarterly tax filing guide."},
    ]
    stack.fake.script.extend([json.dumps(GOOD_DRAFT)] * 2)
    out = tmp_path / "reply"
    result = runner.invoke(
        app,
        [
            "eval",
            "reply",
            "--dataset",
            str(write_jsonl(tmp_path / "r.jsonl", rows)),
            "--url",
            stack.url,
            "--api-key",
            API_KEY,
            "--out",
            str(out),
            "--concurrency",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert predictions[0]["cosine"] > 0.99 and predictions[1]["cosine"] < 0.5
    assert summary["pass_rate_085"] == 0.5 and summary["schema_valid_rate"] == 1.0
    assert (out / "cosine_hist.png").stat().st_size > 0

    compare_out = tmp_path / "cmp"
    result = runner.invoke(app, ["eval", "compare", str(out), str(out), "--out", str(compare_out)])
    assert result.exit_code == 0, result.output
    assert json.loads((compare_out / "compare.json").read_text())[0]["pass_rate_085"] == 0.5
    assert (compare_out / "compare.png").stat().st_size > 0


def test_eval_against_a_dead_gateway_fails_with_one_line(tmp_path: Path) -> None:
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": "lost_card"}])
    result = runner.invoke(
        app,
        [
            "eval",
            "intent",
            "--dataset",
            str(dataset),
            "--url",
            "http://127.0.0.1:9",
            "--api-key",
            "k",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: every request failed")


def test_eval_rejects_bad_inputs(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["eval", "intent", "--dataset", str(tmp_path / "none.jsonl"), "--api-key", "k", "--out", str(tmp_path / "o")],
    )
    assert result.exit_code == 1 and "cannot read dataset" in result.stderr
    bad = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    result = runner.invoke(
        app, ["eval", "intent", "--dataset", str(bad), "--api-key", "k", "--strict", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "line 1: label: Field required" in result.stderr
    result = runner.invoke(app, ["eval", "compare", str(tmp_path), "--out", str(tmp_path / "c")])
    assert result.exit_code == 1 and "no summary.json" in result.stderr


def test_eval_register_attaches_the_summary_to_the_version(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shipyard.prepare.registry import Registry

    monkeypatch.setenv("SHIPYARD_DATA_DIR", str(tmp_path))
    registry = Registry(tmp_path / "models")
    with registry.new_version("bot", "base", scheme="bf16") as folder:
        (folder / "config.json").write_text("{}")
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"text": "lost my card", "label": "lost_card"}])
    args = ["eval", "intent", "--dataset", str(dataset), "--url", stack.url, "--api-key", API_KEY]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "run"), "--register", "bot:base"])
    assert result.exit_code == 0, result.output
    evals = registry.get("bot", "base").evals
    assert evals["intent"]["accuracy"] == 1.0 and evals["intent"]["run"] == str(tmp_path / "run")
    assert registry.verify(registry.get("bot", "base")) == []  # the manifest changed, the files did not
    requests_before = len(stack.fake.requests)
    typo = runner.invoke(app, [*args, "--out", str(tmp_path / "run2"), "--register", "bot:nope"])
    assert typo.exit_code == 1 and "no version 'nope'" in typo.stderr
    assert len(stack.fake.requests) == requests_before  # refused before a single request was sent
