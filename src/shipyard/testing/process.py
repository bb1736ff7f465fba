"""Waiting for a ``shipyard serve`` started as a subprocess (benchmarks and harnesses start it as users do)."""

from __future__ import annotations

import subprocess
import time

import httpx


def wait_until_ready(
    proc: subprocess.Popen[bytes], url: str, timeout_s: float, log_hint: str, poll_s: float = 1.0
) -> None:
    """Poll ``url``/ready every ``poll_s`` until it answers 200; RuntimeError (naming ``log_hint``) if the process
    exits first or ``timeout_s`` passes. A refused or dropped connection is simply "not yet"."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"shipyard serve exited {proc.returncode}; see {log_hint}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise RuntimeError(f"shipyard serve at {url} not ready after {timeout_s:.0f} s; see {log_hint}")
