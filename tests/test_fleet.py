"""A fleet: several models behind one gateway, each with its own state, rollouts and lease (issue 22).

Settings (``models:``), per-model state and rollouts in one gateway, ``shipyard serve --config`` starting a
fleet of fake engines as real processes, the state of a one-model shipyard carried over, and the Kubernetes
manifests written from the same settings.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from shipyard.control.store import MemoryStateStore
from shipyard.engine import free_port
from shipyard.gateway import ServedModel, create_app
from shipyard.router import Replica
from shipyard.settings import SettingsError, load_settings
from shipyard.testing import FakeOpenAI
from tests.helpers import ServerThread, ready, wait_for

KEY, ADMIN = "sk-u", "sk-a"
FAKE = [sys.executable, "-m", "shipyard.testing.fake_openai", "--token-rate", "500"]
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- 1. models in the settings ----------------------------------------------------------------------------


FLEET_YAML = """
engine: {max_model_len: 2048}
models:
  - name: assistant
    source: support-bot:merged
    replicas: 2
    gpus: auto
    engine: {profile: latency, max_model_len: 8192}
  - name: classifier
    source: /models/intent-w4a16
    gpus: [1]
  - name: embed
    source: dns+http://embed-pods:8000
intent: {model: classifier}
reply: {model: assistant}
"""


def test_models_are_read_with_their_own_engine_settings(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path / "f.yaml", FLEET_YAML))
    assistant, classifier, embed = settings.fleet()
    assert [m.name for m in settings.fleet()] == ["assistant", "classifier", "embed"]
    engine = settings.engine_for(assistant)
    assert (engine.profile, engine.max_model_len, engine.replicas) == ("latency", 8192, 2)
    assert settings.engine_for(classifier).max_model_len == 2048  # the top-level engine settings underneath
    assert classifier.gpus == [1] and embed.is_url and not classifier.is_url
    assert settings.intent.model == "classifier"
    one = load_settings(model="/m", served_model_name="m").fleet()  # the shorthand: a fleet of one
    assert [(m.name, m.source) for m in one] == [("m", "/m")]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("models: [{name: a}, {name: a}]", "the name 'a' is given twice"),
        ("models: [{name: a, gpu: 1}]", "models.0.gpu: Extra inputs are not permitted"),
        ("models: [{name: a, engine: {max_len: 5}}]", "max_len"),
        ("models: [{name: a}]\nintent: {model: b}", "intent.model 'b' is not served; models: a"),
        ("model: /m\nmodels: [{name: a}]", "give either model (one model) or models (a fleet), not both"),
        ("models: [{name: a, source: 'ftp://x'}]", None),
        ("models: [{name: a, source: 'dns+http://'}]", "dns+http://NAME:PORT"),
    ],
)
def test_a_bad_fleet_is_one_clear_error_at_start(tmp_path: Path, text: str, says: str | None) -> None:
    path = write(tmp_path / "f.yaml", text)
    if says is None:  # not a URL: a folder or registry name, checked when serve resolves it
        load_settings(path)
        return
    with pytest.raises(SettingsError, match=None) as caught:
        load_settings(path)
    assert says in str(caught.value)
    out = subprocess.run(
        [sys.executable, "-m", "shipyard.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SHIPYARD_DATA_DIR": str(tmp_path / "data")},
    )
    assert out.returncode != 0 and says in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


# --- 3. per-model state and rollouts in one gateway --------------------------------------------------------


@pytest.fixture
def two_models() -> Iterator[tuple[str, dict[str, object], list[str]]]:
    """A gateway over models "a" and "b" (one fake replica each, their own stores), and a second server of each
    model to roll out to."""
    servers = [ServerThread(FakeOpenAI(model)) for model in ("a", "b", "a", "b")]
    for server in servers:
        server.__enter__()
    try:
        settings = load_settings(api_keys=KEY, admin_keys=ADMIN, health_interval_s=0.1, drain_timeout_s=5)
        stores = {"a": MemoryStateStore(), "b": MemoryStateStore()}
        models = [
            ServedModel(
                name,
                [Replica(servers[i].url, name=f"blue-{name}1", deployment="blue", version="1")],
                store=stores[name],
            )
            for i, name in enumerate(("a", "b"))
        ]
        app = create_app(settings, [], models=models)
        with ServerThread(app) as gateway:
            assert wait_for(lambda: httpx.get(f"{gateway.url}/ready").status_code == 200, timeout=10)
            yield gateway.url, stores, [servers[2].url, servers[3].url]  # type: ignore[misc]
    finally:
        for server in servers:
            server.__exit__(None, None, None)


def admin(url: str, method: str, path: str, body: object = None) -> httpx.Response:
    return httpx.request(method, url + path, json=body, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)


def wait_done(url: str, model: str) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        current = admin(url, "GET", f"/admin/rollouts/current?model={model}").json()
        if current["phase"] in ("done", "failed"):
            return current  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"rollout of {model} still {current['phase']}")


def test_two_models_roll_out_at_once_each_in_its_own_state(
    two_models: tuple[str, dict[str, MemoryStateStore], list[str]],
) -> None:
    url, stores, targets = two_models
    listed = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [m["id"] for m in listed["data"]] == ["a", "b"]
    unnamed = admin(url, "POST", "/admin/rollouts", {"target": targets[0]})
    assert unnamed.status_code == 400 and "several models are served (a, b)" in unnamed.text
    unknown = admin(url, "POST", "/admin/rollouts", {"target": targets[0], "model": "c"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    first = admin(url, "POST", "/admin/rollouts", {"target": targets[0], "version": "2", "model": "a"})
    second = admin(url, "POST", "/admin/rollouts", {"target": targets[1], "version": "2", "model": "b"})
    assert (first.status_code, second.status_code) == (202, 202), second.text  # one lease per model
    assert wait_done(url, "a")["phase"] == "done" and wait_done(url, "b")["phase"] == "done"
    described = admin(url, "GET", "/admin/deployments").json()["models"]
    for model, target in zip(("a", "b"), targets, strict=True):
        (green,) = described[model]["deployments"]["green"]["replicas"]
        assert green["url"] == target and green["version"] == "2"
        state = asyncio.run(stores[model].load())
        assert state is not None and {r.url for r in state.replicas} == {target}  # nothing of the other model
        assert state.weights == {"green": 1.0}
    metrics = httpx.get(f"{url}/metrics").text
    assert 'shipyard_deployment_weight{deployment="green",model="a"} 1.0' in metrics
    assert 'shipyard_deployment_weight{deployment="green",model="b"} 1.0' in metrics
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for model in ("a", "b"):
        answer = httpx.post(
            f"{url}/v1/chat/completions", json={"model": model, **chat}, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert answer.status_code == 200 and answer.headers["x-shipyard-version"] == "2"


def test_a_canary_of_one_model_leaves_the_others_traffic_alone(
    two_models: tuple[str, dict[str, MemoryStateStore], list[str]],
) -> None:
    url, stores, targets = two_models
    body = {"target": targets[0], "version": "2", "model": "a", "canary_percent": 50}
    assert admin(url, "POST", "/admin/rollouts", body).status_code == 202
    deadline = time.monotonic() + 30
    while admin(url, "GET", "/admin/rollouts/current?model=a").json()["phase"] != "canary":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert admin(url, "GET", "/admin/rollouts/current?model=b").status_code == 404  # b has had no rollout
    b_state = asyncio.run(stores["b"].load())
    assert b_state is not None and b_state.weights == {"blue": 1.0}
    versions = set()
    for _ in range(20):
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        versions.add(answer.headers["x-shipyard-version"])
    assert versions == {"1"}
    assert admin(url, "POST", "/admin/rollouts/current/rollback?model=a").status_code == 200


# --- shipyard serve --config: a fleet of fake engines as real processes ------------------------------------


def model_folder(path: Path, architecture: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    return path


def serve_env(data_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "SHIPYARD_DATA_DIR": str(data_dir),
        "SHIPYARD_API_KEYS": KEY,
        "SHIPYARD_ADMIN_KEYS": ADMIN,
        "SHIPYARD_ENGINE__VLLM_COMMAND": json.dumps(FAKE),
        "SHIPYARD_ENGINE__PROFILE": "default",
        "SHIPYARD_HEALTH_INTERVAL_S": "0.2",
        "SHIPYARD_DRAIN_TIMEOUT_S": "5",
    }


def serve(tmp_path: Path, data_dir: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shipyard.cli", "serve", "--port", str(port), *args],
        env=serve_env(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen[str], data_dir: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    subprocess.run(
        [sys.executable, "-m", "shipyard.cli", "stop"], env=serve_env(data_dir), capture_output=True, timeout=60
    )


def replicas_of(url: str, model: str) -> list[dict[str, object]]:
    described = admin(url, "GET", f"/admin/deployments?model={model}").json()
    return [r for d in described["deployments"].values() for r in d["replicas"]]


def test_serve_a_fleet_updates_one_model_while_the_other_keeps_its_engine(tmp_path: Path) -> None:
    """The issue's "done when", with fake engines: two models, /predict on the intent model, embeddings, and
    `shipyard deploy --model assistant` with no failed request while embed's engine keeps its pid and version."""
    assistant = model_folder(tmp_path / "assistant-v1", "LlamaForCausalLM")
    embed = model_folder(tmp_path / "minilm", "BertModel")
    config = write(
        tmp_path / "fleet.yaml",
        yaml.safe_dump(
            {
                "models": [
                    {"name": "assistant", "source": str(assistant), "version": "a1"},
                    {"name": "embed", "source": str(embed)},
                ],
                "intent": {"model": "assistant"},
            }
        ),
    )
    data_dir = tmp_path / "data"
    proc, url = serve(tmp_path, data_dir, "--config", str(config), "--workers", "2")  # a worker follows each model
    user = {"Authorization": f"Bearer {KEY}"}
    try:
        assert wait_for(lambda: ready(url) and len(httpx.get(f"{url}/v1/models", headers=user).json()["data"]) == 2, 60)
        listed = httpx.get(f"{url}/v1/models", headers=user).json()
        assert sorted(m["id"] for m in listed["data"]) == ["assistant", "embed"]
        predicted = httpx.post(f"{url}/predict", json={"text": "I want my money back"}, headers=user, timeout=30)
        assert predicted.status_code == 200 and predicted.json()["intent"], predicted.text
        vectors = httpx.post(f"{url}/v1/embeddings", json={"model": "embed", "input": ["a", "b"]}, headers=user)
        assert vectors.status_code == 200 and [len(d["embedding"]) for d in vectors.json()["data"]] == [8, 8]
        (embed_before,) = replicas_of(url, "embed")
        assert (data_dir / "state/models/assistant/state.json").is_file()
        assert (data_dir / "state/models/embed/state.json").is_file()

        failures: list[str] = []
        done = threading.Event()

        def load() -> None:
            with httpx.Client(headers=user, timeout=30) as client:
                while not done.is_set():
                    for body, route in (
                        (
                            {"model": "assistant", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                            "chat/completions",
                        ),
                        ({"model": "embed", "input": "hello"}, "embeddings"),
                    ):
                        answer = client.post(f"{url}/v1/{route}", json=body)
                        if answer.status_code != 200:
                            failures.append(f"{route}: {answer.status_code} {answer.text[:200]}")

        loaders = [threading.Thread(target=load) for _ in range(3)]
        for thread in loaders:
            thread.start()
        v2 = model_folder(tmp_path / "assistant-v2", "LlamaForCausalLM")
        deployed = subprocess.run(
            [sys.executable, "-m", "shipyard.cli", "deploy", str(v2), "--model", "assistant", "--version", "a2",
             "--strategy", "blue-green", "--gateway", url, "--admin-key", ADMIN],
            capture_output=True, text=True, timeout=120, env=serve_env(data_dir),
        )  # fmt: skip
        done.set()
        for thread in loaders:
            thread.join(timeout=30)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert "[done]" in deployed.stdout and failures == [], failures[:5]
        (embed_after,) = replicas_of(url, "embed")
        assert (embed_after["pid"], embed_after["version"]) == (embed_before["pid"], embed_before["version"])
        assert {r["version"] for r in replicas_of(url, "assistant")} == {"a2"}
        for _ in range(6):  # new connections: both processes answer, each routes assistant to a2
            answer = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "assistant", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
                headers=user,
            )
            assert answer.headers["x-shipyard-version"] == "a2"
        status = subprocess.run(
            [sys.executable, "-m", "shipyard.cli", "rollout", "status", "--gateway", url, "--admin-key", ADMIN],
            capture_output=True, text=True, timeout=60, env=serve_env(data_dir),
        )  # fmt: skip
        assert "model assistant:" in status.stdout and "model embed:" in status.stdout, status.stdout
        audit = [json.loads(line) for line in (data_dir / "audit.jsonl").read_text().splitlines()]
        assert {e.get("model") for e in audit if e["action"] == "rollout_requested"} == {"assistant"}
    finally:
        stop(proc, data_dir)


