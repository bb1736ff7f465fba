"""`shipyard serve` as a process with a fake engine: orphans found by `shipyard stop`, a state it cannot read, one
gateway per file state, several engines for one model (``--replicas``)."""

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
from shipyard.settings import Settings
from shipyard.stack import engine_spec
from tests.helpers import ready, wait_for

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


def start_serve(tmp_path: Path, data_dir: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    model = tmp_path / "v1"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shipyard.cli", "serve", "--model", str(model), "--port", str(port), *args],
        env=serve_env(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, f"http://127.0.0.1:{port}"


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


def test_replicas_start_one_engine_each_share_the_memory_and_stand_in_for_each_other(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    gateway, url = start_serve(tmp_path, data_dir, "--replicas", "2")
    admin = {"Authorization": "Bearer sk-a"}
    body = {"model": "v1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    def replicas() -> list[dict[str, object]]:
        described = httpx.get(f"{url}/admin/deployments", headers=admin, timeout=5).json()
        return list(described["deployments"]["blue"]["replicas"])

    try:
        assert wait_for(lambda: ready(url), timeout=60), gateway.stdout
        first, second = replicas()
        assert (first["name"], second["name"]) == ("blue-v1", "blue-v1-2")
        assert first["pid"] != second["pid"] and first["url"] != second["url"]
        for record in (first, second):
            command = psutil.Process(int(record["pid"])).cmdline()  # type: ignore[call-overload]
            assert command[command.index("--gpu-memory-utilization") + 1] == "0.45"
            assert httpx.get(f"{record['url']}/health", timeout=5).status_code == 200
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        assert 'shipyard_deployment_replicas{deployment="blue",model="v1",state="ready",version="v1"} 2.0' in metrics

        os.kill(int(second["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer sk-u"}, timeout=10) as client:
            codes = [client.post("/v1/chat/completions", json=body).status_code for _ in range(20)]
        assert codes == [200] * 20  # the other replica answers while the dead one is started again
        assert wait_for(lambda: {r["pid"] for r in replicas()} - {first["pid"], second["pid"]}, timeout=30)
        assert wait_for(lambda: ready(url), timeout=30)

        v2 = tmp_path / "v2"
        v2.mkdir()
        (v2 / "config.json").write_text("{}")
        rollout = {"target": str(v2), "version": "v2", "strategy": "blue-green"}
        accepted = httpx.post(f"{url}/admin/rollouts", json=rollout, headers=admin, timeout=30)
        assert accepted.status_code == 202 and "the place of the 2 engines of blue" in accepted.text, accepted.text
        assert wait_for(
            lambda: httpx.get(f"{url}/admin/rollouts/current", headers=admin, timeout=5).json()["phase"] == "done",
            timeout=90,
        )

        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=60)
        assert "nothing of shipyard runs" in shipyard(data_dir, "stop").stdout  # both engines went with it
    finally:
        if gateway.poll() is None:
            gateway.kill()
        shipyard(data_dir, "stop")


def test_replicas_divide_the_memory_unless_it_is_set() -> None:
    def share(profile: str, **engine: object) -> float | None:
        settings = Settings(engine=engine)  # type: ignore[arg-type]
        return engine_spec(settings, "/m", "m", profile, False).gpu_memory_utilization

    assert share("default") is None  # one engine: vLLM's own default
    assert share("default", replicas=2) == 0.45
    assert share("default", replicas=3) == 0.3
    assert share("cpu", replicas=2) == 0.3  # the profile's smaller share stays
    assert share("default", replicas=2, gpu_memory_utilization=0.3) == 0.3  # what the operator set


def test_a_restart_with_another_model_says_that_the_state_is_served_not_the_model(tmp_path: Path) -> None:
    """The promise: a restarted `serve` serves what its deployment state names (the last rollout's result), and
    when `--model` names something else it says so in one line instead of silently serving another model."""
    data_dir = tmp_path / "data"
    first, url = start_serve(tmp_path, data_dir)
    try:
        assert wait_for(lambda: ready(url), timeout=60), first.stdout
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C: the gateway and its engine stop, the state stays
        first.wait(timeout=60)
    other = tmp_path / "v2"
    other.mkdir()
    (other / "config.json").write_text("{}")
    port = free_port()
    second = subprocess.Popen(
        [sys.executable, "-m", "shipyard.cli", "serve", "--model", str(other), "--port", str(port)],
        env=serve_env(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert wait_for(lambda: ready(f"http://127.0.0.1:{port}"), timeout=60)
        described = httpx.get(
            f"http://127.0.0.1:{port}/admin/deployments", headers={"Authorization": "Bearer sk-a"}
        ).json()
        (record,) = described["deployments"]["blue"]["replicas"]
        assert record["version"] == "v1"  # the state's model, as documented
    finally:
        second.send_signal(signal.SIGINT)
        out, _ = second.communicate(timeout=60)
        shipyard(data_dir, "stop")
    notes = [line for line in out.splitlines() if line.startswith("note: that state serves")]
    assert len(notes) == 1 and str(tmp_path / "v1") in notes[0] and str(other) in notes[0], out
