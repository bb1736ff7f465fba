"""`shipyard serve --workers 2` as a process with a fake engine: both processes serve the port, the worker follows
a rollout run by the primary (through the admin API forwarded from whichever process took the request), metrics
add up across processes, a dead worker is started again, and a stop leaves nothing behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from shipyard.engine import free_port
from shipyard.stack import shipyard_engines
from tests.helpers import wait_for
from tests.test_stack import ready, serve_env, shipyard

USER = {"Authorization": "Bearer sk-u"}
ADMIN = {"Authorization": "Bearer sk-a"}


def workers_of(primary: psutil.Process) -> list[psutil.Process]:
    found = []
    for child in primary.children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def model_folder(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_serve_with_two_workers_shares_the_port_follows_rollouts_and_stops_whole(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    v1, v2 = model_folder(tmp_path, "v1"), model_folder(tmp_path, "v2")
    port = free_port()
    command = [sys.executable, "-m", "shipyard.cli", "serve", "--model", str(v1), "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--workers", "2"],
        env=serve_env(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"

    def chat() -> httpx.Response:  # a new connection each time: the kernel hands it to either process
        body = {"model": "v1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        return httpx.post(f"{url}/v1/chat/completions", json=body, headers=USER, timeout=30)

    try:
        assert wait_for(lambda: ready(url), timeout=90), proc.stdout
        primary = psutil.Process(proc.pid)
        assert wait_for(lambda: len(workers_of(primary)) == 1, timeout=30)
        (worker,) = workers_of(primary)
        loads = data_dir / "state" / "loads"
        assert wait_for(lambda: len(list(loads.glob("*.json"))) == 1, timeout=30)  # the worker reports its load

        answers = [chat() for _ in range(40)]
        assert [a.status_code for a in answers] == [200] * 40
        counted = {p.name for p in (data_dir / "metrics").glob("counter_*.db")}
        assert {f"counter_{proc.pid}.db", f"counter_{worker.pid}.db"} <= counted  # both answered some
        for _ in range(6):  # whichever process answers the scrape adds up both
            scrape = httpx.get(f"{url}/metrics", timeout=10).text
            served = [line for line in scrape.splitlines() if line.startswith("shipyard_requests_total{")]
            assert sum(float(line.rsplit(" ", 1)[1]) for line in served if 'route="chat"' in line) == 40
            assert 'shipyard_deployment_weight{deployment="blue",model="v1"} 1.0' in scrape
            assert 'shipyard_gc_pause_seconds_count{generation="0"}' in scrape  # each serving process times its GC
            assert "/admin/rollouts" in httpx.get(f"{url}/openapi.json", timeout=10).json()["paths"]

        body = {"target": str(v2), "version": "v2", "strategy": "blue-green"}
        accepted = httpx.post(f"{url}/admin/rollouts", json=body, headers=ADMIN, timeout=30)
        assert accepted.status_code == 202, accepted.text
        phase = ""
        deadline = time.monotonic() + 90
        while phase != "done" and time.monotonic() < deadline:
            phase = httpx.get(f"{url}/admin/rollouts/current", headers=ADMIN, timeout=10).json()["phase"]
            time.sleep(0.1)
        assert phase == "done"
        time.sleep(0.5)  # the worker applies the last revision within state_watch_interval_s
        assert {chat().headers["x-shipyard-version"] for _ in range(20)} == {"v2"}
        refused = httpx.post(f"{url}/admin/rollouts", json={"target": "x"}, headers=USER, timeout=10)
        assert refused.status_code == 401 and "error" in refused.json()  # forwarded, and answered by the primary

        worker.kill()  # a worker that dies is started again; the port keeps serving
        assert wait_for(lambda: [w.pid for w in workers_of(primary)] not in ([], [worker.pid]), timeout=30)
        assert [chat().status_code for _ in range(10)] == [200] * 10
        (restarted,) = workers_of(primary)

        proc.send_signal(signal.SIGTERM)  # a deliberate stop: workers and engines go with the primary
        proc.wait(timeout=60)
        assert wait_for(lambda: not psutil.pid_exists(restarted.pid), timeout=10)
        assert wait_for(lambda: not shipyard_engines(data_dir), timeout=30)
        assert not (data_dir / "gateway.sock").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        shipyard(data_dir, "stop")
