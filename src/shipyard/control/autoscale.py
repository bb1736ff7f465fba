"""How many replicas a model should have: a pure decision over its recent load (issue 35's first part).

Observations in, the desired replica count and its reason out; the clock is the observations' own. The lessons
of Kubernetes' HPA and Knative's KPA are built in:

- **each signal as a ratio to its target** (requests waiting per replica, KV-cache use, TTFT P90 against the SLO):
  the raw recommendation is ``ceil(replicas x the largest ratio)``, and nothing moves while that ratio is within
  ``tolerance`` of 1 (HPA's tolerance band);
- **a short window to scale out, a long one to scale in**: out once every recommendation of the last
  ``scale_out_after_s`` asks for more (a one-sample spike does not start an engine); in only to the highest
  recommendation of the last ``scale_in_after_s`` (HPA's scale-down stabilization: a sine load keeps its peak's
  replicas instead of flapping);
- **panic** (KPA): when a signal is ``panic_ratio`` times its target (the SLO already broken), scale out on the
  first observation and never scale in until the panic has been over for ``scale_out_after_s``;
- **step limits**: out at most doubling (+1 at least), in at most halving (-1 at least), within
  ``min_replicas`` .. ``max_replicas``.

>>> scaler = Autoscaler(AutoscalePolicy(min_replicas=1, max_replicas=4, target_waiting=2))
>>> scaler.decide(Load(at=0.0, replicas=1, waiting=9)).replicas   # 4.5x the target: panic, doubled
2
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class AutoscalePolicy:
    """A model's ``autoscale:`` settings."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_waiting: float | None = 2.0
    """Requests waiting in the engines' queues per replica (vLLM's ``num_requests_waiting``)."""
    target_kv_cache: float | None = 0.8
    """Mean KV-cache use of the replicas (0..1)."""
    ttft_p90_ms: float | None = None
    """The time-to-first-token SLO, P90 over a recent window. An SLO asks for more replicas when it is broken and
    never holds them: latency has a floor (one request alone), so a ratio under 1 says nothing about how many
    replicas the load needs; the load signals decide scale-in."""
    target_in_flight: float | None = None
    """Requests in flight per replica (Ray Serve's ``target_ongoing_requests``, Knative's concurrency target)."""
    scale_out_after_s: float = 6.0
    scale_in_after_s: float = 300.0
    tolerance: float = 0.1
    panic_ratio: float = 2.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} .. max_replicas {self.max_replicas} is empty")
        targets = (self.target_waiting, self.target_kv_cache, self.ttft_p90_ms, self.target_in_flight)
        if all(t is None for t in targets):
            raise ValueError(
                "autoscale needs a target: target_waiting, target_kv_cache, target_in_flight or ttft_p90_ms"
            )


@dataclass(frozen=True)
class Load:
    """One observation of a model: its replicas (serving or starting) and their load at ``at`` (seconds)."""

    at: float
    replicas: int
    waiting: float = 0.0
    kv_cache: float = 0.0
    ttft_p90_ms: float | None = None
    requests: float = 0.0
    """Requests in flight or waiting: with none at all a model may go to ``min_replicas`` (0: scale to zero)."""


@dataclass(frozen=True)
class Scale:
    replicas: int
    reason: str


class Autoscaler:
    """The decision for one model; keeps the recommendations of its windows (and nothing else)."""

    def __init__(self, policy: AutoscalePolicy) -> None:
        self.policy = policy
        self._recommended: deque[tuple[float, int]] = deque()
        self._panic_until = -math.inf

    def pressure(self, load: Load) -> tuple[float, str]:
        """The largest ratio of a signal to its target, and the signal's name."""
        p = self.policy
        ratios = []
        if p.target_waiting:
            ratios.append((load.waiting / max(load.replicas, 1) / p.target_waiting, "waiting"))
        if p.target_kv_cache:
            ratios.append((load.kv_cache / p.target_kv_cache, "kv_cache"))
        if p.target_in_flight:
            ratios.append((load.requests / max(load.replicas, 1) / p.target_in_flight, "in_flight"))
        if p.ttft_p90_ms and load.ttft_p90_ms is not None:
            ratio = load.ttft_p90_ms / p.ttft_p90_ms
            if ratio > 1 + p.tolerance or not ratios:  # broken: more; met: the load signals decide
                ratios.append((ratio, "ttft_p90"))
        return max(ratios, default=(0.0, "idle"))

    def decide(self, load: Load) -> Scale:
        p, current = self.policy, load.replicas
        ratio, signal = self.pressure(load)
        if current == 0:
            raw = 1 if load.requests > 0 else 0  # from zero: the first request wakes one
        elif abs(ratio - 1) <= p.tolerance:
            raw = current
        else:
            raw = math.ceil(current * ratio)
            if load.requests <= 0 and ratio <= 0:
                raw = 0
        raw = min(max(raw, p.min_replicas), p.max_replicas)
        self._recommended.append((load.at, raw))
        horizon = load.at - max(p.scale_in_after_s, p.scale_out_after_s)
        while len(self._recommended) > 1 and self._recommended[1][0] <= horizon:
            self._recommended.popleft()  # the first one left is at or before the horizon: the windows are covered
        if ratio >= p.panic_ratio:
            self._panic_until = load.at + p.scale_out_after_s
        panic = load.at < self._panic_until
        recent = [n for at, n in self._recommended if at >= load.at - p.scale_out_after_s]
        held = [n for at, n in self._recommended if at >= load.at - p.scale_in_after_s]
        if raw > current:
            sustained = min(recent) > current and self._recommended[0][0] <= load.at - p.scale_out_after_s
            if not (panic or sustained or current == 0):
                return Scale(current, f"{signal} {ratio:.2f}x target: waiting {p.scale_out_after_s:g} s to scale out")
            target = min(raw, max(current * 2, current + 1))
            why = "panic: " if panic and not sustained else ""
            return Scale(target, f"{why}{signal} at {ratio:.2f}x its target")
        if panic:
            return Scale(current, f"panic: no scale-in until it has been over for {p.scale_out_after_s:g} s")
        stable = max(held)
        covered = self._recommended[0][0] <= load.at - p.scale_in_after_s
        if stable < current and covered:
            target = max(stable, current - max(1, current // 2))
            return Scale(target, f"{signal} at {ratio:.2f}x its target for {p.scale_in_after_s:g} s")
        return Scale(current, f"{signal} at {ratio:.2f}x its target")
