"""`shipyard prepare quantize` without llm-compressor: group sizes, calibration data, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shipyard.cli import app
from shipyard.prepare.quantize import QuantizeError, calibration_messages, group_size_for, quantize

runner = CliRunner()


def test_group_size_is_the_largest_that_divides_every_width() -> None:
    assert group_size_for({"hidden_size": 3584, "intermediate_size": 18944}) == 128  # Qwen2.5-7B
    assert group_size_for({"hidden_size": 576, "intermediate_size": 1536}) == 64  # SmolLM2-135M
    with pytest.raises(QuantizeError, match="no W4A16 group size"):
        group_size_for({"hidden_size": 100, "intermediate_size": 300})


def test_calibration_renders_intent_lines_and_keeps_chat_lines(tmp_path: Path) -> None:
    data = tmp_path / "calib.jsonl"
    rows = [
        {"text": "where is my card", "label": "card_arrival"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"text": "no label here"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second, third = calibration_messages(data, samples=10)
    assert first[0]["role"] == "system" and "speak_to_human:" in first[0]["content"]
    assert first[1:] == [
        {"role": "user", "content": "where is my card"},
        {"role": "assistant", "content": "card_arrival"},
    ]
    assert second == rows[1]["messages"] and len(third) == 2
    assert len(calibration_messages(data, samples=2)) == 2
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(QuantizeError, match="line 1 has neither"):
        calibration_messages(tmp_path / "bad.jsonl", 4)


def test_refusals_happen_before_any_environment_is_made(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "compressed-tensors"}}))
    venvs = tmp_path / "venvs"
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize(model, tmp_path / "o", "w4a16", venvs_dir=venvs, calibration=None)
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128}))
    with pytest.raises(QuantizeError, match="needs calibration data"):
        quantize(model, tmp_path / "o", "w8a8-int8", venvs_dir=venvs, calibration=None)
    with pytest.raises(QuantizeError, match="unknown scheme"):
        quantize(model, tmp_path / "o", "int3", venvs_dir=venvs, calibration=None)
    assert not venvs.exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--scheme", "int3"], "unknown scheme 'int3'"),
        (["--scheme", "w8a8-int8", "--calib", "/nonexistent.jsonl"], "cannot read calibration data"),
        (["--scheme", "w4a16", "--actorder", "group"], "unknown --actorder 'group'; choose among weight"),
        (["--scheme", "w8a8-int8", "--asymmetric"], "--asymmetric applies to the 4-bit schemes (awq, w4a16), not w8a8"),
    ],
)
def test_quantize_cli_errors(tmp_path: Path, args: list[str], fragment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHIPYARD_DATA_DIR", str(tmp_path))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128}))
    result = runner.invoke(app, ["prepare", "quantize", "--model", str(model), "--out", str(tmp_path / "q"), *args])
    assert result.exit_code == 1 and fragment in result.stderr, result.output
    assert not (tmp_path / "q").exists() and not (tmp_path / "venvs").exists()


def test_the_smallest_version_that_keeps_every_metric_is_picked_and_misses_are_named() -> None:
    from shipyard.prepare.search import Candidate, pick_smallest

    parent = {"intent.accuracy": 0.40, "reply.schema_valid_rate": 0.96}
    w4 = Candidate("m:w4a16", 117e6, {"intent.accuracy": 0.39, "reply.schema_valid_rate": 0.55})
    awq = Candidate("m:awq", 118e6, {"intent.accuracy": 0.395, "reply.schema_valid_rate": 0.95})
    w8 = Candidate("m:w8a8", 167e6, {"intent.accuracy": 0.41, "reply.schema_valid_rate": 0.94})
    choice = pick_smallest(parent, [w8, awq, w4], 0.95)
    assert choice.chosen is awq  # the smallest whose every metric keeps 95%
    assert choice.misses == {"m:w4a16": ["reply.schema_valid_rate 0.573 < 0.95"]}
    assert choice.keeps["m:w8a8"]["intent.accuracy"] == 1.025
    none = pick_smallest(parent, [w4], 0.95)
    assert none.chosen is None and none.misses["m:w4a16"]
    assert pick_smallest({"reply.pass_rate": 0.0}, [w4], 0.95).chosen is w4  # a parent at 0 is kept by anything


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--schemes", "w8a8-int8,awq", "--out", "smollm2:v2"], "several schemes need --out NAME:auto"),
        (["--schemes", "w8a8-int8,int3", "--out", "smollm2:auto"], "unknown scheme 'int3'"),
        (["--out", "smollm2:auto"], "give --scheme (or --schemes with --out NAME:auto)"),
        (["--scheme", "w4a16", "--group-size", "100", "--out", "x:y"], "group size 100 does not divide"),
    ],
)
def test_the_search_refuses_bad_requests_in_one_line(
    tmp_path: Path, args: list[str], fragment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHIPYARD_DATA_DIR", str(tmp_path))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128}))
    result = runner.invoke(app, ["prepare", "quantize", "--model", str(model), *args])
    assert result.exit_code == 1 and fragment in result.stderr, result.output
    assert not (tmp_path / "venvs").exists()


def test_both_tasks_calibration_mixes_both_tasks_prompts_and_no_test_line() -> None:
    from shipyard.cli.prepare import both_tasks_calibration
    from shipyard.prepare.quantize import calibration_messages
    from shipyard.tasks.datasets import project_data

    conversations = calibration_messages(both_tasks_calibration(), 64)
    systems = [c[0]["content"] for c in conversations]
    assert sum("answer with JSON only" in s for s in systems) == 32  # the reply task's prompt
    assert sum("answer with JSON only" not in s for s in systems) == 32  # the intent task's
    tests = {json.loads(line)["text"] for line in project_data("data/intent/test.jsonl").read_text().splitlines()}
    assert not any(c[-1]["content"] in tests or c[1]["content"] in tests for c in conversations)


def test_a_worker_failure_names_what_went_wrong_not_pydantics_footer() -> None:
    from shipyard.prepare.quantize import _last_error_line

    stderr = """Traceback (most recent call last):
