"""Kubernetes manifests for a fleet, from the same settings ``shipyard serve`` reads.

Per model: a blue and a green engine Deployment (green at 0 replicas until a rollout scales it up), each with a
Service and a headless twin the gateways discover the pods by, a model volume per color, and GPU requests equal
to the GPUs one engine takes (``tensor_parallel_size``, or the length of ``gpus``). Once: the namespace, Redis
(the shared state), the NetworkPolicies, two gateway replicas and the chat page. A fleet of one model keeps the
plain names (``shipyard-engine-blue``; the gateway finds it through ``SHIPYARD_UPSTREAMS``): that is what
``deploy/k8s`` holds, written from ``deploy/k8s/fleet.yaml``. A fleet of several gets the model in each name and
label, and its ``models:`` list (each source the model's headless Service) in a ConfigMap the gateways read.

>>> write_manifests(load_settings(Path("shipyard.yaml")), Path("k8s-out"))   # doctest: +SKIP
[PosixPath('k8s-out/namespace.yaml'), ...]
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

import yaml

from shipyard.settings import ModelSettings, Settings

COLORS = ("blue", "green")
STATIC = ("namespace.yaml", "redis.yaml", "network-policy.yaml", "ui.yaml")
ENGINE_PORT = 8000
PROMETHEUS_NAMESPACE = "monitoring"
"""The namespace whose Prometheus may scrape the engines (kube-prometheus-stack's usual one; edit the policy
where yours differs)."""
PROMETHEUS_URL = "http://prometheus-operated.monitoring.svc:9090"
"""Where KEDA's ScaledObjects query the gateways' decisions (kube-prometheus-stack's Service; edit it where yours
differs)."""
DEFAULT_SERVED = "qwen"
"""The served name of a fleet of one whose settings name none (what the manifests always used)."""


@dataclass(frozen=True)
class EngineManifest:
    """The names and vLLM arguments of one model's engines on Kubernetes."""

    model: str
    engine: str
    """Base name of its Deployments and Services (``shipyard-engine`` or ``shipyard-engine-<model>``)."""
    volume: str
    replicas: int
    gpus: int
    args: tuple[str, ...]
    labelled: bool
    """Whether its labels and selectors carry ``shipyard/model`` (a fleet of several)."""
    max_replicas: int | None = None
    """Its ``autoscale.max_replicas`` (None: no autoscale, no ScaledObject)."""

    def discovery(self, color: str = "blue") -> str:
        return f"dns+http://{self.engine}-{color}-pods:{ENGINE_PORT}#{color}"


def _template(name: str) -> str:
    return resources.files("shipyard.ops").joinpath("manifests", name).read_text()


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError(f"model name {name!r} gives no Kubernetes name (letters or digits needed)")
    return slug


def engines_of(settings: Settings) -> list[EngineManifest]:
    fleet = settings.models or [
        ModelSettings(name=settings.served_model_name or DEFAULT_SERVED, replicas=settings.engine.replicas)
    ]
    several = len(fleet) > 1
    slugs = [_slug(m.name) for m in fleet]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"two models give the same Kubernetes name: {', '.join(m.name for m in fleet)}")
    found = []
    for model, slug in zip(fleet, slugs, strict=True):
        e = settings.engine_for(model)
        gpus = len(model.gpus) if isinstance(model.gpus, list) else e.tensor_parallel_size or 1
        args = [
            "--model=/models/served",
            f"--served-model-name={model.name}",
            "--host=0.0.0.0",
            f"--port={ENGINE_PORT}",
            f"--max-model-len={e.max_model_len or 4096}",
            "--enable-prefix-caching",
            f"--gpu-memory-utilization={e.gpu_memory_utilization or 0.9}",
            *([f"--tensor-parallel-size={e.tensor_parallel_size}"] if (e.tensor_parallel_size or 1) > 1 else []),
            *([f"--quantization={e.quantization}"] if e.quantization else []),
            *(["--scheduling-policy=priority"] if settings.prioritized() else []),
            *e.extra_args,
        ]
        found.append(
            EngineManifest(
                model=model.name,
                engine=f"shipyard-engine-{slug}" if several else "shipyard-engine",
                volume=f"shipyard-model-{slug}" if several else "shipyard-model",
                replicas=e.replicas,
                gpus=gpus,
                args=tuple(args),
                labelled=several,
                max_replicas=model.autoscale.max_replicas if model.autoscale else None,
            )
        )
    return found


def _engine_file(engine: EngineManifest, color: str) -> str:
    args = "".join(f"            - {arg}\n" for arg in engine.args[1:])
    return Template(_template("engine.yaml")).substitute(
        what=f"{engine.model}, " if engine.labelled else "",
        color=color,
        engine=engine.engine,
        model_flag=f" --model {engine.model}" if engine.labelled else "",
        model_label=f", shipyard/model: {_slug(engine.model)}" if engine.labelled else "",
        replicas=engine.replicas if color == "blue" else 0,
        args=args,
        gpus=engine.gpus,
        volume=engine.volume,
    )


