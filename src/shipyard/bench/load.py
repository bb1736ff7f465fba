"""Load against an OpenAI-compatible endpoint or the task endpoints: closed loop (N clients, each sending its next
request as soon as the last one ends) and open loop (requests at a set rate whatever the server does).

Per request: time to first token, inter-token times, end-to-end time, tokens (from the response's ``usage`` when
it has one), status, error, and the deployment/version headers of whatever served it. Failed requests are never
dropped from a denominator.

Uses aiohttp (as vLLM's own ``vllm bench serve`` does) so the load generator costs little CPU per token.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from shipyard.bench.scenarios import RequestSpec, Workload
from shipyard.stats import summarize

Progress = Callable[[str], None]


@dataclass
class RequestRecord:
    started: float
    """Seconds from the measuring origin (negative: sent during warm-up, not measured)."""
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    input_tokens: int | None = None
    status: int = 0
    error: str | None = None
    done: bool = False
    """A stream ended with ``data: [DONE]`` or a JSON answer was read whole (anything else was cut short)."""
    timed_out: bool = False
    deployment: str | None = None
    version: str | None = None
    chunk_times: list[float] = field(default_factory=list, repr=False)
    """Arrival of each chunk that carried output, in seconds from the origin."""
    retry_after: str | None = None
    """The ``Retry-After`` header of a refused request (a 429 or 503 that says when to come back)."""
    scheduled: float | None = None
    """Open loop: when the request was due (seconds from the origin); ``started - scheduled`` is how late the
    load generator sent it."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.done

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (vLLM's definition)."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive output chunks."""
        return [b - a for a, b in itertools.pairwise(self.chunk_times)]

    def row(self) -> dict[str, Any]:
        """The ``requests.jsonl`` form: milliseconds, no per-chunk times."""
        data = {k: v for k, v in asdict(self).items() if k != "chunk_times"}
        data.update(
            ok=self.ok,
            ttft_ms=None if self.ttft_s is None else round(self.ttft_s * 1000, 3),
            e2e_ms=None if self.e2e_s is None else round(self.e2e_s * 1000, 3),
            tpot_ms=None if self.tpot_s is None else round(self.tpot_s * 1000, 3),
        )
        return data


@dataclass(frozen=True)
class Slo:
    """Service-level objective: a request counts towards goodput if it succeeded within both limits."""

    ttft_ms: float | None = None
    e2e_ms: float | None = None

    def met_by(self, record: RequestRecord) -> bool:
        if not record.ok:
            return False
        if self.ttft_ms is not None and (record.ttft_s is None or record.ttft_s * 1000 > self.ttft_ms):
            return False
        return not (self.e2e_ms is not None and (record.e2e_s is None or record.e2e_s * 1000 > self.e2e_ms))

    def met_at_p99(self, summary: dict[str, Any]) -> bool:
        """A load level "meets the SLO": no failed request, and P99 TTFT / P99 end-to-end within the limits."""
        if summary["requests"] == 0 or summary["errors"] > 0:
            return False
        for limit, key in ((self.ttft_ms, "ttft_ms"), (self.e2e_ms, "e2e_ms")):
            p99 = summary[key]["p99"]
            if limit is not None and (math.isnan(p99) or p99 > limit):
                return False
        return True


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
    resources: dict[str, dict[str, float]] = field(default_factory=dict)
    """Mean and peak of each sampled series (GPU memory/utilisation, gateway/engine CPU and RSS)."""
    timeline: list[dict[str, float]] = field(default_factory=list)
    sent: int = 0
    """Requests sent, warm-up included: the next level of a sweep starts its workload after them, so no prompt
    is sent twice (a repeated prompt would be served from the prefix cache and flatter the numbers)."""
    loadgen_cpu: float | None = None
    """CPU the load generator itself used while the level ran, in cores (1.0 = one core busy): near 1 means the
    generator, not the server, may be the limit."""

    @property
    def label(self) -> str:
        return f"rate={self.rate:g}" if self.rate is not None else f"concurrency={self.concurrency}"

    def measured(self) -> list[RequestRecord]:
        return [r for r in self.records if 0 <= r.started < self.window_s]

    def summary(self) -> dict[str, Any]:
        """Aggregates of the requests started inside the window; failed ones stay in every denominator."""
        measured = self.measured()
        ok = [r for r in measured if r.ok]
        tokens_in_window = 0.0
        for r in self.records:
            if r.chunk_times:  # spread the usage count over the chunks that carried it
                per_chunk = r.output_tokens / len(r.chunk_times) if r.output_tokens else 1.0
                tokens_in_window += per_chunk * sum(1 for t in r.chunk_times if 0 <= t <= self.window_s)
            elif r.ok and r.e2e_s is not None and 0 <= r.started + r.e2e_s <= self.window_s:
                tokens_in_window += r.output_tokens

        def ms(values: list[float | None]) -> dict[str, float]:
            return {k: v * 1000 for k, v in summarize([v for v in values if v is not None]).items()}

        load: dict[str, Any] = {"rate": self.rate} if self.rate is not None else {"concurrency": self.concurrency}
        meeting = sum(self.slo.met_by(r) for r in measured) if self.slo else len(ok)
        served: dict[str, int] = {}
        for r in ok:
            key = f"{r.deployment}/{r.version}" if r.deployment else "-"
            served[key] = served.get(key, 0) + 1
        sender: dict[str, Any] = {"loadgen_cpu_cores": self.loadgen_cpu}
        if self.rate is not None:  # open loop: did the generator send at the rate it was asked for, and on time?
            sender["achieved_rate"] = len(measured) / self.window_s
            sender["send_lag_ms"] = ms([r.started - r.scheduled for r in measured if r.scheduled is not None])
        return {
            **load,
            **sender,
            "window_s": self.window_s,
            "requests": len(measured),
            "errors": len(measured) - len(ok),
            "timeouts": sum(1 for r in measured if r.timed_out),
            "ttft_ms": ms([r.ttft_s for r in ok]),
            "tpot_ms": ms([r.tpot_s for r in ok]),
            "itl_ms": ms([gap for r in ok for gap in r.itl_s]),
            "e2e_ms": ms([r.e2e_s for r in ok]),
            "request_per_s": len(ok) / self.window_s,
            "output_tok_per_s": tokens_in_window / self.window_s,
            "goodput": meeting / self.window_s,
            "goodput_fraction": meeting / len(measured) if measured else 0.0,
            "served_by": served,
            "error_samples": sorted({r.error or f"HTTP {r.status}" for r in measured if not r.ok})[:5],
            "resources": self.resources,
        }


def _count_usage(record: RequestRecord, usage: Any) -> None:
    if isinstance(usage, dict):
        record.output_tokens = int(usage.get("completion_tokens") or 0)
        record.input_tokens = usage.get("prompt_tokens")


async def send_request(
    session: aiohttp.ClientSession, base_url: str, headers: dict[str, str], spec: RequestSpec, origin: float
) -> RequestRecord:
    """Send one request and time it; never raises for what the server or the network did."""
    start = time.perf_counter()
    record = RequestRecord(started=start - origin)
    try:
        async with session.post(base_url + spec.path, data=spec.encoded(), headers=headers) as response:
            record.status = response.status
            record.deployment = response.headers.get("x-shipyard-deployment")
            record.version = response.headers.get("x-shipyard-version")
            if response.status != 200:
                record.retry_after = response.headers.get("retry-after")
                record.error = f"HTTP {response.status}: {(await response.text())[:200]}"
            elif spec.stream:
                await _read_stream(response, record, start, origin)
            else:
                data = await response.json(content_type=None)
                record.e2e_s = time.perf_counter() - start
                _count_usage(record, data.get("usage") if isinstance(data, dict) else None)
                record.done = True
    except asyncio.TimeoutError:
        record.timed_out = True
        record.error = "timeout"
    except (aiohttp.ClientError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    if record.error and record.e2e_s is None:
        record.e2e_s = time.perf_counter() - start
    return record


async def _read_stream(response: aiohttp.ClientResponse, record: RequestRecord, start: float, origin: float) -> None:
    chunks = 0
    async for line in response.content:
        if not line.startswith(b"data: "):
            continue
        if line.startswith(b"data: [DONE]"):
            record.done = True
            break
        now = time.perf_counter()
        event = json.loads(line[6:])
        if "error" in event and "choices" not in event:
            error = event["error"]
            record.error = error.get("message", "stream error") if isinstance(error, dict) else str(error)
            break
        if event.get("usage"):
            _count_usage(record, event["usage"])
        # Any chunk with choices is a token step, even when its text is empty (a special token, or bytes that do
        # not decode yet): timing it is what vLLM's own benchmark does, so the two tools agree.
        if event.get("choices"):
            if record.ttft_s is None:
                record.ttft_s = now - start
            chunks += 1
            record.chunk_times.append(now - origin)
    record.e2e_s = time.perf_counter() - start
    if record.output_tokens == 0:
        record.output_tokens = chunks  # no usage chunk: one token per chunk, as the server streamed them
    if record.error is None and not record.done:
        record.error = "stream ended without [DONE] (truncated)"


def _session(timeout_s: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=timeout_s, sock_read=timeout_s)
    )


def _headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}


