"""Rollouts and crash recovery end to end, with fake engines as real processes behind a real gateway."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from shipyard.bench.rollout_load import StreamingClients
from shipyard.engine import EngineProcess, EngineSpec
from shipyard.engine.launcher import EngineLauncher
from shipyard.gateway import create_app
from shipyard.router import Replica
from shipyard.settings import load_settings
from tests.helpers import ServerThread, healthy, wait_for

KEY, ADMIN = "sk-user", "sk-admin"
FAKE = [sys.executable, "-m", "shipyard.testing.fake_openai", "--token-rate", "200", "--ttft", "0.05"]


@dataclass
class Fleet:
    url: str
    launcher: EngineLauncher
    app_state: object
    tmp: Path

    def admin(self, method: str, path: str, body: object = None, key: str = ADMIN) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, self.url + path, json=body, headers=headers, timeout=30)

    def chat(self, session: str | None = None, **extra: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}", **({"x-session-id": session} if session else {})}
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
        return httpx.post(self.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)

    def model_folder(self, name: str) -> str:
        folder = self.tmp / name
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text("{}")
        return str(folder)

    def wait_phase(self, *phases: str, timeout: float = 60) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = self.admin("GET", "/admin/rollouts/current").json()
            if current["phase"] in phases:
                return current  # type: ignore[no-any-return]
            time.sleep(0.05)
        raise AssertionError(f"rollout still {current['phase']}: {current}")

    def processes(self) -> list[EngineProcess]:
        handles = self.app_state.control.supervisor.handles.values()  # type: ignore[attr-defined]
        return [h.process for h in handles]


def start_fleet(tmp: Path, blue_replicas: int = 1, **overrides: object) -> Iterator[Fleet]:
    spec = EngineSpec(model=str(tmp / "v1"), served_model_name="m")
    (tmp / "v1").mkdir()
    (tmp / "v1" / "config.json").write_text("{}")
    launcher = EngineLauncher(spec, tmp / "logs", command=FAKE, ready_timeout_s=30)
    processes = [EngineProcess(spec, tmp / "logs" / f"blue-{i}.log", command=FAKE) for i in range(blue_replicas)]
    for process in processes:
        process.start()
    for process in processes:
        process.wait_ready(30)
    replicas = [Replica(p.url, name=f"blue-v1-{i}", deployment="blue", version="v1") for i, p in enumerate(processes)]
    values: dict[str, object] = {
        "api_keys": KEY,
        "admin_keys": ADMIN,
        "health_interval_s": 0.2,
        "drain_timeout_s": 10,
        "restart_backoff_s": 0.2,
        "data_dir": tmp / "data",
        "gate_dataset": Path(__file__).resolve().parents[1] / "data/intent/test.jsonl",
    }
    settings = load_settings(**{**values, **overrides})
    managed = {r.name: launcher.handle(p) for r, p in zip(replicas, processes, strict=True)}
    app = create_app(settings, replicas, launcher=launcher, managed=managed)
    try:
        with ServerThread(app) as server:
            assert wait_for(lambda: httpx.get(f"{server.url}/ready").status_code == 200)
            yield Fleet(server.url, launcher, app.state, tmp)
    finally:
        for handle in list(app.state.control.supervisor.handles.values()):
            handle.process.stop(grace_s=2)
        for process in processes:
            process.stop(grace_s=2)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from start_fleet(tmp_path)


@pytest.fixture
def fleet_of_two(tmp_path: Path) -> Iterator[Fleet]:
    yield from start_fleet(tmp_path, blue_replicas=2)


@pytest.fixture
def fleet_without_gate_data(tmp_path: Path) -> Iterator[Fleet]:
    yield from start_fleet(tmp_path, gate_dataset=tmp_path / "missing.jsonl")


def test_blue_green_under_streaming_load_loses_nothing(fleet: Fleet) -> None:
    blue = fleet.processes()[0]
    with StreamingClients(fleet.url, KEY, "m", clients=16, max_tokens=20) as load:
        time.sleep(1.0)
        accepted = fleet.admin("POST", "/admin/rollouts", {"target": fleet.model_folder("v2"), "version": "v2"})
        assert accepted.status_code == 202, accepted.text
        done = fleet.wait_phase("done", "failed")
        time.sleep(1.0)
    summary = load.summary()
    assert done["phase"] == "done", done
    assert summary["failed"] == 0 and summary["truncated"] == 0, summary
    assert summary["served_by_version"].keys() == {"v1", "v2"}
    assert done["facts"]["switch_s"] <= 1.0  # type: ignore[index]
    durations = done["durations_s"]
    assert set(durations) >= {"starting", "warming", "switching", "draining", "done"}  # type: ignore[arg-type]
    assert not blue.alive()
    described = fleet.admin("GET", "/admin/deployments").json()
    assert list(described["deployments"]) == ["green"] and fleet.chat().headers["x-shipyard-version"] == "v2"
    audit = (fleet.tmp / "data" / "audit.jsonl").read_text()
    assert '"action": "rollout_requested"' in audit and '"who": "admin:' in audit and '"phase": "done"' in audit


def test_canary_share_stickiness_and_rollback(fleet: Fleet) -> None:
    r = fleet.admin(
        "POST", "/admin/rollouts", {"target": fleet.model_folder("v2"), "version": "v2", "canary_percent": 10}
    )
    assert r.status_code == 202, r.text
    fleet.wait_phase("canary")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        versions = Counter(pool.map(lambda _: fleet.chat().headers["x-shipyard-version"], range(1000)))
    assert 70 <= versions["v2"] <= 130, versions  # 10 ± 3 %
    for session in ("alice", "bob", "carol"):
        assert len({fleet.chat(session=session).headers["x-shipyard-version"] for _ in range(20)}) == 1
    assert fleet.admin("POST", "/admin/rollouts/current/rollback").json()["phase"] == "rolled_back"
    assert {fleet.chat().headers["x-shipyard-version"] for _ in range(50)} == {"v1"}
    assert wait_for(lambda: len(fleet.processes()) == 1, timeout=15)


def test_failed_gate_leaves_the_old_version_serving(fleet: Fleet) -> None:
    r = fleet.admin(
        "POST",
        "/admin/rollouts",
        {"target": fleet.model_folder("v2"), "version": "v2", "gate": "intent:min_acc=0.9,n=8"},
    )
    assert r.status_code == 202
    failed = fleet.wait_phase("failed", "done")
    assert failed["phase"] == "failed" and "quality gate failed" in str(failed["error"])
    assert failed["facts"]["gate_n"] == 8  # type: ignore[index]
    assert wait_for(lambda: len(fleet.processes()) == 1, timeout=15)
    assert fleet.chat().headers["x-shipyard-version"] == "v1"


def test_bad_admin_input_changes_nothing(fleet: Fleet) -> None:
    before = fleet.admin("GET", "/admin/deployments").json()
    target = fleet.model_folder("v2")
    cases = [
        ({"target": target}, KEY, 401, "invalid API key"),
        ({"target": target}, "", 401, "missing API key"),
        ({"target": str(fleet.tmp / "nope")}, ADMIN, 400, "does not exist"),
        ({"target": target, "gate": "intent:min_acc=2"}, ADMIN, 400, "min_acc"),
        ({"target": target, "gate": "reply:min_acc=0.5"}, ADMIN, 400, "not supported"),
        ({"target": target, "canary_percent": 150}, ADMIN, 400, "between 0 and 100"),
        ({"target": target, "version": "v1"}, ADMIN, 409, "already served"),
        ({"target": target, "lora": True}, ADMIN, 400, "not a LoRA adapter folder"),
        ({"target": target, "surprise": 1}, ADMIN, 422, "surprise"),
    ]
    for body, key, status, fragment in cases:
        r = fleet.admin("POST", "/admin/rollouts", body, key=key)
        assert r.status_code == status and fragment in r.json()["error"]["message"], (body, r.text)
    assert fleet.admin("POST", "/admin/rollouts/current/promote").status_code == 409
    assert fleet.admin("POST", "/admin/rollouts/current/rollback").status_code == 409
    assert fleet.admin("GET", "/admin/rollouts/current").status_code == 404
    assert fleet.admin("GET", "/admin/deployments").json() == before

    assert fleet.admin("POST", "/admin/rollouts", {"target": target, "canary_percent": 5}).status_code == 202
    second = fleet.admin("POST", "/admin/rollouts", {"target": fleet.model_folder("v3")})
    assert second.status_code == 409 and "still" in second.json()["error"]["message"]


def test_gate_that_cannot_run(fleet_without_gate_data: Fleet) -> None:
    fleet = fleet_without_gate_data
    r = fleet.admin("POST", "/admin/rollouts", {"target": fleet.model_folder("v2"), "gate": "intent:min_acc=0.5"})
    assert r.status_code == 400 and "cannot run" in r.json()["error"]["message"]


def test_lora_hot_load_switches_the_alias_in_place(fleet: Fleet) -> None:
    adapter = fleet.tmp / "adapter-v2"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with StreamingClients(fleet.url, KEY, "m", clients=8, max_tokens=10) as load:
        time.sleep(0.5)
        started = time.monotonic()
        assert (
            fleet.admin("POST", "/admin/rollouts", {"target": str(adapter), "version": "v2", "lora": True}).status_code
            == 202
        )
        done = fleet.wait_phase("done", "failed")
        serving_after = time.monotonic() - started
        time.sleep(0.5)
    assert done["phase"] == "done", done["error"]
    assert serving_after < 2.0
    assert load.summary()["failed"] == 0, load.summary()
    assert fleet.admin("GET", "/admin/deployments").json()["aliases"] == {"m": "m@v2"}
    response = fleet.chat()
    assert response.status_code == 200 and response.json()["model"] == "m@v2"


def test_crashed_replica_requests_move_and_it_restarts(fleet_of_two: Fleet) -> None:
    fleet = fleet_of_two
    victim = fleet.processes()[0]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(fleet.chat) for _ in range(8)]
        time.sleep(0.02)  # accepted, waiting for their first token (ttft 50 ms)
        os.kill(victim.pid or 0, signal.SIGKILL)
        results = [f.result() for f in futures]
        results += list(pool.map(lambda _: fleet.chat(), range(40)))
    assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200]
    assert "shipyard_retries_total" in httpx.get(f"{fleet.url}/metrics").text

    def replicas() -> list[dict[str, object]]:
        return fleet.admin("GET", "/admin/deployments").json()["deployments"]["blue"]["replicas"]  # type: ignore[no-any-return]

    assert wait_for(lambda: victim.alive() and healthy(victim.url), timeout=20)
    assert [r["restarts"] for r in replicas()].count(1) == 1
    assert wait_for(lambda: all(r["ready"] for r in replicas()), timeout=10)


def test_deploy_and_rollout_cli(fleet: Fleet) -> None:
    from typer.testing import CliRunner

    from shipyard.cli import app

    runner = CliRunner()
    gateway = ["--gateway", fleet.url, "--admin-key", ADMIN]
    result = runner.invoke(app, ["deploy", fleet.model_folder("v2"), "--version", "v2", *gateway])
    assert result.exit_code == 0, result.output
    assert "accepted" in result.stdout and "[done]" in result.stdout and "switch_s=" in result.stdout
    status = runner.invoke(app, ["rollout", "status", *gateway])
    assert status.exit_code == 0 and "green: weight 1.00" in status.stdout and "version=v2" in status.stdout
    for args, fragment in [
        (["rollout", "promote", *gateway], "no canary to promote"),
        (["deploy", fleet.model_folder("v3"), "--gateway", fleet.url, "--admin-key", KEY], "invalid API key"),
        (["deploy", "/nonexistent", *gateway], "does not exist"),
        (["rollout", "status", "--gateway", "http://127.0.0.1:9", "--admin-key", ADMIN], "cannot reach"),
    ]:
        failed = runner.invoke(app, args)
        assert failed.exit_code == 1, failed.output
        assert failed.stderr.strip().startswith("error: ") and fragment in failed.stderr, failed.stderr


def test_bench_rollout_scenario_records_a_blue_green_under_load(fleet: Fleet) -> None:
    from typer.testing import CliRunner

    from shipyard.cli import app

    out = fleet.tmp / "bench"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            *("--url", fleet.url, "--api-key", KEY, "--admin-key", ADMIN, "--scenario", "rollout"),
            *("--deploy", fleet.model_folder("v2"), "--deploy-version", "v2", "--concurrency", "8"),
            *("--duration", "6", "--warmup", "0.5", "--rollout-at", "1", "--output-tokens", "10"),
            *("--system-tokens", "16", "--no-resources", "--out", str(out)),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    run = summary["runs"][0]
    assert summary["rollout_phase"] == "done" and run["errors"] == 0, run["error_samples"]
    assert set(run["served_by"]) == {"blue/v1", "green/v2"}
    assert (out / "timeline.png").stat().st_size > 0 and "timeline.png" in (out / "report.md").read_text()


def test_a_registered_name_and_version_is_a_rollout_target(fleet: Fleet) -> None:
    from shipyard.prepare.registry import Registry

    registry = Registry(fleet.tmp / "data" / "models")
    with registry.new_version("bot", "v7", scheme="bf16") as folder:
        (folder / "config.json").write_text("{}")
    unknown = fleet.admin("POST", "/admin/rollouts", {"target": "bot:v9"})
    assert unknown.status_code == 400 and "bot" in unknown.json()["error"]["message"], unknown.text
    accepted = fleet.admin("POST", "/admin/rollouts", {"target": "bot:v7"})
    assert accepted.status_code == 202, accepted.text
    rollout = accepted.json()
    assert rollout["version"] == "v7" and rollout["target"] == str(registry.resolve("bot:v7"))
    assert rollout["strategy"] == "blue-green" and "not in place" in rollout["strategy_reason"]
    assert fleet.wait_phase("done", "failed")["phase"] == "done"
    assert fleet.chat().headers["x-shipyard-version"] == "v7"


def test_scaling_by_hand_adds_a_warm_replica_and_drains_one_away_under_streaming_load(fleet: Fleet) -> None:
    """Promise (issue 35): `shipyard scale` out starts, warms and then routes to a new engine; in drains the
    cheapest replica and stops it; streams running throughout lose nothing."""
    from typer.testing import CliRunner

    from shipyard.cli.app import app

    def scale(*args: str) -> str:
        result = CliRunner().invoke(app, ["scale", *args, "--gateway", fleet.url, "--admin-key", ADMIN])
        assert result.exit_code == 0, result.output
        return result.output

    def serving() -> int:
        return int(fleet.admin("GET", "/admin/scale").json()["replicas"]["serving"])

    with StreamingClients(fleet.url, KEY, "m", clients=8, max_tokens=20) as load:
        time.sleep(0.5)
        assert "-> 2 replicas" in scale("--replicas", "2")
        assert wait_for(lambda: serving() == 2, timeout=60)
        ready = [r for r in httpx.get(f"{fleet.url}/ready").json()["replicas"] if r["ready"] and not r["rotation"]]
        assert len(ready) == 2
        time.sleep(1.0)
        scale("--replicas", "1")
        assert wait_for(lambda: serving() == 1 and len(fleet.processes()) == 1, timeout=60)
        time.sleep(0.5)
    summary = load.summary()
    assert summary["failed"] == 0 and summary["truncated"] == 0, summary
    entries = [json.loads(line) for line in (fleet.tmp / "data" / "audit.jsonl").read_text().splitlines()]
    actions = [e["action"] for e in entries]
    assert "replica_added" in actions and "replica_removed" in actions
    assert next(e for e in entries if e["action"] == "replica_removed")["cut_in_flight"] == 0
    refused = CliRunner().invoke(app, ["scale", "--auto", "--gateway", fleet.url, "--admin-key", ADMIN])
    assert refused.exit_code != 0 and "no autoscale" in refused.output
