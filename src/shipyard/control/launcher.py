"""How the control plane gets replicas: a small seam between rollout decisions and processes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol


class ReplicaHandle(Protocol):
    """A replica the control plane may restart or stop (an engine process, or a server run by others)."""

    url: str

    def alive(self) -> bool: ...

    def identity(self) -> dict[str, Any]:
        """What the state records to adopt the process again (``engine``, ``pid``, ...); empty when external."""

    def spawn(self) -> None:
        """Start it without waiting (so its identity is recorded before a crash could orphan it)."""

    def serve_from(self, folder: str) -> None:
        """Its weights now come from ``folder`` (an in-place update): a restart must load those."""

    async def wait_ready(self) -> None:
        """Return once it answers ``/health``; raise (and leave nothing running) when it cannot start."""

    async def restart(self) -> None: ...

    async def stop(self) -> None: ...


class Launcher(Protocol):
    def check(self, target: str) -> None:
        """Raise ValueError (with a reason for people) if ``target`` cannot be launched."""

    def prepare(
        self, target: str, name: str, *, busy_binds: Iterable[str] = ..., port: int | None = None
    ) -> ReplicaHandle:
        """A handle for a new replica serving ``target``, not started yet."""

    def adopt(self, identity: Mapping[str, Any], url_port: int, name: str) -> ReplicaHandle:
        """The running process ``identity`` names; ProcessLookupError when it is gone."""

    def room(self, busy: Iterable[str]) -> str | None:
        """None when one more replica has a place of its own (``busy``: the CPU sets and GPU sets the running
        ones use), else why not, in words for people."""


class ExternalReplica:
    """A server someone else runs (an http(s) URL): never restarted or stopped by shipyard."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def alive(self) -> bool:
        return True

    def identity(self) -> dict[str, Any]:
        return {}

    def spawn(self) -> None:
        return None

    def serve_from(self, folder: str) -> None:
        return None

    async def wait_ready(self) -> None:
        return None

    async def restart(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


class UrlLauncher:
    """Accepts only URLs of running OpenAI-compatible servers (a gateway without a local engine)."""

    def check(self, target: str) -> None:
        if not is_url(target):
            raise ValueError(
                f"{target!r} is not a URL, and this gateway starts no engines (it was started with --no-engine)"
            )

    def prepare(
        self, target: str, name: str, *, busy_binds: Iterable[str] = (), port: int | None = None
    ) -> ReplicaHandle:
        self.check(target)
        return ExternalReplica(target)

    def adopt(self, identity: Mapping[str, Any], url_port: int, name: str) -> ReplicaHandle:
        raise ProcessLookupError("this gateway starts no engines, so it adopts none")

    def room(self, busy: Iterable[str]) -> str | None:
        return (
            "this gateway starts no engines: the servers are scaled where they run (on Kubernetes by the "
            "ScaledObject shipyard generates)"
        )
