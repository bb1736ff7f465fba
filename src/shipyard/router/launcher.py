"""How the router gets new replicas: a small seam between rollout decisions and processes."""

from __future__ import annotations

from typing import Protocol


class ReplicaHandle(Protocol):
    """A running replica the router may restart or stop (an engine process, or a server run by others)."""

    url: str

    def alive(self) -> bool: ...

    async def restart(self) -> None: ...

    async def stop(self) -> None: ...


class Launcher(Protocol):
    def check(self, target: str) -> None:
        """Raise ValueError (with a reason for people) if ``target`` cannot be launched."""

    async def launch(self, target: str, name: str) -> ReplicaHandle:
        """Start a replica for ``target`` and return once it answers ``/health``."""


class ExternalReplica:
    """A server someone else runs (an http(s) URL): never restarted or stopped by shipyard."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def alive(self) -> bool:
        return True

    async def restart(self) -> None:
        return None

    async def stop(self) -> None:
        return None


class UrlLauncher:
    """Accepts only URLs of running OpenAI-compatible servers (a gateway without a local engine)."""

    def check(self, target: str) -> None:
        if not target.startswith(("http://", "https://")):
            raise ValueError(
                f"{target!r} is not a URL, and this gateway starts no engines (it was started with --no-engine)"
            )

    async def launch(self, target: str, name: str) -> ReplicaHandle:
        self.check(target)
        return ExternalReplica(target)
