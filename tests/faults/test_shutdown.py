"""SIGTERM to `shipyard serve` (a real process) while streams are in flight.

Promise: streams in flight finish within the configured grace (``shutdown_grace_s``, one setting: 120 s by
default, with deploy/compose.yaml's and deploy/k8s's stop grace periods above it); a stream longer than the
grace is cut at the grace, and the process exits.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

from shipyard.engine import free_port
from shipyard.settings import Settings
from tests.faults.report import record
from tests.helpers import healthy, wait_for

KEY = "sk-shutdown"


def _serve(tmp_path: Path, upstream: str, grace_s: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    shipyard = shutil.which("shipyard", path=str(Path(sys.executable).parent)) or "shipyard"
    env = {
        **os.environ,
        "SHIPYARD_API_KEYS": KEY,
        "SHIPYARD_SHUTDOWN_GRACE_S": str(grace_s),
        "SHIPYARD_DATA_DIR": str(tmp_path / "data"),
    }
    command = [shipyard, "serve", "--no-engine", "--upstream", upstream, "--port", str(port)]
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: _ready(url), timeout=60), (tmp_path / "serve.log").read_text()[-2000:]
    return proc, url


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _stream(url: str, tokens: int, outcome: list[str]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": tokens}
    chunks = 0
    try:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        ) as answer:
            for line in answer.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks += 1
                if line == "data: [DONE]":
                    outcome.append(f"finished {chunks}")
                    return
        outcome.append(f"cut {chunks}")
    except httpx.HTTPError as exc:
        outcome.append(f"cut {chunks} ({type(exc).__name__})")


def _fake_engine(tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "shipyard.testing.fake_openai", "--port", str(port), "--model", "m"]
    proc = subprocess.Popen([*command, "--token-rate", "10"], start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: healthy(url), timeout=20)
    return proc, url


def test_sigterm_lets_streams_in_flight_finish_within_the_grace(tmp_path: Path) -> None:
    engine, upstream = _fake_engine(tmp_path)
    try:
        gateway, url = _serve(tmp_path, upstream, grace_s=8.0)
        outcomes: list[str] = []
        short = threading.Thread(target=_stream, args=(url, 30, outcomes))  # 3 s at 10 tokens/s: within grace
        short.start()
        time.sleep(0.8)  # under way
        terminated = time.monotonic()
        gateway.send_signal(signal.SIGTERM)
        short.join(timeout=30)
        gateway.wait(timeout=30)
        exited = time.monotonic() - terminated
        assert outcomes and outcomes[0].startswith("finished"), outcomes
        assert exited < 8.0 + 5.0
        record(
            "SIGTERM with a 3 s stream in flight (grace 8 s here; 120 s by default)",
            "streams in flight finish within the grace, then the process exits",
            stream=outcomes[0],
            exited_after_s=round(exited, 2),
        )

        gateway, url = _serve(tmp_path, upstream, grace_s=2.0)
        outcomes = []
        long = threading.Thread(target=_stream, args=(url, 300, outcomes))  # 30 s: longer than the grace
        long.start()
        time.sleep(0.8)
        terminated = time.monotonic()
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=30)
        exited = time.monotonic() - terminated
        long.join(timeout=30)
        assert outcomes and outcomes[0].startswith("cut"), outcomes
        assert 2.0 <= exited < 2.0 + 5.0, exited
    finally:
        engine.kill()
        engine.wait(timeout=10)


def test_the_grace_is_one_number_in_the_settings_compose_and_kubernetes(repo_root: Path) -> None:
    grace = Settings.model_fields["shutdown_grace_s"].default
    compose = yaml.safe_load((repo_root / "deploy/compose.yaml").read_text())
    stop = compose["services"]["gateway"]["stop_grace_period"]
    assert stop.endswith("s") and int(stop[:-1]) > grace, "compose stops the gateway before its streams end"
    gateway = next(yaml.safe_load_all((repo_root / "deploy/k8s/gateway.yaml").read_text()))
    pod = gateway["spec"]["template"]["spec"]
    pre_stop = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace, "Kubernetes kills the gateway mid-stream"
    assert f"{int(grace)} s" in (repo_root / "docs/guides/operate.md").read_text()  # what the operator reads