def test_the_state_of_a_one_model_shipyard_is_carried_over_to_the_fleet(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "v1", "LlamaForCausalLM")
    data_dir = tmp_path / "data"
    first, url = serve(tmp_path, data_dir, "--model", str(folder))
    try:
        assert wait_for(lambda: ready(url), timeout=60)
        (before,) = replicas_of(url, "v1")
        first.send_signal(signal.SIGKILL)  # a crash: the engine stays up
        first.wait(timeout=10)
        config = write(tmp_path / "fleet.yaml", yaml.safe_dump({"models": [{"name": "v1", "source": str(folder)}]}))
        second, url = serve(tmp_path, data_dir, "--config", str(config))
        try:
            assert wait_for(lambda: ready(url), timeout=60)
            (after,) = replicas_of(url, "v1")
            assert after["pid"] == before["pid"] and psutil.pid_exists(int(after["pid"]))  # type: ignore[call-overload]
            assert (data_dir / "state/models/v1/state.json").is_file()
        finally:
            stop(second, data_dir)
        assert "carried the state of v1" in (second.stdout.read() if second.stdout else "")
    finally:
        stop(first, data_dir)


# --- 5. Kubernetes from the same settings -------------------------------------------------------------------


def test_k8s_manifests_of_the_default_fleet_are_deploy_k8s(tmp_path: Path) -> None:
    from shipyard.ops.k8s import write_manifests

    written = write_manifests(load_settings(DEPLOY / "k8s/fleet.yaml"), tmp_path)
    for path in written:
        assert path.read_text() == (DEPLOY / "k8s" / path.name).read_text(), path.name


