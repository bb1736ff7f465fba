"""An in-place reload that reports success but keeps (or garbles) the weights (vLLM #32718, #48312).

Promise: after a reload the engine's fingerprint (greedy answers to fixed probes) must match the one recorded
for that checkpoint, and must differ from the previous one when the checkpoints differ; a mismatch fails the
update and the previous weights go back, so no replica serves a version under a name it does not have.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx

from shipyard.control.commands import RolloutCommand
from shipyard.control.plane import ControlPlane
from shipyard.control.rollout import Phase, Rollout
from shipyard.control.store import MemoryStateStore
from tests.test_control import checkpoint_folder, engines, in_place_plane, until


class Weights:
    """A MockTransport engine whose answers depend on the checkpoint it holds; ``stale``: reloads change nothing;
    ``garble``: the next reload of that checkpoint loads something else."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.stale = False
        self.garble: str | None = None
        self.reloads: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/collective_rpc":
            folder = json.loads(request.content)["kwargs"]["weights_path"]
            self.reloads.append(Path(folder).name)
            if not self.stale:
                self.folder = folder + "-garbled" if folder == self.garble else folder
            return httpx.Response(200, json={"results": [None]})
        if path in ("/pause", "/resume", "/reset_prefix_cache"):
            return httpx.Response(200, json={})
        if path == "/v1/completions":
            prompts = json.loads(request.content)["prompt"]
            name = Path(self.folder).name
            choices = [
                {"index": i, "text": f"{name}:{i}", "logprobs": {"token_logprobs": [-0.1 * len(name) - i]}}
                for i in range(len(prompts))
            ]
            return httpx.Response(200, json={"choices": choices})
        return engines(request)


def _checkpoint(root: Path, name: str, value: float) -> str:
    """The test checkpoint of ``tests.test_control`` (same shapes for every version), its weights all ``value``."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = checkpoint_folder(root, name)
    save_file(
        {f"layer.{i}.weight": np.full((4, 4), value, dtype=np.float32) for i in range(2)}, f"{folder}/model.safetensors"
    )
    return folder


def _plane(tmp_path: Path) -> tuple[ControlPlane, Weights, MemoryStateStore, str, str, str]:
    v1, v2, v3 = (_checkpoint(tmp_path, f"v{i}", float(i)) for i in (1, 2, 3))  # other contents: other digests
    engine = Weights(v1)
    store = MemoryStateStore()
    control = in_place_plane(store, engine, ["blue-a"], v1)  # type: ignore[arg-type]
    return control, engine, store, v1, v2, v3


async def _update(control: ControlPlane, folder: str, version: str, ends: Phase) -> Rollout:
    """An in-place update to ``folder`` as ``version``, once it ended in ``ends`` and its gateway let go of it."""
    rollout = await control.request(RolloutCommand(folder, version=version, strategy="inplace"))
    await until(lambda: rollout.phase is ends and not control.running_here(), timeout=10)
    return rollout


async def _started(control: ControlPlane, store: MemoryStateStore) -> None:
    await store.save(control._seed)  # type: ignore[attr-defined]
    await control.start()
    await until(lambda: all(r.ready for r in control.pool.replicas))


def test_a_reload_that_keeps_the_old_weights_fails_and_the_previous_version_serves_on(tmp_path: Path) -> None:
    async def body() -> None:
        control, engine, store, v1, v2, _ = _plane(tmp_path)
        await _started(control, store)
        engine.stale = True
        rollout = await _update(control, v2, "v2", Phase.FAILED)
        assert "kept the old weights" in (rollout.error or "")
        state = await store.load()
        assert state is not None
        (record,) = state.replicas
        assert (record.version, record.held, record.quarantined) == ("v1", False, "")
        await control.stop()

    asyncio.run(body())


def test_a_rollback_whose_weights_answer_unlike_before_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        control, engine, store, v1, v2, _ = _plane(tmp_path)
        await _started(control, store)
        await _update(control, v2, "v2", Phase.DONE)
        state = await store.load()
        assert state is not None and len(state.fingerprints) == 2  # v1's (taken before) and v2's
        engine.garble = v1  # going back to v1 loads something that is not v1
        back = await _update(control, v1, "v1", Phase.FAILED)
        assert "unlike when it last served that checkpoint" in (back.error or "")
        state = await store.load()
        assert state is not None
        (record,) = state.replicas
        assert record.version == "v2" and not record.held and Path(engine.folder).name == "v2"
        await control.stop()

    asyncio.run(body())
