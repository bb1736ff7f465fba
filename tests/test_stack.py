"""`shipyard serve` as a process with a fake engine: orphans found by `shipyard stop`, a state it cannot read, one
gateway per file state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil

from shipyard.engine import free_port
from tests.helpers import wait_for

FAKE = [sys.executable, "-m", "shipyard.testing.fake_openai", "--token-rate", "500"]


def serve_env(data_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "SHIPYARD_DATA_DIR": str(data_dir),
        "SHIPYARD_API_KEYS": "sk-u",
        "SHIPYARD_ADMIN_KEYS": "sk-a",
        "SHIPYARD_ENGINE__VLLM_COMMAND": json.dumps(FAKE),
        "SHIPYARD_ENGINE__PROFILE": "default",
        "SHIPYARD_HEALTH_INTERVAL_S": "0.2",
    }


def start_serve(tmp_path: Path, data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    model = tmp_path / "v1"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shipyard.cli", "serve", "--model", str(model), "--port", str(port)],
        env=serve_env(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def shipyard(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shipyard.cli", *args],
        env=serve_env(data_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_stop_finds_the_engine_of_a_crashed_gateway_and_a_second_gateway_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    gateway, url = start_serve(tmp_path, data_dir)
    try:
        assert wait_for(lambda: ready(url), timeout=60), gateway.stdout
        described = httpx.get(f"{url}/admin/deployments", headers={"Authorization": "Bearer sk-a"}).json()
        (record,) = described["deployments"]["blue"]["replicas"]
        assert described["state"]["store"].startswith("file ")

        second, _ = start_serve(tmp_path, data_dir)  # same data_dir: the file state serves one gateway
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 1 and f"another gateway (pid {gateway.pid})" in out, out

        gateway.send_signal(signal.SIGKILL)
        gateway.wait(timeout=10)
        assert psutil.pid_exists(record["pid"])  # a crash stops nothing
        stopped = shipyard(data_dir, "stop")
        assert stopped.returncode == 0 and "stopped 1 process(es)" in stopped.stdout, stopped.stdout + stopped.stderr
        assert wait_for(lambda: not psutil.pid_exists(record["pid"]), timeout=10)
        assert "nothing of shipyard runs" in shipyard(data_dir, "stop").stdout
    finally:
        if gateway.poll() is None:
            gateway.kill()
        shipyard(data_dir, "stop")


def test_a_state_that_cannot_be_read_stops_serve_with_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    state = data_dir / "state"
    state.mkdir(parents=True)
    (state / "state.json").write_text("{ not json")
    (state / "state.json.1").write_text(json.dumps({"schema": 1, "revision": 4}))
    proc, _ = start_serve(tmp_path, data_dir)
    out, _ = proc.communicate(timeout=60)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(errors) == 1, out
    assert str(state / "state.json") in errors[0] and "state.json.1 (revision 4)" in errors[0]
    assert not (data_dir / "logs").exists()  # refused before any engine was started
