"""Top-level typer app; every failure becomes one plain line on stderr and a non-zero exit."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Any

import typer

from shipyard import __version__
from shipyard.settings import Settings, SettingsError, load_settings

app = typer.Typer(
    name="shipyard",
    help="From a (LoRA-finetuned, quantized) chat model on disk to a production vLLM service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Model folders: the embedded default and (later) the registry.", no_args_is_help=True)
app.add_typer(models_app, name="models")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML settings file (default: ./shipyard.yaml if present)."),
]


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=1)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def settings_from(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except SettingsError as exc:
        raise fail(str(exc)) from None


@app.command()
def version() -> None:
    """Print shipyard's version."""
    typer.echo(__version__)


def main() -> None:
    app()