def test_k8s_manifests_of_a_fleet_validate_and_give_each_model_its_engines(tmp_path: Path) -> None:
    import kubernetes_validate

    from shipyard.control.store import open_store
    from shipyard.upstreams import parse_target

    config = write(
        tmp_path / "fleet.yaml",
        yaml.safe_dump(
            {
                "models": [
                    {"name": "assistant", "engine": {"tensor_parallel_size": 2, "max_model_len": 8192}},
                    {
                        "name": "classifier",
                        "replicas": 2,
                        "engine": {"quantization": "gptq"},
                        "autoscale": {"min_replicas": 1, "max_replicas": 3, "ttft_p90_ms": 800},
                    },
                    {"name": "embed"},
                ],
                "intent": {"model": "classifier"},
            }
        ),
    )
    out = tmp_path / "k8s"
    result = subprocess.run(
        [sys.executable, "-m", "shipyard.cli", "deploy", "k8s-manifests", "--config", str(config), "-o", str(out)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "SHIPYARD_DATA_DIR": str(tmp_path / "d")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    docs = [d for name in kustomization["resources"] for d in yaml.safe_load_all((out / name).read_text()) if d]
    for doc in docs:
        if doc["kind"] != "ScaledObject":  # KEDA's CRD: not in Kubernetes' own schemas
            kubernetes_validate.validate(doc, "1.31.0", strict=True)
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    assert set(scaled) == {"shipyard-engine-classifier-blue", "shipyard-engine-classifier-green"}  # autoscale only
    for name, obj in scaled.items():
        assert name in deployments and obj["spec"]["maxReplicaCount"] == 3
        (trigger,) = obj["spec"]["triggers"]
        color = name.rsplit("-", 1)[1]
        query = f'max(shipyard_autoscale_desired_replicas{{model="classifier",deployment="{color}"}})'
        assert trigger["type"] == "prometheus" and trigger["metadata"]["query"] == query
    gpus = {
        name: d["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"].get("nvidia.com/gpu")
        for name, d in deployments.items()
        if "engine" in name
    }
    assert gpus == {
        f"shipyard-engine-{m}-{c}": n
        for m, n in (("assistant", 2), ("classifier", 1), ("embed", 1))
        for c in ("blue", "green")
    }
    assert deployments["shipyard-engine-classifier-blue"]["spec"]["replicas"] == 2
    assert deployments["shipyard-engine-classifier-green"]["spec"]["replicas"] == 0
    args = deployments["shipyard-engine-assistant-blue"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--tensor-parallel-size=2" in args and "--served-model-name=assistant" in args
    selectors = {
        d["spec"]["selector"]["matchLabels"].get("shipyard/model") for n, d in deployments.items() if "engine" in n
    }
    assert selectors == {"assistant", "classifier", "embed"}  # no engine's pods are another model's
    (fleet_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    fleet = load_settings(write(tmp_path / "mounted.yaml", fleet_map["data"]["shipyard.yaml"]))
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for model in fleet.models:
        assert model.source is not None
        target = parse_target(model.source)  # each model's gateway source is a headless Service of the manifests
        assert services[target.host]["spec"]["clusterIP"] == "None"
        assert services[target.host]["spec"]["selector"]["shipyard/model"] == model.name
    assert fleet.intent.model == "classifier"
    autoscale = next(m.autoscale for m in fleet.models if m.name == "classifier")
    assert autoscale is not None and (autoscale.max_replicas, autoscale.ttft_p90_ms) == (3, 800)  # the gateway decides
    gateway = deployments["shipyard-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "SHIPYARD_CONFIG", "value": "/etc/shipyard/shipyard.yaml"} in gateway["env"]
    assert "shipyard:model:embed" in open_store("redis://x:6379/0", tmp_path, model="embed").description


def test_model_cards_say_which_models_embed_and_the_chat_page_lists_only_the_others() -> None:
    from shipyard.ui.client import GatewayClient

    with ServerThread(FakeOpenAI("chat")) as chat, ServerThread(FakeOpenAI("embed")) as embed:
        models = [
            ServedModel("chat", [Replica(chat.url, name="blue-chat1")]),
            ServedModel("embed", [Replica(embed.url, name="blue-embed1")], kind="embed"),
        ]
        app = create_app(load_settings(api_keys=KEY, health_interval_s=0.1), [], models=models)
        with ServerThread(app) as gateway:
            assert wait_for(lambda: httpx.get(f"{gateway.url}/ready").status_code == 200, timeout=10)
            cards = httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
            assert {m["id"]: m["kind"] for m in cards["data"]} == {"chat": "generate", "embed": "embed"}
            assert GatewayClient(gateway.url, KEY).models() == ["chat"]  # chatting with "embed" would be a 400


# The fields KubeRay's RayCluster (ray.io/v1) documents, by level (its API reference and CRD,
# ray-operator/config/crd/bases/ray.io_rayclusters.yaml): a field the operator does not know is dropped or refused.
RAYCLUSTER_SPEC = {
    "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
    "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions",
}  # fmt: skip
RAYCLUSTER_HEAD = {"rayStartParams", "serviceType", "template", "enableIngress", "headService"}
RAYCLUSTER_WORKER = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "numOfHosts",
    "scaleStrategy", "idleTimeoutSeconds", "suspend",
}  # fmt: skip
AUTOSCALER_OPTIONS = {"upscalingMode", "idleTimeoutSeconds", "image", "imagePullPolicy", "resources", "env"}


def test_k8s_manifests_on_a_ray_cluster_are_a_kuberay_raycluster_and_gateways_that_place_on_it(
    tmp_path: Path,
) -> None:
    """Issue 36 item 7: `shipyard deploy k8s-manifests --cluster ray` writes a RayCluster (a head that runs no
    engine, a GPU worker group sized by the fleet, KubeRay's autoscaler when a model autoscales, Ray's token on
    every pod) and gateways whose fleet places its engines on it; core kinds validated as the other manifests,
    the RayCluster against KubeRay's documented fields and its pod templates as Pods."""
    import kubernetes_validate

    config = write(
        tmp_path / "fleet.yaml",
        yaml.safe_dump(
            {
                "models": [
                    {"name": "assistant", "replicas": 2},
                    {"name": "classifier", "autoscale": {"min_replicas": 1, "max_replicas": 4}},
                ]
            }
        ),
    )
    out = tmp_path / "k8s"
    result = subprocess.run(
        [sys.executable, "-m", "shipyard.cli", "deploy", "k8s-manifests", "--cluster", "ray", "--config", str(config),
         "-o", str(out)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "SHIPYARD_DATA_DIR": str(tmp_path / "d")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    docs = [d for name in kustomization["resources"] for d in yaml.safe_load_all((out / name).read_text()) if d]
    assert not [d for d in docs if d["kind"] == "Deployment" and "engine" in d["metadata"]["name"]]
    (ray,) = [d for d in docs if d["kind"] == "RayCluster"]
    for doc in docs:
        if doc["kind"] != "RayCluster":
            kubernetes_validate.validate(doc, "1.31.0", strict=True)
    spec = ray["spec"]
    assert ray["apiVersion"] == "ray.io/v1" and set(spec) <= RAYCLUSTER_SPEC
    assert set(spec["headGroupSpec"]) <= RAYCLUSTER_HEAD and set(spec["autoscalerOptions"]) <= AUTOSCALER_OPTIONS
    (workers,) = spec["workerGroupSpecs"]
    assert set(workers) <= RAYCLUSTER_WORKER
    assert spec["rayVersion"] == "2.60.0" and spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no engine on the head
    assert all(isinstance(v, str) for g in (spec["headGroupSpec"], workers) for v in g["rayStartParams"].values())
    assert (workers["replicas"], workers["minReplicas"], workers["maxReplicas"]) == (3, 3, 6)
    for name, template in (("head", spec["headGroupSpec"]["template"]), ("worker", workers["template"])):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"ray-{name}"}, "spec": template["spec"]}
        kubernetes_validate.validate(pod, "1.31.0", strict=True)
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    (gateway,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "shipyard-gateway"]
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    assert "--no-engine" not in container["args"] and "RAY_AUTH_TOKEN" in {e["name"] for e in container["env"]}
    (fleet_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "shipyard-fleet"]
    fleet = load_settings(write(tmp_path / "served.yaml", fleet_map["data"]["shipyard.yaml"]))
    assert fleet.cluster is not None and fleet.cluster.address == "shipyard-ray-head-svc.shipyard.svc:6379"
    assert [m.source for m in fleet.models] == ["/models/assistant", "/models/classifier"]
    refused = subprocess.run(
        [sys.executable, "-m", "shipyard.cli", "deploy", "k8s-manifests", "--cluster", "slurm", "-o", str(out)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "SHIPYARD_DATA_DIR": str(tmp_path / "d")},
    )  # fmt: skip
    assert refused.returncode != 0 and "unknown cluster backend 'slurm'" in refused.stderr


def test_the_cluster_fit_check_packs_tensor_parallel_groups_on_one_host_and_names_the_shortfall() -> None:
    """Issue 36 item 2: a fleet the Ray cluster cannot place is refused before anything starts; a
    tensor-parallel group needs its GPUs on one node, so free GPUs spread over nodes do not count for it."""
    from shipyard.cluster.ray_backend import check_fleet_fits
    from shipyard.engine import EngineStartError

    nodes = [{"host": "10.0.0.1", "free": {"GPU": 3.0}}, {"host": "10.0.0.2", "free": {"GPU": 3.0}}]
    check_fleet_fits([("chat", 2, 2.0, "GPU"), ("intent", 2, 1.0, "GPU")], nodes)  # 2+1 on each host
    with pytest.raises(EngineStartError) as refused:
        check_fleet_fits([("big", 1, 4.0, "GPU")], nodes)  # 6 GPUs free, but no host has 4
    assert "big needs 4 GPU on one host" in str(refused.value) and "10.0.0.1 3, 10.0.0.2 3" in str(refused.value)
    with pytest.raises(EngineStartError, match=r"intent needs 1 GPU .* the fleet needs 1 GPU more"):
        check_fleet_fits([("chat", 2, 2.0, "GPU"), ("intent", 3, 1.0, "GPU")], nodes)
