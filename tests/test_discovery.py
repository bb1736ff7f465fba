"""Replicas found by DNS (Kubernetes headless Services): parsing, pool changes as addresses come and go, and the
gateway routing to a replica it found by resolving a real name."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from typer.testing import CliRunner

from shipyard.cli import app
from shipyard.gateway import create_app
from shipyard.router import Replica, ReplicaPool
from shipyard.router.discovery import UpstreamDiscovery
from shipyard.settings import SettingsError, load_settings
from shipyard.testing import FakeOpenAI
from shipyard.upstreams import DiscoveryTarget, parse_target
from tests.helpers import ServerThread, wait_for
from tests.stack import API_KEY


def test_parse_target() -> None:
    assert parse_target("dns+http://engine-blue:8000") == DiscoveryTarget("http", "engine-blue", 8000, "blue")
    assert parse_target("dns+https://e.svc.cluster.local#green") == DiscoveryTarget(
        "https", "e.svc.cluster.local", 443, "green"
    )
    assert DiscoveryTarget("http", "x", 8000).url("10.0.0.7") == "http://10.0.0.7:8000"
    assert DiscoveryTarget("http", "x", 8000).url("fd00::7") == "http://[fd00::7]:8000"
    for bad, message in (
        ("dns+ftp://x:1", "must look like"),
        ("dns+http://x:1/v1", "no path"),
        ("dns+http://x:99999", "invalid port"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_target(bad)


def test_replicas_follow_the_addresses_and_a_failed_lookup_changes_nothing() -> None:
    answers: list[list[str] | OSError] = [["10.0.0.1", "10.0.0.2"], ["10.0.0.2", "10.0.0.3"], OSError("no DNS"), []]

    async def resolver(host: str, port: int) -> list[str]:
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    static = Replica("http://10.9.9.9:8000", name="static")
    pool = ReplicaPool([static])
    discovery = UpstreamDiscovery(pool, [parse_target("dns+http://engine-green:8000#green")], resolver=resolver)

    def urls() -> list[str]:
        return sorted(r.url for r in pool.replicas)

    asyncio.run(discovery.refresh())
    assert urls() == ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.9.9.9:8000"]
    assert {r.deployment for r in pool.replicas if r is not static} == {"green"}
    kept = next(r for r in pool.replicas if r.url == "http://10.0.0.2:8000")
    asyncio.run(discovery.refresh())
    assert urls() == ["http://10.0.0.2:8000", "http://10.0.0.3:8000", "http://10.9.9.9:8000"]
    assert any(r is kept for r in pool.replicas), "a replica that stays keeps its state (readiness, in-flight)"
    asyncio.run(discovery.refresh())  # the lookup fails: nothing changes
    assert urls() == ["http://10.0.0.2:8000", "http://10.0.0.3:8000", "http://10.9.9.9:8000"]
    asyncio.run(discovery.refresh())  # the name resolves to nothing (every pod gone)
    assert urls() == ["http://10.9.9.9:8000"]


def test_gateway_routes_to_replicas_it_found_by_name() -> None:
    fake = FakeOpenAI("fake-model", default_tokens=3)
    with ServerThread(fake) as upstream:
        # "localhost" resolves through the system resolver, as a Service name does in a cluster
        settings = load_settings(
            api_keys=API_KEY, health_interval_s=0.2, upstreams=f"dns+http://localhost:{upstream.port}#blue"
        )
        with ServerThread(create_app(settings, [])) as gateway:
            assert wait_for(lambda: httpx.get(f"{gateway.url}/ready").status_code == 200, timeout=10)
            replicas = httpx.get(f"{gateway.url}/ready").json()["replicas"]
            ready = [r for r in replicas if r["ready"]]
            assert [r["name"] for r in ready] == [f"blue@http://127.0.0.1:{upstream.port}"]
            answer = httpx.post(
                f"{gateway.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {API_KEY}"},
                json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert answer.status_code == 200 and answer.headers["x-shipyard-deployment"] == "blue"


def test_bad_discovery_upstreams_are_clear_errors() -> None:
    with pytest.raises(SettingsError, match="must look like dns"):
        load_settings(upstreams="dns+ftp://x:1")
    result = CliRunner().invoke(app, ["serve", "--no-engine", "--upstream", "dns+http://x:1/v1", "--port", "0"])
    assert result.exit_code == 1 and "no path or query" in result.output
