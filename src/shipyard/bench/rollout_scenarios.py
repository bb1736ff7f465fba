"""Rollout scenarios against a running gateway (with an admin key): the measurements behind the update story.

Each function drives the admin API while ``StreamingClients`` keep the gateway busy, and returns what it saw.
Used by ``benchmarks/rollout_cpu.py`` (report) and by the integration tests (assertions).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections import Counter
from typing import Any

import httpx

from shipyard.bench.rollout_load import StreamingClients


class Admin:
    def __init__(self, gateway: str, admin_key: str, api_key: str, model: str) -> None:
        self.gateway = gateway.rstrip("/")
        self.headers = {"Authorization": f"Bearer {admin_key}"}
        self.user = {"Authorization": f"Bearer {api_key}"}
        self.api_key = api_key
        self.model = model
        # one client for every call (thread-safe): a new one per request builds an SSL context, ~40 ms of CPU
        self.http = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.http.post(self.gateway + path, json=body, headers=self.headers, timeout=60)
        if response.status_code >= 400:
            raise RuntimeError(f"{path}: HTTP {response.status_code} {response.text}")
        return response.json()  # type: ignore[no-any-return]

    def get(self, path: str) -> dict[str, Any]:
        return self.http.get(self.gateway + path, headers=self.headers, timeout=60).json()  # type: ignore[no-any-return]

    def wait(self, *phases: str, timeout: float = 900) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rollout = self.get("/admin/rollouts/current")
            if rollout["phase"] in phases:
                return rollout
            time.sleep(0.1)
        raise TimeoutError(f"rollout still {rollout['phase']} after {timeout}s")

    def chat(self, session: str | None = None, max_tokens: int = 1) -> httpx.Response:
        headers = {**self.user, **({"x-session-id": session} if session else {})}
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
        }
        return self.http.post(self.gateway + "/v1/chat/completions", json=body, headers=headers, timeout=120)


def blue_green(
    admin: Admin, target: str, version: str, clients: int = 16, strategy: str = "blue-green"
) -> dict[str, Any]:
    """A full-model update under ``clients`` streams (blue-green by default; ``strategy="inplace"`` reloads)."""
    with StreamingClients(admin.gateway, admin.api_key, admin.model, clients=clients, max_tokens=24) as load:
        time.sleep(3)
        admin.post("/admin/rollouts", {"target": target, "version": version, "strategy": strategy})
        rollout = admin.wait("done", "failed")
        time.sleep(3)
    if rollout["phase"] == "failed":
        raise RuntimeError(f"{strategy} rollout failed: {rollout['error']}")
    return {"rollout": rollout, "load": load.summary()}


def canary(admin: Admin, target: str, version: str, percent: float = 10, requests: int = 1000) -> dict[str, Any]:
    admin.post("/admin/rollouts", {"target": target, "version": version, "canary_percent": percent})
    rollout = admin.wait("canary", "failed")
    if rollout["phase"] == "failed":
        raise RuntimeError(f"canary rollout failed: {rollout['error']}")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: admin.chat(), range(requests)))
    served = Counter(a.headers.get("x-shipyard-version", "?") for a in answers)
    sticky = {
        session: sorted({admin.chat(session=session).headers.get("x-shipyard-version", "?") for _ in range(10)})
        for session in ("alice", "bob", "carol", "dave", "erin")
    }
    return {
        "rollout": rollout,
        "requests": requests,
        "errors": sum(a.status_code != 200 for a in answers),
        "served_by_version": dict(served),
        "canary_share": served.get(version, 0) / requests,
        "sticky_sessions": sticky,
    }


def kill_replica(admin: Admin, pid: int, replica_name: str, clients: int = 16, timeout: float = 600) -> dict[str, Any]:
    """SIGKILL one engine under streaming + non-streaming load; see what moved, what failed, when it came back."""
    retries_before = _retries(admin)
    with StreamingClients(admin.gateway, admin.api_key, admin.model, clients=clients, max_tokens=24) as load:
        time.sleep(3)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            # Non-streaming requests still generating when the engine dies: nothing reached their clients yet.
            pending = [pool.submit(admin.chat, None, 64) for _ in range(16)]
            time.sleep(0.5)
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            answers = [f.result() for f in pending]
        back_at = None
        while time.monotonic() - killed_at < timeout:
            replicas = [r for d in admin.get("/admin/deployments")["deployments"].values() for r in d["replicas"]]
            mine = next(r for r in replicas if r["name"] == replica_name)
            if mine["ready"] and mine["restarts"] >= 1:
                back_at = time.monotonic()
                break
            time.sleep(0.5)
        time.sleep(2)
    return {
        "non_streaming_sent_at_kill": len(answers),
        "non_streaming_errors": sum(a.status_code != 200 for a in answers),
        "non_streaming_error_samples": sorted({a.text[:300] for a in answers if a.status_code != 200})[:3],
        "moved_to_another_replica": _retries(admin) - retries_before,
        "streams": load.summary(),
        "restarted_after_s": None if back_at is None else round(back_at - killed_at, 1),
    }


def lora_hot_load(admin: Admin, adapter: str, version: str, clients: int = 16) -> dict[str, Any]:
    with StreamingClients(admin.gateway, admin.api_key, admin.model, clients=clients, max_tokens=24) as load:
        time.sleep(3)
        started = time.monotonic()
        admin.post("/admin/rollouts", {"target": adapter, "version": version, "lora": True})
        rollout = admin.wait("done", "failed")
        done_after_s = time.monotonic() - started
        time.sleep(3)
    return {
        "rollout": rollout,
        # When the served name pointed at the new adapter (from the rollout's own history), and when it was done.
        "serving_after_s": next((h["at_s"] for h in rollout["history"] if h["phase"] == "switching"), None),
        "done_after_s": round(done_after_s, 3),
        "load": load.summary(),
        "aliases": admin.get("/admin/deployments")["aliases"],
    }


def _retries(admin: Admin) -> float:
    text = httpx.get(admin.gateway + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("shipyard_retries_total"))
