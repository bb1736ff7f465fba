"""The fleet on a real Ray cluster of two hosts (network namespaces on a bridge), issue 36. Engines are the fake
OpenAI server as real processes on the nodes (speed); the gateway runs on this machine as a Ray driver.

Promises checked: a fleet of two models is placed with each model's replicas spread over the hosts and `/ready`
names each one's host; a fleet the cluster cannot hold is refused before anything starts, naming the model and
the hosts' room; an in-place update of one model reloads its engines on both hosts under load, 0 requests failed;
when every process of one host is SIGKILLed under load, its replicas are out of rotation within 5 s, their
requests fail over, and they serve again from the other host (Ray restarts the actors there) with the new
addresses recorded in the state and the updated model's weights, not the ones Ray first started it with; once the
host is back in the cluster, a blue-green update under load places the new version there, 0 requests failed."""

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
from tests.test_control import checkpoint_folder

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
        yield RayCluster(hosts, gpus_per_host=4).start()  # the fleet's 4 replicas fit on one host after a loss
    finally:
        hosts.down()


def fake_model(tmp_path: Path, name: str, replicas: int = 2) -> dict[str, Any]:
    folder = checkpoint_folder(tmp_path, f"{name}-v1")  # weights an in-place update can replace
    return {"name": name, "source": folder, "version": "v1", "replicas": replicas, "engine": {"vllm_command": FAKE}}


def serve(
    tmp_path: Path, cluster: RayCluster, models: list[dict[str, Any]] | None = None, ready_s: float = 180
) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    config = {
        "cluster": {"backend": "ray", "address": cluster.address},
        "models": models or [fake_model(tmp_path, "m")],
    }
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


def recorded(url: str, model: str, name: str) -> dict[str, Any]:
    """The replica as ``/admin/deployments?model=`` describes it (its url and host from the state)."""
    headers = {"Authorization": f"Bearer {ADMIN}"}
    state = httpx.get(f"{url}/admin/deployments", params={"model": model}, headers=headers, timeout=10).json()
    return next(r for d in state["deployments"].values() for r in d["replicas"] if r["name"] == name)  # type: ignore[no-any-return]


def weights(engine_url: str) -> str:
    """The folder a fake engine's weights came from (its start's ``--model``, or its last in-place reload)."""
    return str(httpx.get(f"{engine_url}/fake/weights", timeout=10).json()["weights"])


