"""Several "hosts" on one machine: network namespaces on a bridge, each with its own address (root needed), and a
real Ray cluster across them. Killing every process of a namespace is a host lost."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.services import tool

RAY = str(Path(sys.executable).with_name("ray"))
"""Ray's CLI of this environment (the nodes run the same Python, so the actors import the same shipyard)."""
FAST_HEALTH = '{"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}'
"""Ray's node health checks, tightened: a node that stops answering is dead after ~1.5-2 s (defaults: 15 s)."""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Hosts:
    """``hosts[i]`` is a namespace with address ``10.<n>.0.<i+1>``; this machine is ``10.<n>.0.254`` on the
    bridge. Torn down (every process of each namespace killed) by :meth:`down`."""

    def __init__(self, count: int, tag: str = "") -> None:
        tool("ip", "apt-get install iproute2 (scripts/system-deps)")
        if os.geteuid() != 0:
            if os.environ.get("CI"):
                pytest.fail("the cluster tests need root for network namespaces (CI runs as root)")
            pytest.skip("network namespaces need root")
        self.tag = tag or str(os.getpid() % 10000)
        self.net = 70 + os.getpid() % 50
        self.bridge = f"sy{self.tag}br"
        self.names = [f"sy{self.tag}h{i}" for i in range(count)]
        self.addresses = [f"10.{self.net}.0.{i + 1}" for i in range(count)]
        self.local = f"10.{self.net}.0.254"

    def up(self) -> Hosts:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.local}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i, (name, address) in enumerate(zip(self.names, self.addresses, strict=True)):
            veth = f"sy{self.tag}v{i}"
            ip("netns", "add", name)
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
            ip("link", "set", veth, "master", self.bridge, "up")
            ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
            ip("-n", name, "link", "set", "lo", "up")
        return self

    def run(
        self, host: int, argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` inside ``host``'s namespace, to its end."""
        command = ["ip", "netns", "exec", self.names[host], *argv]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)

    def pids(self, host: int) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.names[host]], capture_output=True, text=True).stdout
        return [int(p) for p in listed.split()]

    def kill(self, host: int) -> int:
        """SIGKILL every process of ``host`` (the host is lost); how many there were."""
        pids = self.pids(host)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def down(self) -> None:
        for host in range(len(self.names)):
            self.kill(host)
        time.sleep(0.2)
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


class RayCluster:
    """A real Ray cluster over :class:`Hosts`: the head on host 0, a worker on each other host, with Ray's token
    authentication on (every node, and every driver, needs :attr:`token`)."""

    def __init__(self, hosts: Hosts, gpus_per_host: int = 2, cpus_per_host: int = 2) -> None:
        self.hosts = hosts
        self.gpus, self.cpus = gpus_per_host, cpus_per_host
        self.address = f"{hosts.addresses[0]}:6379"
        self.token = secrets.token_hex(16)

    def auth(self) -> dict[str, str]:
        """What a node or driver of this cluster needs in its environment."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def env(self) -> dict[str, str]:
        return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.auth()}

    def start(self) -> RayCluster:
        common = [f"--num-gpus={self.gpus}", f"--num-cpus={self.cpus}", "--disable-usage-stats"]
        head = self.hosts.run(
            0,
            [RAY, "start", "--head", f"--node-ip-address={self.hosts.addresses[0]}", "--port=6379",
             "--include-dashboard=false", f"--system-config={FAST_HEALTH}", *common],
            env=self.env(),
            timeout=120,
        )  # fmt: skip
        assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
        for host in range(1, len(self.hosts.names)):
            self.join(host)
        return self

    def join(self, host: int) -> None:
        common = [f"--num-gpus={self.gpus}", f"--num-cpus={self.cpus}", "--disable-usage-stats"]
        worker = self.hosts.run(
            host,
            [RAY, "start", f"--address={self.address}", f"--node-ip-address={self.hosts.addresses[host]}", *common],
            env=self.env(),
            timeout=120,
        )
        assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
