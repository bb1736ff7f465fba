"""The placement planner with made-up inventories (4x24 GB, 2x80 GB, 1x141 GB, none)."""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path

import pytest

from shipyard.engine.placement import Gpu, Need, PlacementError, Slot, plan, weights_gib

FOUR_4090D = [Gpu(i, 23.99, "RTX 4090D") for i in range(4)]
TWO_H100 = [Gpu(i, 79.6, "H100") for i in range(2)]
ONE_H200 = [Gpu(0, 139.8, "H200")]

QWEN_7B_BF16 = 15.23  # GiB of tensors in Qwen2.5-7B-Instruct
QWEN_7B_INT4 = 5.58
QWEN_14B_INT4 = 9.98
MINILM = 0.08


def by_gpu(slots: list[Slot]) -> dict[int, list[Slot]]:
    found: dict[int, list[Slot]] = defaultdict(list)
    for slot in slots:
        for gpu in slot.gpus:
            found[gpu].append(slot)
    return found


def test_one_model_four_replicas_on_four_gpus_one_each() -> None:
    slots = plan([Need("assistant", QWEN_7B_BF16, replicas=4)], FOUR_4090D)
    assert [s.gpus for s in slots] == [(0,), (1,), (2,), (3,)]
    assert {s.memory_fraction for s in slots} == {0.9}
    assert [s.visible_devices for s in slots] == ["0", "1", "2", "3"]


def test_the_reference_desk_on_four_24gb_cards() -> None:
    """The worked example of docs/guides/fleets.md: a 14B reply model on TP 2, an intent model x2, embeddings."""
    fleet = [
        Need("assistant", QWEN_14B_INT4, tensor_parallel=2),
        Need("classifier", QWEN_7B_INT4, replicas=2),
        Need("embed", MINILM),
    ]
    slots = plan(fleet, FOUR_4090D)
    placed = {(s.model, s.replica): s for s in slots}
    assert placed[("assistant", 0)].gpus == (0, 1) and placed[("assistant", 0)].memory_fraction == 0.9
    assert {placed[("classifier", 0)].gpus, placed[("classifier", 1)].gpus} == {(2,), (3,)}
    assert placed[("embed", 0)].gpus in {(2,), (3,)}
    for gpu, here in by_gpu(slots).items():
        assert sum(s.memory_fraction for s in here) <= 0.9 + 1e-9, gpu
        if gpu in (0, 1):
            assert [s.model for s in here] == ["assistant"]  # a tensor-parallel group has its GPUs alone
    shared = by_gpu(slots)[placed[("embed", 0)].gpus[0]]
    fractions = {s.model: s.memory_fraction for s in shared}
    assert fractions["classifier"] > fractions["embed"]  # in proportion to what each needs


def test_two_80gb_cards_and_one_141gb_card() -> None:
    assert [s.gpus for s in plan([Need("assistant", QWEN_7B_BF16, replicas=2)], TWO_H100)] == [(0,), (1,)]
    slots = plan([Need("classifier", QWEN_7B_BF16, replicas=2), Need("embed", MINILM)], ONE_H200)
    assert all(s.gpus == (0,) for s in slots)
    assert sum(s.memory_fraction for s in slots) <= 0.9 + 1e-9
    classifier = [s.memory_fraction for s in slots if s.model == "classifier"]
    assert classifier[0] == classifier[1] and classifier[0] > 0.4


def test_pinned_gpus_are_honoured_and_unknown_ones_refused() -> None:
    slots = plan([Need("assistant", QWEN_7B_BF16, replicas=2, gpus=(2, 3))], FOUR_4090D)
    assert [s.gpus for s in slots] == [(2,), (3,)]
    with pytest.raises(PlacementError, match="GPU 7 does not exist"):
        plan([Need("assistant", QWEN_7B_BF16, gpus=(7,))], FOUR_4090D)


def test_a_fleet_that_does_not_fit_is_refused_naming_the_model_the_gpu_and_the_shortfall() -> None:
    with pytest.raises(
        PlacementError,
        match=r"assistant replica 0 needs 36\.9 GiB .* GPU \d \(24 GiB\) has 21\.6 GiB free: 15\.3 GiB short",
    ):
        plan([Need("assistant", 29.5)], FOUR_4090D)  # Qwen2.5-14B in bf16 on one 24 GB card
    with pytest.raises(PlacementError, match="needs 2 GPUs of its own"):
        plan([Need("assistant", QWEN_14B_INT4, tensor_parallel=2), Need("big", 60.0, tensor_parallel=2)], TWO_H100)
    with pytest.raises(PlacementError, match="no GPU found"):
        plan([Need("assistant", QWEN_7B_BF16)], [])