def roll_out(url: str, body: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    started = httpx.post(f"{url}/admin/rollouts", json=body, headers=admin, timeout=30)
    assert started.status_code == 202, started.text
    deadline = time.monotonic() + timeout_s
    params = {"model": body["model"]}
    while True:
        rollout = httpx.get(f"{url}/admin/rollouts/current", params=params, headers=admin, timeout=10).json()
        if rollout["phase"] in ("done", "failed", "rolled_back") or time.monotonic() > deadline:
            return rollout  # type: ignore[no-any-return]
        time.sleep(0.2)


@contextlib.contextmanager
def clients(url: str, count: int = 4, models: tuple[str, ...] = ("m",)) -> Iterator[list[tuple[float, int]]]:
    """``count`` clients sending one chat after the other until the block ends, client i to ``models[i % len]``;
    yields (time, status) of each."""
    results: list[tuple[float, int]] = []
    halt = threading.Event()
    turn = iter(range(count))

    def client() -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        model = models[next(turn) % len(models)]
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
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


def test_a_fleet_of_two_models_spreads_is_updated_in_place_across_hosts_and_survives_a_lost_host(
    tmp_path: Path, cluster: RayCluster
) -> None:
    process, url, env = serve(tmp_path, cluster, [fake_model(tmp_path, "m"), fake_model(tmp_path, "n")])
    both = ("m", "n")
    try:
        placed = replicas(url)
        for model in both:  # each model's replicas on both hosts: a lost host takes a share of each
            hosts = sorted(r["host"] for r in placed if r["model"] == model)
            assert hosts == sorted(cluster.hosts.addresses), placed
        assert all(r["ready"] for r in placed)

        # in place across hosts: each engine of m reloads a folder valid on its node (shared storage)
        v2 = Path(checkpoint_folder(tmp_path, "m-v2"))
        with clients(url, models=both) as results:
            time.sleep(1)
            rollout = roll_out(url, {"model": "m", "target": str(v2), "version": "v2", "strategy": "inplace"})
            time.sleep(1)
        assert rollout["phase"] == "done", rollout
        assert [status for _, status in results if status != 200] == [] and len(results) > 20
        m_replicas = [r for r in replicas(url) if r["model"] == "m"]
        assert {r["version"] for r in m_replicas} == {"v2"} and len({r["host"] for r in m_replicas}) == 2
        for r in m_replicas:
            assert weights(recorded(url, "m", r["name"])["url"]) == str(v2)

        lost_host = 1
        lost = [r for r in replicas(url) if r["host"] == cluster.hosts.addresses[lost_host]]
        assert sorted(r["model"] for r in lost) == ["m", "n"], lost
        lost_urls = {(r["model"], r["name"]): recorded(url, r["model"], r["name"])["url"] for r in lost}
        assert all(u.startswith(f"http://{cluster.hosts.addresses[lost_host]}:") for u in lost_urls.values())

        with clients(url, models=both) as results:
            time.sleep(2)
            killed_at = time.monotonic()
            assert cluster.hosts.kill(lost_host) > 0  # the raylet, the actors and their engines: the host is lost
            out_at: dict[str, float] = {}
            back_at: dict[str, float] = {}
            while time.monotonic() - killed_at < 90 and len(back_at) < len(lost):
                now = {(r["model"], r["name"]): r for r in replicas(url)}
                for key in lost_urls:
                    mine = now[key]
                    if key[0] not in out_at and not mine["ready"]:
                        out_at[key[0]] = time.monotonic() - killed_at
                    if mine["ready"] and mine["host"] == cluster.hosts.addresses[0]:
                        back_at.setdefault(key[0], time.monotonic() - killed_at)
                time.sleep(0.1)
            time.sleep(2)
        assert set(out_at) == set(both) and max(out_at.values()) <= 5.0, out_at
        assert set(back_at) == set(both), replicas(url)  # served again, from host 0
        failed = [status for at, status in results if status != 200]
        assert len(results) > 50 and len(failed) <= 8, (len(results), failed)  # at most those in flight there
        for (model, name), old_url in lost_urls.items():
            moved = recorded(url, model, name)
            assert moved["host"] == cluster.hosts.addresses[0] and moved["url"] != old_url
            if model == "m":  # Ray restarted the actor with its first arguments: it must still serve v2
                assert weights(moved["url"]) == str(v2), moved
        print(f"out of rotation after {out_at} s, serving again after {back_at} s")

        cluster.join(lost_host)  # the host is back: the update's new version finds room there
        n2 = tmp_path / "n-v2"
        n2.mkdir()
        (n2 / "config.json").write_text("{}")
        with clients(url, models=both) as results:
            rollout = roll_out(url, {"model": "n", "target": str(n2), "version": "v2", "strategy": "blue-green"})
            time.sleep(1)
        assert rollout["phase"] == "done", rollout
        assert [status for _, status in results if status != 200] == [] and len(results) > 20
        green = [r for r in replicas(url) if r["model"] == "n" and r["deployment"] != "blue"]
        assert {r["host"] for r in green} == {cluster.hosts.addresses[lost_host]}, replicas(url)
    finally:
        stop(process, env)


def test_a_fleet_the_cluster_cannot_hold_is_refused_before_anything_starts(tmp_path: Path, cluster: RayCluster) -> None:
    big = fake_model(tmp_path, "big", replicas=5)
    big["engine"]["tensor_parallel_size"] = 2  # 5 groups of 2 GPUs on one host each: 2 hosts x 4 GPUs hold 4
    with pytest.raises(RuntimeError, match="exited"):
        serve(tmp_path, cluster, [big], ready_s=60)
    message = (tmp_path / "serve.log").read_text()
    assert "cannot place the fleet" in message and "big" in message and "2 GPU" in message, message
    for host in cluster.hosts.addresses:
        assert host in message, message
    assert (
        subprocess.run(  # nothing was started on the cluster
            [
                sys.executable,
                "-c",
                "import ray; ray.init(address='auto', namespace='shipyard', logging_level=40); "
                "print(len(ray.util.list_named_actors()))",
            ],
            env={**os.environ, **cluster.auth(), "RAY_ADDRESS": cluster.address},
            capture_output=True,
            text=True,
            timeout=120,
        )
        .stdout.strip()
        .endswith("0")
    )


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
        engine_url = recorded(url, replica["model"], replica["name"])["url"]
        assert httpx.get(f"{engine_url}/v1/models", timeout=10).status_code == 401  # keyed, on the network
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        answer = client.chat.completions.create(
            model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8
        )
        assert answer.choices[0].message.content
    finally:
        stop(process, env)
