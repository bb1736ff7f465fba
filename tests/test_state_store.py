"""The deployment state and its stores: the file under data_dir, and a real redis-server started here."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.control.state import HISTORY_LIMIT, DeploymentState, ReplicaRecord, StateError
from shipyard.control.store import (
    FileStateStore,
    LoadReport,
    MemoryStateStore,
    RedisStateStore,
    StateConflict,
    StateStore,
    StateUnreadable,
    StoreLocked,
    open_store,
)
from tests.services import RedisServer, start_redis


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with start_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["memory", "file", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    def make() -> StateStore:
        if request.param == "memory":
            return MemoryStateStore()
        if request.param == "file":
            return FileStateStore(tmp_path / "state")
        server = request.getfixturevalue("redis_server")
        return RedisStateStore(server.url, prefix=f"test-{os.getpid()}-{tmp_path.name}")

    yield make


def sample(revision_from: DeploymentState | None = None) -> DeploymentState:
    base = revision_from or DeploymentState()
    record = ReplicaRecord(
        "blue-v1",
        "http://127.0.0.1:8001",
        version="v1",
        target="/models/v1",
        engine={"model": "/models/v1", "extra_args": ["--seed", "1"]},
        pid=1234,
        started_at=1.5,
        host="h",
    )
    return base.evolve(by="test", replicas=[record], weights={"blue": 1.0}, aliases={"m": "m@v2"})


def test_state_round_trips_and_is_bounded() -> None:
    state = sample()
    assert DeploymentState.from_json(state.to_json()) == state
    assert state.revision == 1 and state.replica("blue-v1") is not None and state.replicas[0].managed
    longer = state.evolve(by="t", history=[{"id": str(i)} for i in range(HISTORY_LIMIT + 5)])
    assert len(longer.history) == HISTORY_LIMIT and longer.history[-1] == {"id": str(HISTORY_LIMIT + 4)}
    for bad, fragment in [("{", "not JSON"), ("[]", "not a shipyard"), ('{"revision": 1, "schema": 9}', "schema")]:
        with pytest.raises(StateError, match=fragment):
            DeploymentState.from_json(bad)


def test_every_store_saves_in_revision_order_and_leases_one_owner(make_store: object) -> None:
    async def run() -> None:
        store = make_store()  # type: ignore[operator]
        assert await store.load() is None
        first = sample()
        await store.save(first)
        assert await store.load() == first
        with pytest.raises(StateConflict):
            await store.save(first)  # the same revision again: someone else's write would be lost
        second = first.evolve(by="t", weights={"green": 1.0})
        await store.save(second)
        other = make_store()  # type: ignore[operator]
        if not isinstance(store, MemoryStateStore) or isinstance(store, FileStateStore):
            assert (await other.load()) == second  # a second reader (another gateway) sees the same state
        assert await store.acquire_lease("a", 5)
        assert await store.acquire_lease("a", 5)  # renewing
        assert not await store.acquire_lease("b", 5)
        assert await store.lease_owner() == "a"
        await store.release_lease("b")  # not the owner: nothing happens
        assert await store.lease_owner() == "a"
        await store.release_lease("a")
        assert await store.acquire_lease("b", 0.05)
        await asyncio.sleep(0.1)
        assert await store.lease_owner() is None and await store.acquire_lease("a", 5)  # b's lease ran out
        await store.report_load(LoadReport("g1", 2, {"replica:blue-v1": 3}, 0.0), ttl_s=5)
        reports = await store.load_reports()
        assert [(r.gateway, r.in_flight["replica:blue-v1"]) for r in reports] == [("g1", 3)]
        await store.close()
        await other.close()

    asyncio.run(run())


def test_file_store_writes_atomically_and_keeps_the_last_states(tmp_path: Path) -> None:
    async def run() -> None:
        store = FileStateStore(tmp_path)
        state = sample()
        await store.save(state)
        for _ in range(6):
            state = state.evolve(by="t")
            await store.save(state)
        assert json.loads((tmp_path / "state.json").read_text())["revision"] == 7
        kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("state.json"))
        assert kept == ["state.json", "state.json.1", "state.json.2", "state.json.3", "state.json.4"]
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

        (tmp_path / "state.json").write_text('{"revision": 8, "schema": 1, "replicas": [{"nme": 1}]}')
        with pytest.raises(StateUnreadable) as caught:
            await FileStateStore(tmp_path).load()
        message = str(caught.value)
        assert str(tmp_path / "state.json") in message and "state.json.1 (revision 6)" in message
        for name in ("state.json", "state.json.1", "state.json.2", "state.json.3", "state.json.4"):
            (tmp_path / name).write_text("garbage")
        with pytest.raises(StateUnreadable, match="no earlier copy is readable"):
            await FileStateStore(tmp_path).load()

    asyncio.run(run())


def test_file_store_serves_one_gateway(tmp_path: Path) -> None:
    first = FileStateStore(tmp_path)
    first.lock()
    with pytest.raises(StoreLocked, match=f"pid {os.getpid()}"):
        FileStateStore(tmp_path).lock()
    asyncio.run(first.close())
    FileStateStore(tmp_path).lock()  # released with its holder


def test_open_store_by_url(tmp_path: Path) -> None:
    assert isinstance(open_store(None, tmp_path), FileStateStore)
    assert open_store(f"file://{tmp_path}/s", tmp_path).path == tmp_path / "s" / "state.json"  # type: ignore[attr-defined]
    redis_store = open_store("redis://:secret@127.0.0.1:6390/2?prefix=prod", tmp_path)
    assert isinstance(redis_store, RedisStateStore) and redis_store.prefix == "prod"
    assert "secret" not in redis_store.description
    with pytest.raises(ValueError, match="state_url"):
        open_store("etcd://x", tmp_path)


def test_file_store_load_reports_reach_other_processes_and_expire(tmp_path: Path) -> None:
    """The serving workers of a gateway read the file state without its lock; their load reports are files."""

    async def body() -> None:
        primary, worker = FileStateStore(tmp_path), FileStateStore(tmp_path)
        primary.lock()
        await worker.report_load(LoadReport("host-1-w1", 3, {"replica:blue-v1": 2}, 10.0), ttl_s=60)
        await worker.report_load(LoadReport("gone/../w2", 3, {"replica:blue-v1": 5}, 10.0), ttl_s=0.01)
        await asyncio.sleep(0.05)
        (report,) = await primary.load_reports()
        assert report == LoadReport("host-1-w1", 3, {"replica:blue-v1": 2}, 10.0)
        assert sorted(p.name for p in (tmp_path / "loads").glob("*.json")) == ["gone_.._w2.json", "host-1-w1.json"]
        (tmp_path / "loads" / "broken.json").write_text("{not json")
        assert len(await primary.load_reports()) == 1  # an unreadable report is skipped
        await primary.report_load(LoadReport("primary", 3, {}, 10.0), ttl_s=60)  # kept in its process
        assert len(list((tmp_path / "loads").glob("*.json"))) == 3
        await worker.close()  # a worker that stops takes its reports with it
        assert [r.gateway for r in await primary.load_reports()] == ["primary"]
        await primary.close()

    asyncio.run(body())
