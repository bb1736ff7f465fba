"""CPU per relayed token of one gateway process (issue 37): a fake engine streaming ``--tokens`` tokens per request
at ``--token-rate`` tokens/s per stream, ``--streams`` clients streaming one request after another through
``shipyard serve --no-engine``; the gateway process's CPU time over ``--seconds`` divided by the tokens relayed.

    .venv/bin/python benchmarks/relay_cpu.py [--streams 256] [--seconds 15]

Prints one line: streams/s, the gateway's share of a core, microseconds of CPU per relayed token.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time

import aiohttp
import psutil

from shipyard.engine import free_port
from shipyard.engine.process import wait_until_ready


async def load(url: str, body: dict[str, object], seconds: float, streams: int) -> int:
    """Requests completed by ``streams`` clients streaming one after another for ``seconds``."""
    end, done = time.monotonic() + seconds, 0
    async with aiohttp.ClientSession(headers={"authorization": "Bearer sk-relay"}) as session:

        async def client() -> None:
            nonlocal done
            while time.monotonic() < end:
                async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                    async for _ in response.content:
                        pass
                done += 1

        await asyncio.gather(*(client() for _ in range(streams)))
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--token-rate", type=float, default=50.0)
    args = parser.parse_args()
    engine_port, gateway_port = free_port(), free_port()
    data = tempfile.mkdtemp(prefix="relay-cpu-")
    fake = subprocess.Popen(
        [sys.executable, "-m", "shipyard.testing.fake_openai", "--port", str(engine_port), "--model", "fake"]
        + ["--token-rate", str(args.token_rate)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    gateway = subprocess.Popen(
        [sys.executable, "-m", "shipyard.cli", "serve", "--no-engine", "--upstream", f"http://127.0.0.1:{engine_port}"]
        + ["--port", str(gateway_port)],
        env={**os.environ, "SHIPYARD_API_KEYS": "sk-relay", "SHIPYARD_DATA_DIR": data},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{gateway_port}"
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": args.tokens, "stream": True}
    try:
        wait_until_ready(gateway, url, 60, "gateway", poll_s=0.1)
        asyncio.run(load(url, body, 3, args.streams))  # warm
        process = psutil.Process(gateway.pid)
        cpu, started = sum(process.cpu_times()[:2]), time.monotonic()
        done = asyncio.run(load(url, body, args.seconds, args.streams))
        cpu, elapsed = sum(process.cpu_times()[:2]) - cpu, time.monotonic() - started
        print(
            f"{done / elapsed:.1f} streams/s, gateway {100 * cpu / elapsed:.0f}% of a core, "
            f"{1e6 * cpu / (done * args.tokens):.1f} us per token"
        )
    finally:
        gateway.send_signal(signal.SIGINT)
        fake.terminate()
        gateway.wait(30)
        fake.wait(10)


if __name__ == "__main__":
    main()
