"""Model preparation for real on the default model: finetune -> merge (quantizing, registering and serving each
scheme's version is `test_quantize_search.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shipyard.cli import app

pytestmark = pytest.mark.integration


def test_finetune_then_merge_the_default_model(default_model_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    adapter = tmp_path / "adapter"
    args = ["prepare", "finetune", "--base", str(default_model_dir), "--out", str(adapter)]
    result = runner.invoke(app, [*args, "--max-steps", "3", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads((adapter / "training_report.json").read_text())
    assert report["steps"] == 3 and len(report["losses"]) == 3 and report["examples"] == 384
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert json.loads((adapter / "manifest.json").read_text())["scheme"] == "lora-adapter"
    merged = tmp_path / "merged"
    merge = ["prepare", "merge", "--base", str(default_model_dir), "--adapter", str(adapter), "--out", str(merged)]
    assert runner.invoke(app, merge).exit_code == 0
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    again = runner.invoke(app, [*args, "--max-steps", "1"])
    assert again.exit_code == 1 and "already exists" in again.stderr
