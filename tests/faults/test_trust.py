"""Trust only what shipyard started: what the state store says is checked, and engines get none of its secrets.

Promises: a Redis state not signed with the deployment's ``state_key`` is refused (whoever can reach Redis cannot
choose where prompts go); a pid read from the state is only adopted (and so ever signalled) when its start time
matches and it carries this shipyard's marker; a log path from the state stays under the log folder; an engine's
environment holds no ``SHIPYARD_*`` setting (keys, Redis password) and its own key only.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from shipyard.control.audit import AuditLog
from shipyard.control.plane import ControlConfig, ControlPlane
from shipyard.control.state import DeploymentState, ReplicaRecord
from shipyard.control.store import RedisStateStore, StateUnreadable
from shipyard.engine import EngineProcess, EngineSpec
from shipyard.engine.launcher import EngineLauncher
from shipyard.gateway.app import upstream_client
from shipyard.router.replica import Replica, ReplicaPool
from shipyard.settings import load_settings
from tests.services import RedisServer, start_redis
from tests.test_control import FakeLauncher, engines


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with start_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


def _forge(server: RedisServer, prefix: str, state: DeploymentState) -> None:
    """What a process that reaches Redis but holds no state_key can do: write a state of its choosing."""
    client = redis.Redis(port=server.port)
    client.hset(f"{prefix}:state", mapping={"revision": state.revision, "state": state.to_json()})
    client.close()


def test_a_state_not_signed_with_the_state_key_is_refused_and_never_routed_to(redis_server: RedisServer) -> None:
    prefix = f"signed-{time.monotonic_ns()}"

    async def body() -> None:
        store = RedisStateStore(redis_server.url, prefix=prefix, signing_key="shared-secret")
        control = ControlPlane(
            ReplicaPool([Replica("http://good.test", name="good-0", deployment="blue", version="v1")]),
            httpx.AsyncClient(transport=httpx.MockTransport(engines)),
            store,
            FakeLauncher(),
            audit=AuditLog(None),
            config=ControlConfig(watch_interval_s=0.02),
        )
        await control.start()
        assert (await store.load()) is not None  # its own, signed state reads back
        evil = control.state.evolve(by="attacker", replicas=[ReplicaRecord("evil", "http://evil.test")])
        _forge(redis_server, prefix, evil)
        with pytest.raises(StateUnreadable, match="not signed with this deployment's state_key"):
            await store.load()
        await asyncio.sleep(0.3)  # many watch ticks
        assert [r.name for r in control.pool.replicas] == ["good-0"], "a forged state was applied"
        other = RedisStateStore(redis_server.url, prefix=prefix, signing_key="another-secret")
        with pytest.raises(StateUnreadable):
            await other.load()
        await control.stop()
        await store.close()
        await other.close()
        await control.client.aclose()

    asyncio.run(body())


def _spec(folder: Path | str = "/models/none") -> EngineSpec:
    return EngineSpec(model=str(folder), served_model_name="m")


def test_a_pid_is_adopted_only_with_its_start_time_and_this_shipyards_marker(tmp_path: Path) -> None:
    me = psutil.Process(os.getpid())
    with pytest.raises(ProcessLookupError, match="no start time"):
        EngineProcess.adopt(_spec(), tmp_path / "log", port=1, pid=me.pid, started_at=None)
    with pytest.raises(ProcessLookupError, match="not started by the shipyard"):
        EngineProcess.adopt(
            _spec(), tmp_path / "log", port=1, pid=me.pid, started_at=me.create_time(), marker=str(tmp_path)
        )
    with pytest.raises(ProcessLookupError, match="no longer the engine"):
        EngineProcess.adopt(_spec(), tmp_path / "log", port=1, pid=me.pid, started_at=me.create_time() - 100)


def test_an_engine_gets_none_of_shipyards_secrets_and_a_log_path_from_the_state_stays_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "SHIPYARD_API_KEYS": "sk-client",
        "SHIPYARD_ADMIN_KEYS": "sk-admin",
        "SHIPYARD_STATE_URL": "redis://:redis-password@redis:6379/0",
        "SHIPYARD_STATE_KEY": "state-secret",
        "VLLM_API_KEY": "a-key-from-the-shell",
    }.items():
        monkeypatch.setenv(name, value)
    dump = tmp_path / "env.json"
    (tmp_path / "config.json").write_text("{}")
    script = f"import json, os, time; open({str(dump)!r}, 'w').write(json.dumps(dict(os.environ))); time.sleep(60)"
    launcher = EngineLauncher(
        _spec(tmp_path),
        tmp_path / "logs",
        command=[sys.executable, "-c", script],
        env={"VLLM_API_KEY": "sk-engine-only"},
        marker=str(tmp_path),
    )
    handle = launcher.prepare(str(tmp_path), "blue-0")
    handle.spawn()
    deadline = time.monotonic() + 20
    while not dump.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = json.loads(dump.read_text())
    leaked = sorted(k for k in seen if k.startswith("SHIPYARD_") and k != "SHIPYARD_ENGINE_OF")
    assert not leaked, f"the engine saw {leaked}"
    assert seen["VLLM_API_KEY"] == "sk-engine-only" and seen["SHIPYARD_ENGINE_OF"] == str(tmp_path)
    forged = {**handle.identity(), "log_file": "/etc/passwd"}  # a state naming another file as its log
    adopted = launcher.adopt(forged, 1, "blue-0")
    assert adopted.process.log_file == tmp_path / "logs" / "engine-blue-0.log"  # type: ignore[attr-defined]
    asyncio.run(handle.stop())


def test_the_gateway_sends_engines_their_key_and_only_to_engines() -> None:
    settings = load_settings(api_keys="sk-client", engine_key="sk-engine-only")
    client = upstream_client(settings)
    assert client.headers["authorization"] == "Bearer sk-engine-only"
    asyncio.run(client.aclose())


def test_previous_response_id_is_shared_by_gateways_and_belongs_to_the_key_that_made_it(
    redis_server: RedisServer,
) -> None:
    """Made through one gateway, continued through another on the same Redis: it reaches the replica holding
    it; another key (even a valid one) gets 404, as if it did not exist."""
    from shipyard.testing import FakeOpenAI
    from tests.helpers import ServerThread, wait_for

    prefix = f"responses-{time.monotonic_ns()}"
    fakes = [FakeOpenAI("m"), FakeOpenAI("m")]
    settings = load_settings(api_keys="alice:sk-alice,bob:sk-bob", health_interval_s=60)
    with ServerThread(fakes[0]) as one, ServerThread(fakes[1]) as two:

        def gateway(replicas: list[Replica]) -> ServerThread:
            store = RedisStateStore(redis_server.url, prefix=prefix)
            from shipyard.gateway import create_app

            return ServerThread(create_app(settings, replicas, store=store))

        seconds = [Replica(one.url, name="r1"), Replica(two.url, name="r2")]
        with gateway([Replica(one.url, name="r1"), Replica(two.url, name="r2")]) as first, gateway(seconds) as second:
            for gw in (first, second):
                assert wait_for(lambda gw=gw: httpx.get(f"{gw.url}/ready").json()["status"] == "ready", timeout=10)
            alice, bob = {"Authorization": "Bearer sk-alice"}, {"Authorization": "Bearer sk-bob"}
            made = httpx.post(f"{first.url}/v1/responses", json={"model": "m", "input": "a"}, headers=alice).json()
            maker = 0 if fakes[0].requests else 1
            body = {"model": "m", "input": "b", "previous_response_id": made["id"]}
            for _ in range(4):
                assert httpx.post(f"{second.url}/v1/responses", json=body, headers=alice).status_code == 200
            assert len(fakes[maker].requests) == 5 and not fakes[1 - maker].requests
            foreign = httpx.post(f"{second.url}/v1/responses", json=body, headers=bob)
            assert foreign.status_code == 404 and foreign.json()["error"]["code"] == "previous_response_not_found"
            # issue 34 (low): its replica quarantined (weights unknown) — refused, never sent there
            seconds[maker].quarantined = "weights unknown after a failed in-place update"
            held = httpx.post(f"{second.url}/v1/responses", json=body, headers=alice)
            assert held.status_code == 400 and "not serving now" in held.json()["error"]["message"]
            assert len(fakes[maker].requests) == 5
