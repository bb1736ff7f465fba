"""Faults under the state file: a saver killed at any instant, a full disk, a read-only disk, a full audit log.

Promises (DESIGN.md "Faults"): never drop the current copy; a failed save changes nothing and leaves no temp file;
a rollout that cannot be saved is refused with a clear message; audit-log failures never stop the supervisor.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shipyard.control.audit import AuditLog
from shipyard.control.commands import RolloutCommand, RolloutRejected
from shipyard.control.plane import ControlConfig, ControlPlane
from shipyard.control.state import DeploymentState, ReplicaRecord
from shipyard.control.store import FileStateStore, StateSaveFailed, StateUnreadable
from shipyard.control.supervisor import Supervisor
from shipyard.router.replica import Replica, ReplicaPool
from tests.faults.report import record

KILLS = 300


def _state(revision_from: DeploymentState, i: int) -> DeploymentState:
    record = ReplicaRecord("blue-0", "http://127.0.0.1:8001", version=f"v{i}", target=f"/m/{i}" + "x" * 2000)
    return revision_from.evolve(by="saver", replicas=[record], weights={"blue": 1.0})


def _save_forever(folder: Path) -> None:  # the child: saves as fast as it can until it is killed
    async def body() -> None:
        store = FileStateStore(folder)
        state = await store.load() or DeploymentState()
        i = 0
        while True:
            i += 1
            state = _state(state, i)
            await store.save(state)

    try:
        asyncio.run(body())
    finally:
        os._exit(1)


def test_a_saver_killed_at_any_instant_never_leaves_a_store_that_loads_as_never_saved(tmp_path: Path) -> None:
    """300 SIGKILLs at random instants of a process saving in a loop: after each, a fresh store loads a state
    whose revision never goes back, and no more than one temp file of a dead saver is ever left."""
    folder = tmp_path / "state"
    draw = random.Random(21)
    last_revision = 0
    saved_once = False
    deadline = time.monotonic() + 120
    for kill in range(KILLS):
        assert time.monotonic() < deadline, f"only {kill} kills in 120 s"
        pid = os.fork()
        if pid == 0:
            _save_forever(folder)
        time.sleep(draw.uniform(0.0, 0.02) if saved_once else 0.3)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        state = asyncio.run(FileStateStore(folder).load())
        copies = sorted(p.name for p in folder.glob("state.json*"))
        if state is None:
            assert not copies, f"kill {kill}: loads as never saved while {copies} exist"
            continue
        saved_once = True
        assert state.revision >= last_revision, f"kill {kill}: revision went back to {state.revision}"
        last_revision = state.revision
        for stale in folder.glob(".state.json.*.tmp"):
            stale.unlink()  # a dead saver's half-written temp file: never read, removed by the next saver
    assert saved_once and last_revision > KILLS / 10
    record(
        "the saver SIGKILLed at random instants",
        "never a store that loads as never saved while copies exist; revisions never go back",
        kills=KILLS,
        loads_as_never_saved=0,
        last_revision=last_revision,
    )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only; CI runs as root)."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the full-disk tests need root in CI (mount -t tmpfs)")
        pytest.skip("mounting a small tmpfs needs root")
    folder = tmp_path / "disk"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path) -> None:
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_save_on_a_full_disk_fails_cleanly_and_changes_nothing(small_disk: Path) -> None:
    async def body() -> None:
        store = FileStateStore(small_disk / "state")
        first = _state(DeploymentState(), 1)
        await store.save(first)
        _fill(small_disk)
        with pytest.raises(StateSaveFailed, match="could not be saved .*nothing was changed"):
            await store.save(_state(first, 2))
        assert not list((small_disk / "state").glob("*.tmp")), "a temp file was left behind"
        assert await FileStateStore(small_disk / "state").load() == first
        (small_disk / "filler").unlink()
        await store.save(_state(first, 2))  # space again: the next save works
        reloaded = await FileStateStore(small_disk / "state").load()
        assert reloaded is not None and reloaded.revision == 2

    asyncio.run(body())


def test_a_save_on_a_read_only_disk_fails_cleanly(small_disk: Path) -> None:
    async def body() -> None:
        store = FileStateStore(small_disk / "state")
        first = _state(DeploymentState(), 1)
        await store.save(first)
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        with pytest.raises(StateSaveFailed, match="Read-only file system"):
            await store.save(_state(first, 2))
        assert await FileStateStore(small_disk / "state").load() == first

    asyncio.run(body())


def test_a_missing_state_file_beside_its_copies_is_an_error_not_never_saved(tmp_path: Path) -> None:
    async def body() -> None:
        store = FileStateStore(tmp_path / "state")
        state = _state(DeploymentState(), 1)
        await store.save(state)
        await store.save(_state(state, 2))
        (tmp_path / "state" / "state.json").unlink()
        with pytest.raises(StateUnreadable, match=r"missing although earlier copies.*state\.json\.1"):
            await FileStateStore(tmp_path / "state").load()

    asyncio.run(body())


def _engines(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 512}]})
    return httpx.Response(200)


def test_a_rollout_on_a_full_disk_is_refused_and_nothing_live_changes(small_disk: Path) -> None:
    async def body() -> None:
        store = FileStateStore(small_disk / "state")
        client = httpx.AsyncClient(transport=httpx.MockTransport(_engines))
        pool = ReplicaPool([Replica("http://blue.test", name="blue-0", deployment="blue", version="v1")])
        control = ControlPlane(
            pool, client, store, _UrlOnly(), audit=AuditLog(small_disk / "audit.jsonl"), config=ControlConfig()
        )
        await control.start()
        before = control.state
        _fill(small_disk)
        with pytest.raises(RolloutRejected, match="not started: the state could not be saved"):
            await control.request(RolloutCommand("http://green.test:8000", version="v2"))
        assert control.current is None and control.state == before
        assert pool.weights == {"blue": 1.0} and [r.name for r in pool.replicas] == ["blue-0"]
        assert await store.lease_owner() is None  # the lease went back with the refusal
        assert await FileStateStore(small_disk / "state").load() == before
        await control.stop()
        await client.aclose()

    asyncio.run(body())


class _UrlOnly:
    def check(self, target: str) -> None:
        return None

    def prepare(self, target: str, name: str, **_: object) -> object:
        raise AssertionError("nothing may start on a refused rollout")

    def adopt(self, identity: object, url_port: int, name: str) -> object:
        raise ProcessLookupError(name)


class _DeadHandle:
    url = "http://blue.test"

    def __init__(self) -> None:
        self.restarted = 0

    def alive(self) -> bool:
        return self.restarted > 0

    def identity(self) -> dict[str, object]:
        return {}

    async def restart(self) -> None:
        self.restarted += 1


def test_an_audit_log_on_a_full_disk_never_stops_the_supervisor(small_disk: Path) -> None:
    async def body() -> None:
        _fill(small_disk)
        audit = AuditLog(small_disk / "audit.jsonl")
        replica = Replica("http://blue.test", name="blue-0", ready=True)
        pool = ReplicaPool([replica])
        supervisor = Supervisor(pool, audit, backoff_s=0.01, interval_s=0.01)
        handle = _DeadHandle()
        supervisor.manage("blue-0", handle)  # type: ignore[arg-type]
        await supervisor.check()
        for _ in range(200):
            if handle.restarted:
                break
            await asyncio.sleep(0.01)
        assert handle.restarted == 1, "the dead engine was not restarted"
        assert audit.write_failures >= 1 and [e["action"] for e in audit.entries][:1] == ["replica_restart"]
        await supervisor.stop()

    asyncio.run(body())


def test_the_small_files_beside_the_state_are_whole_or_old_on_a_full_disk(small_disk: Path) -> None:
    """Load reports, response owners and the local copy of a Redis state go through one temp-file-and-rename:
    on a full disk the write fails, the file keeps what it held, and no temp file is left."""
    from shipyard.control.store import replace_with

    target = small_disk / "loads" / "gateway.json"
    replace_with(target, '{"before": true}')
    _fill(small_disk)
    with pytest.raises(OSError):
        replace_with(target, "x" * 200_000)
    assert target.read_text() == '{"before": true}'
    assert not [p.name for p in target.parent.iterdir() if p.name.endswith(".tmp")], "a temp file was left behind"
