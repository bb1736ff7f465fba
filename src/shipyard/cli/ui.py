"""``shipyard ui``: the Gradio chat page in front of a running gateway."""

from __future__ import annotations

from typing import Annotated

import typer

from shipyard.cli.app import ConfigOption, app, fail, port_is_free, settings_from
from shipyard.settings import Settings


def page_key(settings: Settings, explicit: str | None) -> str | None:
    """The key the page sends: --api-key, ui.api_key, the first api_keys entry, then the stored key file."""
    if explicit:
        return explicit
    if settings.ui.api_key is not None:
        return settings.ui.api_key.get_secret_value()
    if settings.api_keys:
        return settings.key_values()[0]
    if settings.api_key_file.is_file():
        return settings.api_key_file.read_text().strip() or None
    return None


@app.command()
def ui(
    config: ConfigOption = None,
    gateway: Annotated[
        str | None, typer.Option(help="Gateway base URL (default: ui.gateway_url, else the local gateway).")
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="API key for the gateway (default: see ui.api_key).")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on (default: ui.host, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: ui.port, 7860).")] = None,
    user: Annotated[
        list[str] | None,
        typer.Option("--user", help="NAME:PASSWORD allowed to log in (repeatable; replaces ui.users)."),
    ] = None,
) -> None:
    """Serve the chat page (streaming chat, model picker, intent and reply tabs) for a running gateway."""
    start_page(settings_from(config), gateway=gateway, api_key=api_key, host=host, port=port, users=user)


def start_page(
    settings: Settings,
    *,
    gateway: str | None = None,
    api_key: str | None = None,
    host: str | None = None,
    port: int | None = None,
    users: list[str] | None = None,
    block: bool = True,
) -> str:
    """Serve the chat page for ``shipyard ui`` (blocking) and ``shipyard up`` (beside the gateway, in this
    process). Arguments override ``settings.ui``; the default gateway is the local one. Returns the page's URL."""
    from shipyard.ui import GatewayClient
    from shipyard.ui.app import UIConfigError, launch

    local = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = (gateway or settings.ui.gateway_url or f"http://{local}:{settings.port}").rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise fail(f"--gateway {url!r} must start with http:// or https://")
    listen = host or settings.ui.host
    listen_port = settings.ui.port if port is None else port
    if listen_port and not port_is_free(listen, listen_port):
        raise fail(
            f"chat page port {listen_port} on {listen} is already in use; set ui.port (or `shipyard up --no-ui`)"
        )
    page = f"http://{listen}:{listen_port}"
    typer.echo(f"chat page on {page} for the gateway at {url}", err=True)
    try:
        launch(
            GatewayClient(url, page_key(settings, api_key)),
            listen,
            listen_port,
            users or [u.get_secret_value() for u in settings.ui.users],
            block=block,
            title=settings.ui.title,
            root_path=settings.ui.root_path,
        )
    except UIConfigError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"cannot serve the chat page on {listen}:{listen_port}: {exc}") from None
    return page


__all__ = ["page_key", "start_page", "ui"]