pydantic_core._pydantic_core.ValidationError: 1 validation error for GPTQModifier
  Value error, actorder='group' has been removed. Consider using actorder='weight' or actorder=None instead.
    For further information visit https://errors.pydantic.dev/2.14/v/value_error
"""  # llm-compressor 0.14's own stderr for --actorder group (2026-12-06)
    assert _last_error_line(stderr).startswith("Value error, actorder='group' has been removed")
    assert _last_error_line("") == "no error output"


def test_a_search_reuses_the_parents_evaluation_on_the_same_examples_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The promise: the parent is evaluated once per set of examples — a second search on the same files and
    sampling reuses it; other examples (or --reevaluate-parent) measure it again. Candidates are always measured."""
    from types import SimpleNamespace

    from shipyard.prepare import search as search_module
    from shipyard.prepare.registry import Registry

    registry = Registry(tmp_path / "models")
    for version, parent in (("merged", None), ("merged-w4a16", "m:merged")):
        with registry.new_version("m", version, scheme="bf16", parent=parent) as folder:
            (folder / "config.json").write_text("{}")
    evaluated: list[str] = []

    class Served:
        def __init__(self, ref: str, *_: object) -> None:
            self.ref, self.url, self.key = ref, ref, "k"

        def __enter__(self) -> Served:
            evaluated.append(self.ref)
            return self

        def __exit__(self, *_: object) -> None:
            return None

    monkeypatch.setattr(search_module, "Served", Served)
    monkeypatch.setattr(
        search_module, "evaluate_served", lambda url, *_: {"intent.accuracy": 0.4 if "w4" not in url else 0.39}
    )
    monkeypatch.setattr("shipyard.evaluate.embeddings.Embedder", lambda _: SimpleNamespace(encode=None))
    intent, reply = tmp_path / "intent.jsonl", tmp_path / "reply.jsonl"
    intent.write_text('{"text": "a", "label": "b"}\n')
    reply.write_text("{}\n")

    def run(sample: search_module.Sample, **kwargs: bool) -> None:
        search_module.search(
            "m:merged", ["w4a16"], models_dir=tmp_path / "models", quantize_one=lambda *_: None, sample=sample,
            min_keep=0.95, port=1, logs=tmp_path / "logs", say=lambda _: None, **kwargs,
        )  # fmt: skip

    run(search_module.Sample(intent, reply, 10, 2))
    run(search_module.Sample(intent, reply, 10, 2))
    assert evaluated == ["m:merged", "m:merged-w4a16", "m:merged-w4a16"]  # the parent once
    run(search_module.Sample(intent, reply, 10, 2), reevaluate_parent=True)
    intent.write_text('{"text": "other", "label": "b"}\n')  # same path, other content: not the same examples
    run(search_module.Sample(intent, reply, 10, 2))
    assert evaluated[3:] == ["m:merged", "m:merged-w4a16"] * 2
    record = registry.get("m", "merged").evals["search"]
    assert record["role"] == "parent" and record["metrics"] == {"intent.accuracy": 0.4} and record["evaluated"]


