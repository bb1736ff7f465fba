"""Prometheus metrics of one gateway, in a registry of its own (no process globals).

A gateway of several processes (``workers`` > 1) counts in prometheus_client's multiprocess mode: every process
writes its values to files in one folder and whichever process answers ``/metrics`` adds them all up
(``MultiProcessCollector``), so a scrape through the shared port sees the whole gateway. What the state decides
(replicas ready, deployments and their weights) is read from the answering process's pool at scrape time.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from shipyard.router.fleet import Fleet
from shipyard.router.policy import deployment_shares

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_INTENT_TOKEN_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20)


def enable_multiprocess(folder: Path) -> None:
    """Count this process's metrics (and those of the processes it starts) in ``folder``, emptied first. Call it
    before the gateway's metrics are made; the engines shipyard starts do not inherit it (see ``engine``)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ[MULTIPROCESS_ENV] = str(folder)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]  # chosen at import


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROCESS_ENV)


class GCWatch:
    """Times every garbage collection of this process into ``metrics.gc_pause`` (by generation): a collection
    stops the event loop, so its pauses are part of every request's latency.

    The callback only appends to a deque; ``flush`` (the server calls it every second, and ``stop``) observes the
    pauses. A collection can start inside any allocation — also inside prometheus_client's own locked write,
    whose lock (one per process in multiprocess mode) is not reentrant: a callback that observed there would wait
    for itself forever (it did, on the H200, in a serving worker's first second of traffic)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.pending: collections.deque[tuple[str, float]] = collections.deque(maxlen=100_000)
        self._started: list[float] = []
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started.append(time.perf_counter())
        elif self._started:
            self.pending.append((str(info.get("generation", "?")), time.perf_counter() - self._started.pop()))

    def flush(self) -> None:
        while self.pending:
            generation, seconds = self.pending.popleft()
            self.metrics.gc_pause.labels(generation).observe(seconds)

    def stop(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)
        self.flush()


class PoolCollector(Collector):
    """Gauges read from the fleet at scrape time: replicas ready, replicas per model/deployment/version, weights."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ready = GaugeMetricFamily("shipyard_replicas_ready", "Replicas ready to take traffic")
        ready.add_metric([], len(self.fleet.ready()))
        yield ready
        replicas = GaugeMetricFamily(
            "shipyard_deployment_replicas",
            "Replicas of each model's deployment/version, by state (ready or not)",
            labels=["model", "deployment", "version", "state"],
        )
        weight = GaugeMetricFamily(
            "shipyard_deployment_weight",
            "Share of the model's new requests each deployment gets (0..1, normalised over ready deployments)",
            labels=["model", "deployment"],
        )
        limits = GaugeMetricFamily(
            "shipyard_replica_concurrency_limit",
            "Requests each replica may have at once under its model's admission limit (set, or learned from its "
            "latency)",
            labels=["model", "replica"],
        )
        queued = GaugeMetricFamily(
            "shipyard_admission_queue_length", "Requests waiting for a replica with room, per model", labels=["model"]
        )
        for model, pool in self.fleet.pools.items():
            if pool.admission is not None:
                queued.add_metric([model], len(pool.admission.queue))
                for replica in pool.replicas:
                    limit = pool.admission.limit(replica.name)
                    if limit is not None:
                        limits.add_metric([model, replica.name], limit)
            counts: dict[tuple[str, str, str, str], int] = {}
            for replica in pool.replicas:
                key = (model, replica.deployment, replica.version or "-", "ready" if replica.ready else "unready")
                counts[key] = counts.get(key, 0) + 1
            for key, count in sorted(counts.items()):
                replicas.add_metric(list(key), count)
            shares = deployment_shares(pool.weights, sorted({r.deployment for r in pool.ready()}))
            for name in pool.deployments():
                weight.add_metric([model, name], shares.get(name, 0.0))
        yield replicas
        yield weight
        yield limits
        yield queued


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.multiprocess = multiprocess_dir()
        """The folder of a gateway of several processes (their metrics are added up), else None."""
        self._extra: list[Collector] = []
        r = self.registry
        self.requests = Counter(
            "shipyard_requests",
            "Requests answered, by route, model, HTTP status and the deployment/version that served them "
            "('-' when no replica was reached)",
            ["route", "model", "status", "deployment", "version"],
            registry=r,
        )
        self.route_decisions = Counter(
            "shipyard_route_decisions",
            "Replica choices by the model's routing policy, by reason: prefix (the replica holding the request's "
            "prefix), overloaded (that replica was too busy: the least busy one took it), least_busy, session, "
            "round_robin",
            ["model", "reason"],
            registry=r,
        )
        self.latency = Histogram(
            "shipyard_request_latency_seconds",
            "End-to-end request latency (until the last byte)",
            ["route", "model", "deployment", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "shipyard_time_to_first_token_seconds",
            "Time from request to the first streamed chunk",
            ["route", "model", "deployment", "version"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.output_tokens = Counter(
            "shipyard_output_tokens",
            "Completion tokens generated (from the upstream's usage)",
            ["model"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "shipyard_prompt_tokens",
            "Prompt tokens processed (from the upstream's usage)",
            ["model"],
            registry=r,
        )
        self.intent_output_tokens = Histogram(
            "shipyard_intent_output_tokens",
            "Output tokens the engine generated per classification (/v1/intent, /predict), by decode mode and "
            "whether the short answer decided the label or a full decode had to continue it",
            ["decode", "outcome"],
            buckets=_INTENT_TOKEN_BUCKETS,
            registry=r,
        )
        self.rollout_pause = Histogram(
            "shipyard_rollout_pause_seconds",
            "How long new requests for a replica waited while a rollout changed its weights in place (from the "
            "hold to the release: its running requests finishing, the reload, the check and the gate)",
            ["strategy"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 60),
            registry=r,
        )
        self.key_requests = Counter(
            "shipyard_key_requests",
            "API requests by key name (never the key) and HTTP status; 429 = refused by the key's limits",
            ["key", "status"],
            registry=r,
        )
        self.key_prompt_tokens = Counter(
            "shipyard_key_prompt_tokens", "Prompt tokens by key name (from the upstream's usage)", ["key"], registry=r
        )
        self.key_output_tokens = Counter(
            "shipyard_key_output_tokens", "Output tokens by key name (from the upstream's usage)", ["key"], registry=r
        )
        self.in_flight = Gauge(
            "shipyard_requests_in_flight",
            "Requests being answered right now",
            ["route"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_errors = Counter(
            "shipyard_upstream_errors",
            "Failures talking to an upstream, by replica and kind",
            ["replica", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "shipyard_retries",
            "Requests sent again before any output, to another replica or on a fresh connection (by reason)",
            ["reason"],
            registry=r,
        )
        self.autoscale_desired = Gauge(
            "shipyard_autoscale_desired_replicas",
            "Replicas each deployment of a model should have now: for the serving one the autoscaler's decision "
            "(or the count set by hand), for another (a rollout's) the count it has. KEDA's ScaledObjects on "
            "Kubernetes scale the engine Deployments to it",
            ["model", "deployment"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.autoscale_replicas = Gauge(
            "shipyard_autoscale_replicas",
            "Replicas of the model's serving deployment by rotation: serving, starting (warming up), draining",
            ["model", "state"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.autoscale_signal = Gauge(
            "shipyard_autoscale_signal",
            "What the autoscaler last observed: waiting (requests queued in the engines), kv_cache (mean use, "
            "0..1), ttft_p90_ms, requests (in flight)",
            ["model", "signal"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.autoscale_pending = Gauge(
            "shipyard_autoscale_pending",
            "1 while the desired count cannot be reached (no room, a rollout runs, the lease is elsewhere)",
            ["model"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.autoscale_changes = Counter(
            "shipyard_autoscale_changes",
            "Replicas added (out) and removed (in) by the scaler",
            ["model", "direction"],
            registry=r,
        )
        self.admitted = Counter(
            "shipyard_admission_admitted",
            "Requests of a model with an admission limit that a replica took (at once or after waiting)",
            ["model"],
            registry=r,
        )
        self.queued = Counter(
            "shipyard_admission_queued",
            "Requests that found every replica of their model at its admission limit and waited",
            ["model"],
            registry=r,
        )
        self.shed = Counter(
            "shipyard_admission_shed",
            "Requests refused at once (503 with Retry-After) because no replica had room: queue_full, "
            "queue_timeout or displaced (a request of a better priority took its place)",
            ["model", "reason"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "shipyard_admission_queue_wait_seconds",
            "How long the requests that waited for a replica with room waited (admitted or shed)",
            ["model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.gc_pause = Histogram(
            "shipyard_gc_pause_seconds",
            "Garbage collections of the gateway's process(es), by generation: each one stops the event loop",
            ["generation"],
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=r,
        )

    def ttft_buckets(self, model: str) -> dict[float, float]:
        """This process's cumulative time-to-first-token buckets of ``model`` (upper bound -> count), over every
        route, deployment and version: the autoscaler's TTFT signal is their growth between two looks."""
        buckets: dict[float, float] = {}
        for family in self.ttft.collect():
            for sample in family.samples:
                if sample.name.endswith("_bucket") and sample.labels.get("model") == model:
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
        return buckets

    def observe_scale(self, model: str, status: Mapping[str, Any]) -> None:
        """The scaler's status (``ControlPlane.scale_status()``) as gauges."""
        for deployment, count in (status.get("deployments") or {}).items():
            serving = deployment == status.get("deployment") and status.get("desired") is not None
            self.autoscale_desired.labels(model, deployment).set(status["desired"] if serving else count)
        for state, count in (status.get("replicas") or {}).items():
            self.autoscale_replicas.labels(model, state).set(count)
        for signal in ("waiting", "kv_cache", "ttft_p90_ms", "requests"):
            value = (status.get("load") or {}).get(signal)
            if value is not None:
                self.autoscale_signal.labels(model, signal).set(value)
        self.autoscale_pending.labels(model).set(1 if status.get("pending") else 0)

    def add_collector(self, collector: Collector) -> None:
        """A collector read at every scrape (in every process of the gateway)."""
        self.registry.register(collector)
        self._extra.append(collector)

    def exposition(self) -> CollectorRegistry:
        """What ``/metrics`` shows: this registry, or every process's values added up (multiprocess mode)."""
        if self.multiprocess is None:
            return self.registry
        merged = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(merged, path=self.multiprocess)  # type: ignore[no-untyped-call]
        for collector in self._extra:
            merged.register(collector)
        return merged