def test_weights_come_from_the_safetensors_headers(tmp_path: Path) -> None:
    header = {"a": {"dtype": "BF16", "shape": [1024, 1024], "data_offsets": [0, 2 * 2**20]}, "__metadata__": {}}
    raw = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    assert weights_gib(tmp_path) == pytest.approx(2 / 1024)


def test_serve_replicas_on_a_four_gpu_host_get_one_gpu_each_and_the_whole_fraction(tmp_path: Path) -> None:
    """`shipyard serve --replicas 4` on 4 GPUs: each engine its own CUDA_VISIBLE_DEVICES (before this, all four
    took GPU 0 at 0.9/4 of its memory); a model too big for the GPUs is refused before anything starts."""
    from shipyard.engine import EngineSpec
    from shipyard.engine.launcher import EngineLauncher
    from shipyard.settings import load_settings
    from shipyard.stack import StackError, gpu_plan

    header = {"w": {"dtype": "BF16", "shape": [1], "data_offsets": [0, int(15.23 * 2**30)]}}
    raw = json.dumps(header).encode()
    with (tmp_path / "model.safetensors").open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + int(15.23 * 2**30))  # sparse: the header is all the planner reads
    (tmp_path / "config.json").write_text("{}")
    settings = load_settings(engine={"replicas": 4})
    spec = EngineSpec(model=str(tmp_path), served_model_name="assistant", gpu_memory_utilization=0.22)
    slots = gpu_plan(settings, spec, FOUR_4090D)
    launcher = EngineLauncher(spec, tmp_path / "logs", gpu_slots=slots)
    busy: set[str] = set()
    started = []
    for n in range(4):
        slot = launcher.free_slot(busy)
        assert slot is not None
        handle = launcher.handle_for(spec, f"blue-{n}", devices=slot.visible_devices)
        busy.add(handle.identity()["devices"])
        started.append((handle.process.env or {})["CUDA_VISIBLE_DEVICES"])
        assert handle.process.spec.gpu_memory_utilization == 0.9
    assert started == ["0", "1", "2", "3"]
    with pytest.raises(StackError, match="do not fit this host's GPUs: assistant replica 0 needs"):
        gpu_plan(settings, spec, [Gpu(0, 16.0)])


def sparse_checkpoint(folder: Path, gib: float) -> str:
    """A model folder whose safetensors header says ``gib`` of tensors (sparse: nothing else is written)."""
    folder.mkdir(parents=True)
    raw = json.dumps({"w": {"dtype": "BF16", "shape": [1], "data_offsets": [0, int(gib * 2**30)]}}).encode()
    with (folder / "model.safetensors").open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + int(gib * 2**30))
    (folder / "config.json").write_text("{}")
    return str(folder)


def test_a_fleet_from_the_settings_is_placed_on_four_24gb_cards(tmp_path: Path) -> None:
    """The worked 4-GPU example of docs/guides/fleets.md: a `models:` list to each engine's CUDA_VISIBLE_DEVICES."""
    import dataclasses

    from shipyard.engine import EngineSpec
    from shipyard.settings import load_settings
    from shipyard.stack import EngineChoice, engine_launcher, fleet_gpu_plan

    folders = {
        "assistant": sparse_checkpoint(tmp_path / "qwen14b-gptq", QWEN_14B_INT4),
        "classifier": sparse_checkpoint(tmp_path / "intent-w4a16", QWEN_7B_INT4),
        "embed": sparse_checkpoint(tmp_path / "minilm", MINILM),
    }
    (tmp_path / "fleet.yaml").write_text(
        "models:\n"
        f"  - {{name: assistant, source: {folders['assistant']}, engine: {{tensor_parallel_size: 2}}}}\n"
        f"  - {{name: classifier, source: {folders['classifier']}, replicas: 2}}\n"
        f"  - {{name: embed, source: {folders['embed']}}}\n"
    )
    settings = load_settings(tmp_path / "fleet.yaml", data_dir=tmp_path / "data")
    choices = [
        EngineChoice(folders[m.name], m.name, EngineSpec(model=folders[m.name], served_model_name=m.name), "v1",
                     m.name, settings.engine_for(m))
        for m in settings.models
    ]  # fmt: skip
    slots = fleet_gpu_plan(settings, choices, FOUR_4090D)
    assert [(s.model, s.replica, s.visible_devices, s.memory_fraction) for s in slots] == [
        ("assistant", 0, "0,1", 0.9),
        ("classifier", 0, "2", 0.779),
        ("classifier", 1, "3", 0.9),
        ("embed", 0, "2", 0.12),
    ]
    launcher = engine_launcher(settings, choices[2], "default", False, gpu_slots=slots)
    handle = launcher.handle_for(dataclasses.replace(choices[2].spec), "blue-v1", **launcher.free_place(set()))  # type: ignore[arg-type]
    assert (handle.process.env or {})["CUDA_VISIBLE_DEVICES"] == "2"
    assert handle.process.spec.gpu_memory_utilization == 0.12
    assert launcher.log_dir == tmp_path / "data" / "logs" / "embed"
    from shipyard.stack import StackError

    too_big = [
        dataclasses.replace(
            c, engine=settings.engine_for(settings.models[0]).model_copy(update={"tensor_parallel_size": 4})
        )
        for c in choices[:1]
    ]
    too_big += choices[1:]
    with pytest.raises(StackError, match="classifier replica 0: every allowed GPU is taken by a tensor-parallel group"):
        fleet_gpu_plan(settings, too_big, FOUR_4090D)