@pytest.mark.parametrize(
    ("scheme", "asked", "symmetric"),
    [
        ("w4a16", None, False),
        ("w4a16", True, True),
        ("awq", None, False),
        ("awq", True, True),
        ("w8a8-int8", None, None),
    ],
)
def test_the_4_bit_schemes_zero_points_reach_the_worker_and_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str, asked: bool | None, symmetric: bool | None
) -> None:
    import shipyard.prepare.quantize as module

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128}))
    (tmp_path / "calib.jsonl").write_text(json.dumps({"text": "where is my order", "label": "order_status"}) + "\n")
    jobs: list[dict[str, object]] = []

    def worker(python: Path, job: dict[str, object], stem: Path, what: str) -> dict[str, object]:
        jobs.append(job)
        return {"seconds": 1.0, "llmcompressor": "x", "torch": "y", "recipe": [], "holdout_loss": None}

    monkeypatch.setattr(module, "ensure_environment", lambda venvs, say: tmp_path / "python")
    monkeypatch.setattr(module, "_run_worker", worker)
    recipe = quantize(
        model, tmp_path / "o", scheme, venvs_dir=tmp_path / "v", calibration=tmp_path / "calib.jsonl",
        **({} if asked is None else {"symmetric": asked}),
    )  # fmt: skip
    assert jobs[0]["symmetric"] is bool(asked)  # zero points unless asked
    assert recipe["symmetric"] is symmetric


@pytest.mark.parametrize(
    ("scheme", "calib", "expected"),
    [("w8a8-int8", None, "shipyard-calibration.jsonl"), ("w4a16", None, "train.jsonl"), ("awq", None, "train.jsonl"),
     ("w8a8-int8", "intent", "train.jsonl"), ("w4a16", "both", "shipyard-calibration.jsonl")],
)  # fmt: skip
def test_each_scheme_calibrates_on_its_measured_default_unless_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str, calib: str | None, expected: str
) -> None:
    import shipyard.prepare.quantize as module

    monkeypatch.setenv("SHIPYARD_DATA_DIR", str(tmp_path))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128}))
    seen: list[Path | None] = []

    def fake(source: Path, staging: Path, name: str, **kwargs: object) -> dict[str, object]:
        seen.append(kwargs["calibration"])  # type: ignore[arg-type]
        (staging / "config.json").write_text("{}")
        return {"seconds": 1.0}

    monkeypatch.setattr(module, "quantize", fake)
    args = ["prepare", "quantize", "--model", str(model), "--scheme", scheme, "--out", str(tmp_path / "q")]
    result = runner.invoke(app, [*args, *(["--calib", calib] if calib else [])])
    assert result.exit_code == 0, result.output
    assert seen and seen[0] is not None and seen[0].name == expected
