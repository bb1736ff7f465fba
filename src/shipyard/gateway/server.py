"""Running the gateway app under uvicorn (uvloop + httptools when available)."""

from __future__ import annotations

import importlib.util
from typing import Literal

import uvicorn
from fastapi import FastAPI


def fast_loop() -> Literal["uvloop", "asyncio"]:
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def fast_http() -> Literal["httptools", "h11"]:
    return "httptools" if importlib.util.find_spec("httptools") else "h11"


def uvicorn_config(app: FastAPI, host: str, port: int, log_level: str = "info") -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop=fast_loop(),
        http=fast_http(),
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=10,
    )


def run_gateway(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM; returns after a graceful shutdown."""
    uvicorn.Server(uvicorn_config(app, host, port, log_level)).run()