def _scaled_object(engine: EngineManifest, color: str) -> str:
    return Template(_template("scaledobject.yaml")).substitute(
        engine=engine.engine,
        color=color,
        model=engine.model,
        model_label=f", shipyard/model: {_slug(engine.model)}" if engine.labelled else "",
        max_replicas=engine.max_replicas,
        prometheus=PROMETHEUS_URL,
    )


def _fleet_config(settings: Settings, engines: list[EngineManifest]) -> str:
    autoscale = {m.name: m.autoscale.model_dump(exclude_defaults=True) for m in settings.models if m.autoscale}
    config: dict[str, object] = {
        "models": [
            {
                "name": e.model,
                "source": e.discovery(),
                **({"autoscale": autoscale[e.model]} if e.model in autoscale else {}),
            }
            for e in engines
        ]
    }
    return _fleet_configmap(settings, config, "each model's engines found by their headless Service.")


def _fleet_configmap(settings: Settings, config: dict[str, object], what: str) -> str:
    """The ConfigMap ``shipyard-fleet`` holding the gateways' ``shipyard.yaml`` (``config`` plus the models the
    task endpoints are bound to)."""
    for task in ("intent", "reply"):
        bound = getattr(settings, task).model
        if bound is not None:
            config[task] = {"model": bound}
    text = yaml.safe_dump(config, sort_keys=False)
    return (
        f"---\n# The fleet the gateways serve: {what}\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shipyard-fleet\n  namespace: shipyard\ndata:\n"
        "  shipyard.yaml: |\n" + "".join(f"    {line}\n" for line in text.splitlines())
    )


def _gateway_file(settings: Settings, engines: list[EngineManifest]) -> str:
    if len(engines) == 1 and engines[0].max_replicas is None:
        models_env = (
            "            # one replica per blue engine pod (headless Service), re-resolved every 10 s\n"
            f"            - {{name: SHIPYARD_UPSTREAMS, value: {json.dumps(engines[0].discovery())}}}\n"
        )
        mount = volume = config = ""
    else:
        models_env = (
            "            # the fleet (ConfigMap shipyard-fleet): each model's blue engine pods, resolved every 10 s\n"
            "            - {name: SHIPYARD_CONFIG, value: /etc/shipyard/shipyard.yaml}\n"
        )
        mount = "            - {name: fleet, mountPath: /etc/shipyard, readOnly: true}\n"
        volume = "        - name: fleet\n          configMap: {name: shipyard-fleet}\n"
        config = _fleet_config(settings, engines)
    text = Template(_template("gateway.yaml")).substitute(models_env=models_env, fleet_mount=mount, fleet_volume=volume)
    return text + config


RAY_VERSION = "2.60.0"
RAY_HEAD = "shipyard-ray-head-svc.shipyard.svc:6379"
"""The head's Service KubeRay makes for the RayCluster ``shipyard-ray`` (``<cluster>-head-svc``)."""
_RAY_ENV = (
    "{indent}- {{name: RAY_AUTH_MODE, value: token}}\n"
    "{indent}- name: RAY_AUTH_TOKEN\n"
    "{indent}  valueFrom: {{secretKeyRef: {{name: shipyard-keys, key: ray-token}}}}\n"
    "{indent}# a node that stops answering is declared dead in ~1.5 s, not Ray's default ~15 s\n"
    '{indent}- {{name: RAY_health_check_period_ms, value: "500"}}\n'
    '{indent}- {{name: RAY_health_check_failure_threshold, value: "3"}}\n'
)


def _ray_files(settings: Settings, engines: list[EngineManifest]) -> dict[str, str]:
    """The Ray cluster (KubeRay) and the fleet config the gateways place its engines with: one GPU worker pod
    per GPU an engine takes (``nvidia.com/gpu`` of the largest engine per pod), as many pods as the engines
    start with, up to their ``autoscale.max_replicas`` when any model scales (KubeRay's in-tree autoscaler adds
    the pods a pending replica asks Ray for)."""
    per_pod = max(e.gpus for e in engines)
    start = sum(e.replicas * e.gpus for e in engines) // per_pod or 1
    most = sum((e.max_replicas or e.replicas) * e.gpus for e in engines) // per_pod or 1
    low = sum(min(e.replicas, _min_of(settings, e)) * e.gpus for e in engines) // per_pod
    scaling = any(e.max_replicas is not None for e in engines)
    text = Template(_template("raycluster.yaml")).substitute(
        ray_version=RAY_VERSION,
        autoscaling="true" if scaling else "false",
        autoscaling_note=(
            "KubeRay's autoscaler adds worker pods for the replicas the scaler places and Ray cannot fit."
            if scaling
            else "No model autoscales: the worker group keeps its size."
        ),
        autoscaler_options="  autoscalerOptions: {upscalingMode: Default, idleTimeoutSeconds: 300}\n"
        if scaling
        else "",
        head_env=_RAY_ENV.format(indent=" " * 14),
        worker_env=_RAY_ENV.format(indent=" " * 16),
        workers=start,
        min_workers=low if scaling else start,
        max_workers=most,
        gpus_per_worker=per_pod,
    )
    return {"raycluster.yaml": text}


