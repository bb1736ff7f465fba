"""Real servers that tests and benchmarks start and stop: redis-server and nginx (Debian's), on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from shipyard.engine import free_port


def find_tool(name: str) -> str | None:
    """``name`` on PATH, in /usr/sbin (Debian's nginx) or beside this Python."""
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:{Path(sys.executable).parent}")


def _need(name: str, hint: str) -> str:
    found = find_tool(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed ({hint})")
    return found


class RedisServer:
    """``redis-server`` with no persistence, in ``folder``; ``url`` is its redis:// address."""

    def __init__(self, folder: Path) -> None:
        self.binary = _need("redis-server", "apt-get install redis-server")
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        log = open(self.folder / "redis.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([*args, "--dir", str(self.folder)], stdout=log, stderr=subprocess.STDOUT)
        import redis

        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError((self.folder / "redis.log").read_text()) from None
                time.sleep(0.05)
        client.close()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class Nginx:
    """nginx in the foreground with ``server_conf`` (an ``http``-context include, as shipyard generates)."""

    def __init__(self, folder: Path, server_conf: str) -> None:
        self.binary = _need("nginx", "apt-get install nginx-light")
        self.folder = folder
        self.server_conf = server_conf
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Nginx:
        root = self.folder
        (root / "logs").mkdir(parents=True, exist_ok=True)
        (root / "shipyard.conf").write_text(self.server_conf)
        main = root / "nginx.conf"
        main.write_text(
            f"daemon off;\npid {root}/nginx.pid;\nerror_log {root}/logs/error.log warn;\n"
            "events { worker_connections 1024; }\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {root}/body;\n  proxy_temp_path {root}/proxy;\n"
            f"  include {root}/shipyard.conf;\n}}\n"
        )
        self.proc = subprocess.Popen([self.binary, "-p", str(root), "-c", str(main)], stderr=subprocess.PIPE)
        time.sleep(0.3)
        if self.proc.poll() is not None:
            raise RuntimeError(self.proc.stderr.read().decode() if self.proc.stderr else "nginx exited")
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
