"""The images built and run (issue 27), with podman here (docker where a daemon exists): `scripts/images` builds
the CPU image and Prometheus' on a local debian:bookworm-slim; a container of the CPU image answers the openai
SDK through a published port; `deploy/compose.yaml` comes up with podman-compose and Prometheus returns data for
the dashboard's queries after a little load. Grafana's image is not reachable here: its queries are what is
proven (each evaluated by Prometheus' own API)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from shipyard.engine import free_port
from tests.helpers import ready, wait_for
from tests.services import tool

pytestmark = pytest.mark.images
KEY, ADMIN = "sk-image-user", "sk-image-admin"
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
LIMITS = ["--ulimit", "nproc=32768:32768", "--ulimit", "nofile=16384:16384", "--shm-size", "1g"]
"""Within what this machine lets a container set (its conmon runs with 32,768 processes, 20,000 files), and the
shared memory vLLM's engine core needs (160 MiB; containers get 64 MiB by default)."""
NEEDS_FAULT = {
    "shipyard_upstream_errors_total",
    "shipyard_retries_total",
    "shipyard_autoscale_signal",
    "shipyard_admission_queued_total",
    "shipyard_admission_shed_total",
    "shipyard_admission_queue_wait_seconds_bucket",
}
"""Series that exist only once an engine failed (the test injects no fault; so does the 5xx share), once a
model has ``autoscale:`` (the compose stack's has none), or once a request waited for a replica with room (an
overload; the stack's admission limit is on, its admitted count and learned limits are checked): their queries
must parse."""


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images() -> Iterator[dict[str, object]]:
    for name, package in (("podman", "podman"), ("runc", "runc"), ("podman-compose", "podman-compose")):
        tool(name, f"apt-get install {package}")
    started = time.monotonic()
    built = subprocess.run([str(ROOT / "scripts/images")], capture_output=True, text=True, timeout=2400)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    sizes = {
        tag: int(subprocess.run([*PODMAN, "image", "inspect", tag, "--format", "{{.Size}}"], capture_output=True,
                                text=True, check=True).stdout)
        for tag in ("shipyard:cpu", "shipyard-prometheus:local")
    }  # fmt: skip
    facts = {"build_seconds": round(time.monotonic() - started), "sizes": sizes, "log": built.stdout[-2000:]}
    if os.environ.get("IMAGES_REPORT"):
        Path(os.environ["IMAGES_REPORT"]).write_text(json.dumps(facts, indent=2) + "\n")
    yield facts


def podman_output(*args: str) -> str:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=60).stdout.strip()


def project_logs(project: str) -> str:
    """Each container's last lines (podman-compose 1.0's own `logs` exits 125 and shows nothing)."""
    names = podman_output("ps", "-a", "--filter", f"label=io.podman.compose.project={project}", "--format",
                          "{{.Names}}").split()  # fmt: skip
    tails = []
    for name in names:
        log = subprocess.run([*PODMAN, "logs", "--tail", "25", name], capture_output=True, text=True, timeout=60)
        tails.append(f"--- {name}\n{(log.stdout + log.stderr)[-1500:]}")
    return "\n".join(tails)


def test_the_cpu_image_runs_as_non_root_and_answers_the_openai_sdk(images: dict[str, object]) -> None:
    port = free_port()
    name = f"shipyard-image-test-{port}"
    run = [*PODMAN, "run", "-d", "--rm", "--name", name, *LIMITS, "-p", f"{port}:8080"]
    run += ["-e", f"SHIPYARD_API_KEYS={KEY}", "-e", f"SHIPYARD_ADMIN_KEYS={ADMIN}", "shipyard:cpu"]
    run += ["serve", "--host", "0.0.0.0", "--port", "8080"]
    subprocess.run(run, check=True, capture_output=True, timeout=120)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: ready(url, 2), timeout=420, interval=2), subprocess.run(
            [*PODMAN, "logs", name], capture_output=True, text=True
        ).stdout[-3000:]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        answer = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8
        )
        assert answer.choices[0].message.content
        user = subprocess.run([*PODMAN, "exec", name, "id", "-u"], capture_output=True, text=True, check=True)
        assert user.stdout.strip() == "10001"
        health = subprocess.run([*PODMAN, "healthcheck", "run", name], capture_output=True, text=True)
        assert health.returncode == 0, health.stdout + health.stderr
    finally:
        subprocess.run([*PODMAN, "rm", "-f", "-t", "5", name], capture_output=True, timeout=120)


