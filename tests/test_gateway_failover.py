"""Replica failures seen from the gateway: refused connections, and an upstream process killed mid-stream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import openai

from shipyard.engine import free_port
from shipyard.gateway import create_app
from shipyard.router import Replica
from shipyard.settings import load_settings
from shipyard.testing import FakeOpenAI
from tests.helpers import ServerThread, healthy, outcomes_when_killed, wait_for
from tests.stack import API_KEY

MESSAGES = [{"role": "user", "content": "hi"}]


def test_refused_replica_is_skipped_and_marked_unready() -> None:
    fake = FakeOpenAI("m")
    # least-busy picks the first listed on a tie, so the dead replica is tried (cache-aware would send this one
    # conversation to whichever replica it hashes to)
    settings = load_settings(api_keys=API_KEY, health_interval_s=30, routing="least-busy")
    with ServerThread(fake) as live:
        dead = Replica(f"http://127.0.0.1:{free_port()}", name="dead")
        app = create_app(settings, [dead, Replica(live.url, name="live")])
        with ServerThread(app) as gw:
            # Pretend the dead replica looked healthy at the last probe.
            dead.ready, dead.models = True, {"m": 2048}
            client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=API_KEY, max_retries=0)
            for _ in range(3):
                assert client.chat.completions.create(model="m", messages=MESSAGES).choices
            assert not dead.ready and "ConnectError" in dead.last_error
            metrics = httpx.get(f"{gw.url}/metrics").text
            assert 'shipyard_upstream_errors_total{kind="connect",replica="dead"} 1.0' in metrics


def test_killed_upstream_gives_every_stream_an_error_within_2s() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shipyard.testing.fake_openai",
            "--port",
            str(port),
            "--model",
            "m",
            "--token-rate",
            "20",
        ],
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: healthy(url), timeout=20)
        settings = load_settings(api_keys=API_KEY, health_interval_s=0.5)
        with ServerThread(create_app(settings, [Replica(url, name="fake")])) as gw:
            assert wait_for(lambda: httpx.get(f"{gw.url}/ready").status_code == 200)
            client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=API_KEY, max_retries=0)
            outcomes, killed_at = outcomes_when_killed(
                lambda: client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=500, stream=True),
                streams=8,
                kill=lambda: os.killpg(proc.pid, signal.SIGKILL),
            )
            assert len(outcomes) == 8
            assert all("upstream" in what for what, _ in outcomes), outcomes
            assert max(at for _, at in outcomes) - killed_at < 2.0
            assert wait_for(lambda: httpx.get(f"{gw.url}/ready").status_code == 503, timeout=2)
            assert httpx.get(f"{gw.url}/health").status_code == 200
            assert "shipyard_upstream_errors_total" in httpx.get(f"{gw.url}/metrics").text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_every_replica_refusing_gives_503_not_500() -> None:
    settings = load_settings(api_keys=API_KEY, health_interval_s=30)
    dead = [Replica(f"http://127.0.0.1:{free_port()}", name=f"dead-{i}") for i in range(2)]
    with ServerThread(create_app(settings, dead)) as gw:
        for replica in dead:  # pretend both looked healthy at the last probe
            replica.ready, replica.models = True, {"m": 2048}
        for stream in (False, True):
            r = httpx.post(
                f"{gw.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {API_KEY}"},
                json={"model": "m", "messages": MESSAGES, "stream": stream},
            )
            assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
            assert r.json()["error"]["type"] == "service_unavailable"
            for replica in dead:
                replica.ready = True