def test_models_sharing_a_gpu_split_its_budget_and_a_share_that_breaks_it_is_refused(tmp_path: Path) -> None:
    """Issue 34 item 3: the top-level engine.gpu_memory_utilization is copied into every model's settings, and it
    used to override the plan: two models on GPU 0 both started at 0.85 (the second vLLM refused to start)."""
    from shipyard.engine import EngineSpec
    from shipyard.settings import load_settings
    from shipyard.stack import EngineChoice, StackError, fleet_gpu_plan

    folders = {"chat": sparse_checkpoint(tmp_path / "chat", 4.0), "embed": sparse_checkpoint(tmp_path / "e", 1.0)}
    settings = load_settings(
        engine={"gpu_memory_utilization": 0.85},
        models=[{"name": name, "source": folder} for name, folder in folders.items()],
        data_dir=tmp_path / "data",
    )

    def choices(own: dict[str, float]) -> list[EngineChoice]:
        return [
            EngineChoice(folders[m.name], m.name, EngineSpec(model=folders[m.name], served_model_name=m.name), "v1",
                         m.name, settings.engine_for(m), memory_fraction=own.get(m.name))
            for m in settings.models
        ]  # fmt: skip

    slots = fleet_gpu_plan(settings, choices({}), [Gpu(0, 24.0)])
    assert sum(s.memory_fraction for s in slots) <= 0.85 and all(s.memory_fraction < 0.85 for s in slots)
    assert {s.model: s.memory_fraction for s in fleet_gpu_plan(settings, choices({"embed": 0.1}), [Gpu(0, 24.0)])}[
        "embed"
    ] == 0.1
    with pytest.raises(StackError, match=r"GPU 0 is shared by .*embed #0 0.5.* over the budget of 0.85"):
        fleet_gpu_plan(settings, choices({"embed": 0.5}), [Gpu(0, 24.0)])


def test_cpu_engines_reserve_what_their_model_needs_and_a_fleet_short_of_ram_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    """Issue 34 item 3: on CPU, vLLM's gpu_memory_utilization is a share of the host's RAM and every engine took
    the profile's 0.3 (7 GiB here for a 90 MB embedding model): the second engine of a fleet failed a minute
    into its start. A pooling model gets a small explicit KV cache; a model that cannot get its RAM is refused
    before its engine starts, naming it and the shortfall."""
    from shipyard.cli.serve import _sized_for_cpu
    from shipyard.engine import EngineSpec
    from shipyard.stack import EMBED_KV_CACHE_BYTES, EngineChoice, StackError, check_cpu_memory, cpu_memory_gib

    folder = sparse_checkpoint(tmp_path / "minilm", 0.09)
    spec = EngineSpec.from_profile("cpu", model=folder, served_model_name="minilm")
    embed = _sized_for_cpu(spec, "embed", "cpu", None)
    assert embed.extra_args[-2:] == ("--kv-cache-memory-bytes", str(EMBED_KV_CACHE_BYTES))
    assert cpu_memory_gib(embed, 23.5) < 1.5 < cpu_memory_gib(spec, 23.5) == 0.3 * 23.5
    assert _sized_for_cpu(spec, "generate", "cpu", None) is spec and _sized_for_cpu(spec, "embed", "cpu", 0.2) is spec
    check_cpu_memory(EngineChoice(folder, "minilm", embed, "v1"), 1, available_gib=5.64, total_gib=23.54)
    with pytest.raises(
        StackError, match=r"^chat's engine need 7\.1 GiB of RAM and 5\.6 GiB is free \(1\.4 GiB short\)"
    ):
        check_cpu_memory(EngineChoice(folder, "chat", spec, "v1"), 1, available_gib=5.64, total_gib=23.54)