def test_the_compose_stack_comes_up_and_prometheus_answers_every_dashboard_query(
    images: dict[str, object], tmp_path: Path
) -> None:
    ports = {name: free_port() for name in ("GATEWAY_PORT", "UI_PORT", "PROMETHEUS_PORT")}
    settings = {
        "SHIPYARD_API_KEYS": KEY,
        "SHIPYARD_ADMIN_KEYS": ADMIN,
        "SHIPYARD_UI_API_KEY": KEY,
        "SHIPYARD_UI_USERS": "tester:secret-password",
        "GRAFANA_ADMIN_PASSWORD": "unused-here",
        **{k: str(v) for k, v in ports.items()},
    }  # podman-compose 1.0 has no --env-file: compose reads them from its environment
    project = f"shipyard-test-{ports['GATEWAY_PORT']}"
    compose = ["podman-compose", "-p", project, "--podman-args", " ".join(PODMAN[1:])]
    compose += ["-f", str(ROOT / "deploy/compose.yaml")]
    services = ["engine", "gateway", "ui", "prometheus"]
    env = {**os.environ, **settings}
    backend = podman_output("info", "--format", "{{.Host.NetworkBackend}}")
    assert backend == "netavark", (
        f"podman's network backend is {backend!r}: its compose networks have no DNS, so the gateway cannot resolve "
        "`engine`. Install netavark and aardvark-dns (scripts/system-deps does), then `podman system reset`."
    )
    up = subprocess.run([*compose, "up", "-d", *services], capture_output=True, text=True, timeout=600, env=env)
    gateway = f"http://127.0.0.1:{ports['GATEWAY_PORT']}"
    prometheus = f"http://127.0.0.1:{ports['PROMETHEUS_PORT']}"
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        dns = podman_output("network", "inspect", f"{project}_default", "--format", "{{.DNSEnabled}}")
        assert dns == "true", (
            f"the compose network {project}_default has no DNS (DNSEnabled={dns!r}; backend {backend})"
        )
        assert wait_for(lambda: ready(gateway, 2), timeout=480, interval=2), project_logs(project)
        client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=KEY, max_retries=0)
        deadline = time.monotonic() + 45  # a little load: streams (TTFT), plain answers, one 404
        while time.monotonic() < deadline:
            for _chunk in client.chat.completions.create(
                model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
            ):
                pass
            client.completions.create(model="smollm2-135m-instruct", prompt="Hello", max_tokens=4)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="not-served", prompt="x", max_tokens=1)
        time.sleep(12)  # two more scrapes (every 5 s)
        dashboard = json.loads((ROOT / "deploy/grafana/dashboards/shipyard.json").read_text())
        queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
        empty = []
        for query in queries:
            expr = query.replace("$__rate_interval", "1m")
            answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
            assert answer["status"] == "success", (query, answer)
            needs_fault = set(re.findall(r"shipyard_\w+|vllm:\w+", query)) & NEEDS_FAULT or '"5.."' in query
            if not answer["data"]["result"] and not needs_fault:
                empty.append(query)
        assert not empty, empty
        targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        assert {t["labels"]["job"]: t["health"] for t in targets} == {"shipyard-gateway": "up", "vllm-engine": "up"}
    finally:
        subprocess.run([*compose, "down", "-t", "5"], capture_output=True, timeout=300, env=env)