async def _gather_reporting(
    jobs: list[Coroutine[Any, Any, None]],
    progress: Progress | None,
    label: str,
    records: list[RequestRecord],
    end: float,
) -> None:
    """Run ``jobs``; every 5 s tell ``progress`` how many requests are done and failed, and the time left."""

    async def report(progress: Progress) -> None:
        while True:
            await asyncio.sleep(5)
            failed = sum(1 for r in records if not r.ok)
            left = max(0.0, end - time.perf_counter())
            progress(f"  {label}: {len(records)} done, {failed} failed" + (f", ~{left:.0f} s left" if left else ""))

    ticker = asyncio.create_task(report(progress)) if progress else None
    try:
        await asyncio.gather(*jobs)
    finally:
        if ticker:
            ticker.cancel()


async def run_closed_loop(
    base_url: str,
    *,
    api_key: str,
    workload: Workload,
    concurrency: int,
    duration_s: float | None = 30.0,
    requests: int | None = None,
    warmup_s: float = 0.0,
    slo: Slo | None = None,
    timeout_s: float = 300.0,
    progress: Progress | None = None,
    origin: float | None = None,
    first_index: int = 0,
) -> LoadResult:
    """Keep ``concurrency`` requests in flight for ``warmup_s`` + (``duration_s`` or until ``requests`` measured
    requests were sent). Requests started during warm-up are excluded; those still running when the window
    closes are awaited, and their tokens after the window do not count towards throughput. ``origin`` (a
    ``time.perf_counter()`` value) is when measuring starts; default: now + ``warmup_s``."""
    if (duration_s is None) == (requests is None):
        raise ValueError("give exactly one of duration_s or requests")
    base, headers = base_url.rstrip("/"), _headers(api_key)
    records: list[RequestRecord] = []
    indices = itertools.count(first_index)
    cpu = _CpuMeter()
    async with _session(timeout_s) as session:
        origin = origin if origin is not None else time.perf_counter() + warmup_s
        deadline = origin + duration_s if duration_s is not None else math.inf
        sent = 0

        async def client() -> None:
            nonlocal sent
            while time.perf_counter() < deadline:
                if requests is not None and time.perf_counter() >= origin:
                    if sent >= requests:
                        return
                    sent += 1
                records.append(await send_request(session, base, headers, workload.request(next(indices)), origin))

        end = deadline if duration_s else 0.0
        await _gather_reporting([client() for _ in range(concurrency)], progress, f"c={concurrency}", records, end)
        window = duration_s if duration_s is not None else _last_end(records)
    measured = [r for r in records if r.started < window]
    return LoadResult(concurrency, window, measured, slo=slo, sent=len(records), loadgen_cpu=cpu.cores())