def _min_of(settings: Settings, engine: EngineManifest) -> int:
    """The fewest replicas a model runs: its ``autoscale.min_replicas``, else all it starts with."""
    scale = settings.autoscale_of(engine.model)
    return scale.min_replicas if scale is not None else engine.replicas


def _ray_fleet_config(settings: Settings, engines: list[EngineManifest]) -> str:
    models = []
    for e in engines:
        entry = next((m for m in settings.models if m.name == e.model), None)
        model: dict[str, object] = {"name": e.model, "source": f"/models/{_slug(e.model)}", "replicas": e.replicas}
        if entry is not None and entry.autoscale is not None:
            model["autoscale"] = entry.autoscale.model_dump(exclude_defaults=True)
        if entry is not None and entry.engine:
            model["engine"] = entry.engine
        models.append(model)
    config: dict[str, object] = {"cluster": {"backend": "ray", "address": RAY_HEAD}, "models": models}
    return _fleet_configmap(settings, config, "engines placed on the Ray cluster, each model's folder in /models.")


def _ray_gateway_file(settings: Settings, engines: list[EngineManifest]) -> str:
    models_env = (
        "            # the fleet (ConfigMap shipyard-fleet): engines placed on the Ray cluster shipyard-ray\n"
        "            - {name: SHIPYARD_CONFIG, value: /etc/shipyard/shipyard.yaml}\n" + _RAY_ENV.format(indent=" " * 12)
    )
    text = Template(_template("gateway.yaml")).substitute(
        models_env=models_env,
        fleet_mount="            - {name: fleet, mountPath: /etc/shipyard, readOnly: true}\n",
        fleet_volume="        - name: fleet\n          configMap: {name: shipyard-fleet}\n",
    )
    return text.replace('args: ["serve", "--no-engine", ', 'args: ["serve", ') + _ray_fleet_config(settings, engines)


def render(settings: Settings, cluster: str | None = None) -> dict[str, str]:
    """File name -> text of every manifest of the fleet (and its ``kustomization.yaml``). ``cluster="ray"``:
    the engines are placed on a KubeRay ``RayCluster`` by the gateways (``cluster: {backend: ray}``) instead of
    being Deployments of their own."""
    if cluster not in (None, "ray"):
        raise ValueError(f"unknown cluster backend {cluster!r}: ray, or none for engine Deployments")
    engines = engines_of(settings)
    files = {"namespace.yaml": _template("namespace.yaml")}
    if cluster == "ray":
        files.update(_ray_files(settings, engines))
    else:
        volumes = [
            Template(_template("model-volume.yaml")).substitute(volume=e.volume, color=color, storage="40Gi")
            for e in engines
            for color in COLORS
        ]
        files["model-volumes.yaml"] = _template("model-volumes-header.yaml") + "---\n".join(volumes)
        for engine in engines:
            prefix = engine.engine.removeprefix("shipyard-")
            for color in COLORS:
                files[f"{prefix}-{color}.yaml"] = _engine_file(engine, color)
            if engine.max_replicas is not None:
                files[f"{prefix}-autoscale.yaml"] = "".join(_scaled_object(engine, color) for color in COLORS)
    files["redis.yaml"] = _template("redis.yaml")
    files["network-policy.yaml"] = Template(_template("network-policy.yaml")).substitute(
        prometheus_namespace=PROMETHEUS_NAMESPACE
    )
    files["gateway.yaml"] = (
        _ray_gateway_file(settings, engines) if cluster == "ray" else _gateway_file(settings, engines)
    )
    files["ui.yaml"] = _template("ui.yaml")
    return _with_kustomization(files)


def _with_kustomization(files: dict[str, str]) -> dict[str, str]:
    resources_list = "".join(f"  - {name}\n" for name in files)
    files["kustomization.yaml"] = (
        "# kubectl apply -k deploy/k8s   (after creating the secret: see docs/guides/operate.md)\n"
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: shipyard\nresources:\n"
        + resources_list
    )
    return files


def write_manifests(settings: Settings, out: Path, cluster: str | None = None) -> list[Path]:
    """Write :func:`render`'s files into ``out`` (created); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render(settings, cluster).items():
        path = out / name
        path.write_text(text)
        written.append(path)
    return written
