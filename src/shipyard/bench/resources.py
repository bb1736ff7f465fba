"""What the server used while a load ran: GPU memory and utilisation (NVML, when a GPU and ``nvidia-ml-py`` are
there) and CPU / resident memory of the serving processes (psutil), sampled on a background thread.

The serving processes are found from the URL when it is on this host: the processes listening on its port are
``gateway`` when they are shipyard (its serving workers too; its vLLM children are ``engine``) and ``engine``
otherwise (vLLM straight).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import psutil

log = logging.getLogger("shipyard.bench")

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def serving_processes(url: str) -> dict[str, list[psutil.Process]]:
    """{"gateway": [...], "engine": [...]} for a URL served on this host; empty when it is elsewhere or hidden."""
    parts = urlsplit(url)
    if parts.hostname not in LOCAL_HOSTS:
        return {}
    port = parts.port or (443 if parts.scheme == "https" else 80)
    listening: list[psutil.Process] = []
    for process in psutil.process_iter(["pid"]):  # per process: a shared listening socket shows every holder
        with contextlib.suppress(psutil.Error):
            if any(
                c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                for c in process.net_connections(kind="tcp")
            ):
                listening.append(process)
    pids = {p.pid for p in listening}
    shipyard = set()
    for server in listening:
        with contextlib.suppress(psutil.Error):
            if any("shipyard" in part for part in server.cmdline()):
                shipyard.add(server.pid)
    groups: dict[str, list[psutil.Process]] = {}
    for server in listening:
        try:
            is_shipyard = server.pid in shipyard
            is_worker = server.ppid() in shipyard  # a serving worker of a shipyard gateway (serve --workers)
            children = [c for c in server.children(recursive=True) if c.pid not in pids]
        except psutil.Error:
            continue
        if is_shipyard or is_worker:
            groups.setdefault("gateway", []).append(server)
            groups.setdefault("engine", []).extend(children if is_shipyard else [])
        else:
            groups.setdefault("engine", []).extend([server, *children])
    return {name: procs for name, procs in groups.items() if procs}


class _Gpus:
    def __init__(self) -> None:
        self.handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as exc:  # no library, no driver, no GPU: sample without
            log.debug("no GPU sampling: %s", exc)

    def sample(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for index, handle in enumerate(self.handles):
            memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            values[f"gpu{index}_mem_mib"] = memory.used / 2**20
            values[f"gpu{index}_util_pct"] = float(self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        return values


class ResourceSampler:
    """``with ResourceSampler(url) as sampler: ...`` then ``sampler.summary()`` (mean and peak of every series)
    and ``sampler.samples`` (the timeline; ``t`` in seconds since the sampler started)."""

    def __init__(self, url: str, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.groups = serving_processes(url)
        self.gpus = _Gpus()
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="resource-sampler")
        self.started = time.perf_counter()

    def __enter__(self) -> ResourceSampler:
        for procs in self.groups.values():
            for proc in procs:
                try:
                    proc.cpu_percent()  # the first call only sets the baseline
                except psutil.Error:
                    pass
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            sample = {"t": time.perf_counter() - self.started, **self.gpus.sample()}
            for name, procs in self.groups.items():
                cpu = rss = 0.0
                for proc in procs:
                    try:
                        with proc.oneshot():
                            cpu += proc.cpu_percent()
                            rss += proc.memory_info().rss / 2**20
                    except psutil.Error:
                        continue  # a process that ended (a replica restarted): the others still count
                sample[f"{name}_cpu_pct"], sample[f"{name}_rss_mib"] = cpu, rss
            self.samples.append(sample)

    def summary(self) -> dict[str, dict[str, float]]:
        keys = sorted({k for s in self.samples for k in s if k != "t"})
        out: dict[str, dict[str, float]] = {}
        for key in keys:
            values = [s[key] for s in self.samples if key in s]
            out[key] = {"mean": round(sum(values) / len(values), 2), "peak": round(max(values), 2)}
        return out