class _CpuMeter:
    """CPU time of this process since it was made, in cores over the wall time."""

    def __init__(self) -> None:
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def cores(self) -> float:
        return round((time.process_time() - self._cpu) / max(time.perf_counter() - self._wall, 1e-9), 3)


def _last_end(records: list[RequestRecord]) -> float:
    ends = [r.started + (r.e2e_s or 0.0) for r in records if r.started >= 0]
    return max(ends, default=0.0) or 1e-9


def arrival_offsets(
    rate: float, duration_s: float | None = None, arrival: str = "poisson", seed: int = 0, count: int | None = None
) -> list[float]:
    """Start times (seconds from the origin) of an open-loop run at ``rate``/s: Poisson or evenly spaced, for
    ``duration_s`` seconds or ``count`` requests."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    if (duration_s is None) == (count is None):
        raise ValueError("give exactly one of duration_s or count")
    if arrival not in ("poisson", "constant"):
        raise ValueError(f"arrival must be poisson or constant, not {arrival!r}")
    limit = count if count is not None else math.inf
    end = duration_s if duration_s is not None else math.inf
    if arrival == "constant":
        n = count if count is not None else int(end * rate)
        return [i / rate for i in range(n)]
    rng = random.Random(seed)
    offsets: list[float] = []
    t = rng.expovariate(rate)
    while t < end and len(offsets) < limit:
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


async def run_arrivals(
    base_url: str,
    *,
    api_key: str,
    workload: Workload,
    offsets: list[float],
    origin_in_s: float = 0.0,
    timeout_s: float = 300.0,
    progress: Progress | None = None,
    label: str = "",
    end_s: float | None = None,
    first_index: int = 0,
) -> list[RequestRecord]:
    """Send one request at each of ``offsets`` (seconds from an origin ``origin_in_s`` from now; negative ones
    before it), whatever the server does, and return their records (each with ``scheduled``), all answered.
    Any schedule: a constant rate, Poisson arrivals, or phases of different rates (an overload and after it)."""
    base, headers = base_url.rstrip("/"), _headers(api_key)
    records: list[RequestRecord] = []
    async with _session(timeout_s) as session:
        origin = time.perf_counter() + origin_in_s

        async def at(index: int, offset: float) -> None:
            delay = origin + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            record = await send_request(session, base, headers, workload.request(first_index + index), origin)
            record.scheduled = offset
            records.append(record)

        end = origin + (end_s if end_s is not None else (max(offsets) if offsets else 0.0))
        await _gather_reporting([at(i, offset) for i, offset in enumerate(offsets)], progress, label, records, end)
    return records


async def run_open_loop(
    base_url: str,
    *,
    api_key: str,
    workload: Workload,
    rate: float,
    duration_s: float | None = 30.0,
    requests: int | None = None,
    warmup_s: float = 0.0,
    arrival: str = "poisson",
    seed: int = 0,
    slo: Slo | None = None,
    timeout_s: float = 300.0,
    progress: Progress | None = None,
    first_index: int = 0,
) -> LoadResult:
    """Send requests at ``rate`` per second whatever the server does (open loop); warm-up arrivals come first
    at the same rate and are not measured."""
    measured = arrival_offsets(rate, duration_s, arrival, seed, requests)
    warm = [t - warmup_s for t in arrival_offsets(rate, warmup_s, arrival, seed + 1)] if warmup_s > 0 else []
    cpu = _CpuMeter()
    end = duration_s if duration_s is not None else (measured[-1] if measured else 0.0)
    records = await run_arrivals(
        base_url,
        api_key=api_key,
        workload=workload,
        offsets=warm + measured,
        origin_in_s=warmup_s,
        timeout_s=timeout_s,
        progress=progress,
        label=f"rate={rate:g}",
        end_s=end,
        first_index=first_index,
    )
    window = duration_s if duration_s is not None else max(measured[-1] if measured else 0.0, 1e-9)
    if requests is not None:  # the window ends with the last arrival: every measured request is inside it
        window = math.nextafter(window, math.inf)
    return LoadResult(None, window, records, rate=rate, slo=slo, sent=len(records), loadgen_cpu=cpu.cores())


def find_max(
    measure: Callable[[float], LoadResult],
    slo: Slo,
    *,
    start: float,
    limit: float,
    integer: bool,
    precision: float = 0.05,
    progress: Progress | None = None,
) -> tuple[float | None, list[LoadResult]]:
    """The highest load level (concurrency or rate) that meets ``slo`` (``Slo.met_at_p99``): double from
    ``start`` until a level fails or ``limit`` is reached, then bisect between the last pass and the first
    failure until they are within ``precision`` (relative; 1 for integers). Returns (best or None, every run)."""
    if start <= 0 or limit < start:
        raise ValueError("find-max needs 0 < start <= limit")
    runs: list[LoadResult] = []

    def passes(level: float) -> bool:
        result = measure(level)
        runs.append(result)
        ok = slo.met_at_p99(result.summary())
        if progress:
            progress(f"  find-max: {result.label} {'meets' if ok else 'misses'} the SLO")
        return ok

    low: float | None = None
    level = start
    while True:
        if not passes(level):
            high = level
            break
        low = level
        if level >= limit:
            return low, runs
        level = min(level * 2, limit)
    if low is None:
        return None, runs
    while (high - low > 1) if integer else ((high - low) / low > precision):
        middle = (low + high) // 2 if integer else (low + high) / 2
        if passes(middle):
            low = middle
        else:
            high = middle
    return low, runs
