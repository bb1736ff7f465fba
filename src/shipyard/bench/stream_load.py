"""Closed-loop streaming load against an OpenAI-compatible endpoint: N clients, each sending the next request
as soon as its last stream ends. Per request: time to first token, end-to-end time, tokens, errors.

Uses aiohttp (as vLLM's own ``vllm bench serve`` does) so the load generator costs little CPU per token.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from shipyard.bench.stats import summarize


@dataclass
class RequestRecord:
    started: float
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    status: int = 0
    error: str | None = None
    done: bool = False
    """The stream ended with ``data: [DONE]`` (a stream that ends without it, or an error, was cut short)."""
    deployment: str | None = None
    version: str | None = None
    token_times: list[float] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.done

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Slo:
    """Service-level objective for goodput: a request counts if it succeeded within both limits."""

    ttft_ms: float | None = None
    e2e_ms: float | None = None

    def met_by(self, record: RequestRecord) -> bool:
        if not record.ok:
            return False
        if self.ttft_ms is not None and (record.ttft_s is None or record.ttft_s * 1000 > self.ttft_ms):
            return False
        return not (self.e2e_ms is not None and (record.e2e_s is None or record.e2e_s * 1000 > self.e2e_ms))


def parse_slo(spec: str) -> Slo:
    """``ttft=200,e2e=2000`` (milliseconds) -> Slo; ValueError names what is wrong."""
    values: dict[str, float] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("ttft", "e2e"):
            raise ValueError(f"SLO part {part!r} is not ttft=MS or e2e=MS")
        try:
            values[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"SLO value {value!r} is not a number of milliseconds") from None
    return Slo(values.get("ttft"), values.get("e2e"))


@dataclass
class LoadResult:
    concurrency: int | None
    window_s: float
    records: list[RequestRecord]
    rate: float | None = None
    slo: Slo | None = None

    def summary(self) -> dict[str, Any]:
        """Aggregates of the requests started inside the window; failed ones stay in every denominator."""
        measured = [r for r in self.records if 0 <= r.started < self.window_s]
        ok = [r for r in measured if r.ok]
        tokens_in_window = sum(1 for r in self.records for t in r.token_times if 0 <= t <= self.window_s)

        def ms(values: list[float | None]) -> dict[str, float]:
            return {k: v * 1000 for k, v in summarize([v for v in values if v is not None]).items()}

        load: dict[str, Any] = {"rate": self.rate} if self.rate is not None else {"concurrency": self.concurrency}
        meeting = sum(self.slo.met_by(r) for r in measured) if self.slo else len(ok)
        return {
            **load,
            "window_s": self.window_s,
            "requests": len(measured),
            "errors": len(measured) - len(ok),
            "ttft_ms": ms([r.ttft_s for r in ok]),
            "tpot_ms": ms([r.tpot_s for r in ok]),
            "e2e_ms": ms([r.e2e_s for r in ok]),
            "request_per_s": len(ok) / self.window_s,
            "output_tok_per_s": tokens_in_window / self.window_s,
            "goodput": meeting / self.window_s,
            "goodput_fraction": meeting / len(measured) if measured else 0.0,
            "error_samples": sorted({r.error or f"HTTP {r.status}" for r in measured if not r.ok})[:5],
        }


def streaming_chat_request(
    base_url: str, api_key: str, model: str, max_tokens: int, prompt: str
) -> tuple[str, bytes, dict[str, str]]:
    """URL, body and headers of one streaming chat request with a fixed output length (``ignore_eos``)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    return base_url.rstrip("/") + "/v1/chat/completions", json.dumps(body).encode(), headers


async def _one_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], origin: float
) -> RequestRecord:
    start = time.perf_counter()
    record = RequestRecord(started=start - origin)
    try:
        async with session.post(url, data=body, headers=headers) as response:
            record.status = response.status
            record.deployment = response.headers.get("x-shipyard-deployment")
            record.version = response.headers.get("x-shipyard-version")
            if response.status != 200:
                record.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return record
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                if line.startswith(b"data: [DONE]"):
                    record.done = True
                    break
                now = time.perf_counter()
                if b'"error"' in line and b'"choices"' not in line:
                    record.error = json.loads(line[6:]).get("error", {}).get("message", "stream error")
                    break
                if b'"content":""' in line or b'"choices":[]' in line:
                    continue  # role-only or usage-only chunk: no token
                if record.ttft_s is None:
                    record.ttft_s = now - start
                record.output_tokens += 1
                record.token_times.append(now - origin)
            record.e2e_s = time.perf_counter() - start
            if record.error is None and not record.done:
                record.error = "stream ended without [DONE] (truncated)"
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    return record


async def run_closed_loop(
    base_url: str,
    *,
    api_key: str,
    model: str,
    concurrency: int,
    max_tokens: int,
    duration_s: float,
    warmup_s: float = 2.0,
    prompt: str = "Tell me a story.",
    slo: Slo | None = None,
) -> LoadResult:
    """Keep ``concurrency`` streams busy for ``warmup_s + duration_s``; measure the last ``duration_s``.

    Requests started during warm-up are excluded (their ``started`` is negative); requests still running when
    the window closes are awaited, and their tokens after the window do not count towards throughput.
    """
    url, body, headers = streaming_chat_request(base_url, api_key, model, max_tokens, prompt)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    records: list[RequestRecord] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        origin = time.perf_counter() + warmup_s
        deadline = origin + duration_s

        async def client() -> None:
            while time.perf_counter() < deadline:
                records.append(await _one_stream(session, url, body, headers, origin))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return LoadResult(concurrency, duration_s, [r for r in records if r.started < duration_s], slo=slo)


def arrival_offsets(rate: float, duration_s: float, arrival: str = "poisson", seed: int = 0) -> list[float]:
    """Start times (seconds from the origin) of an open-loop run: Poisson or evenly spaced at ``rate``/s."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    if arrival == "constant":
        return [i / rate for i in range(int(duration_s * rate))]
    if arrival != "poisson":
        raise ValueError(f"arrival must be poisson or constant, not {arrival!r}")
    rng = random.Random(seed)
    offsets, t = [], rng.expovariate(rate)
    while t < duration_s:
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


async def run_open_loop(
    base_url: str,
    *,
    api_key: str,
    model: str,
    rate: float,
    max_tokens: int,
    duration_s: float,
    arrival: str = "poisson",
    seed: int = 0,
    prompt: str = "Tell me a story.",
    slo: Slo | None = None,
) -> LoadResult:
    """Send requests at ``rate`` per second whatever the server does (open loop), for ``duration_s``."""
    url, body, headers = streaming_chat_request(base_url, api_key, model, max_tokens, prompt)
    offsets = arrival_offsets(rate, duration_s, arrival, seed)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        origin = time.perf_counter()

        async def at(offset: float) -> RequestRecord:
            delay = origin + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            return await _one_stream(session, url, body, headers, origin)

        records = await asyncio.gather(*(at(offset) for offset in offsets))
    return LoadResult(None, duration_s, list(records), rate=rate, slo=slo)


def result_json(result: LoadResult) -> dict[str, Any]:
    return {
        "summary": result.summary(),
        "requests": [{k: v for k, v in asdict(r).items() if k != "token_times"} for r in result.records],
    }
