"""Overload and after: a steady load, a step past capacity, and back below it, in one open-loop schedule.

What a service owner asks of overload (issue 37): the requests admitted keep their latency, the rest are refused
at once (503 with ``Retry-After``), and once the load drops nothing lingers. :func:`phased_offsets` makes the
schedule (constant arrivals, one rate per phase, no pause between phases, so a backlog left by the overload
meets the next phase); :func:`overload_summary` reads the records of :func:`shipyard.bench.load.run_arrivals`.

>>> phases = [Phase("before", 40, 3), Phase("overload", 120, 5), Phase("after", 40, 6)]
>>> offsets, names = phased_offsets(phases)
>>> len(offsets), names[0], names[-1]
(960, 'before', 'after')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shipyard.bench.load import RequestRecord
from shipyard.stats import percentile


@dataclass(frozen=True)
class Phase:
    name: str
    rate: float
    """Requests per second, evenly spaced."""
    duration_s: float


def phased_offsets(phases: list[Phase]) -> tuple[list[float], list[str]]:
    """Arrival times (seconds from the origin) of every phase, one after the other, and each one's phase."""
    offsets: list[float] = []
    names: list[str] = []
    start = 0.0
    for phase in phases:
        count = int(phase.rate * phase.duration_s)
        offsets += [start + i / phase.rate for i in range(count)]
        names += [phase.name] * count
        start += phase.duration_s
    return offsets, names


def _ms(values: list[float]) -> dict[str, float | int]:
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}
    return {
        "count": len(ordered),
        "p50": round(percentile(ordered, 50) * 1000, 2),
        "p99": round(percentile(ordered, 99) * 1000, 2),
        "max": round(ordered[-1] * 1000, 2),
    }


def overload_summary(
    records: list[RequestRecord], phases: list[Phase], *, step_s: float = 0.5, tolerance: float = 2.0
) -> dict[str, Any]:
    """Per phase: requests, answered (200) and refused (503) with their latencies, other failures. Then
    ``recovered_after_s``: the first time after the last phase began from which every request was answered and
    their P99 is within ``tolerance`` times the first phase's (None: never within the run)."""
    bounds: list[tuple[str, float, float]] = []
    start = 0.0
    for phase in phases:
        bounds.append((phase.name, start, start + phase.duration_s))
        start += phase.duration_s

    def of(lo: float, hi: float) -> list[RequestRecord]:
        return [r for r in records if r.scheduled is not None and lo <= r.scheduled < hi]

    out: dict[str, Any] = {"phases": {}}
    for (name, lo, hi), phase in zip(bounds, phases, strict=True):
        rows = of(lo, hi)
        ok = [r.e2e_s for r in rows if r.ok and r.e2e_s is not None]
        refused = [r for r in rows if r.status == 503]
        out["phases"][name] = {
            "rate": phase.rate,
            "duration_s": phase.duration_s,
            "requests": len(rows),
            "answered": _ms(ok),
            "refused": _ms([r.e2e_s for r in refused if r.e2e_s is not None]),
            "refused_with_retry_after": sum(1 for r in refused if r.retry_after),
            "other_failures": sum(1 for r in rows if not r.ok and r.status != 503),
            "send_lag_ms_p99": round(
                percentile([r.started - r.scheduled for r in rows if r.scheduled is not None] or [0.0], 99) * 1000, 2
            ),
        }
    first = out["phases"][phases[0].name]["answered"]
    baseline = first.get("p99")
    out["baseline_p99_ms"] = baseline
    name, lo, hi = bounds[-1]
    out["recovered_after_s"] = None
    t = 0.0
    while baseline is not None and lo + t < hi:
        rows = of(lo + t, hi)
        ok = [r.e2e_s for r in rows if r.ok and r.e2e_s is not None]
        if rows and len(ok) == len(rows) and percentile(sorted(ok), 99) * 1000 <= tolerance * baseline:
            out["recovered_after_s"] = t
            break
        t += step_s
    return out
