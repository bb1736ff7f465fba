"""Prometheus metrics of one gateway, in a registry of its own (no process globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_INTENT_TOKEN_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "shipyard_requests",
            "Requests answered, by route, model, HTTP status and the deployment/version that served them "
            "('-' when no replica was reached)",
            ["route", "model", "status", "deployment", "version"],
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
        )
        self.upstream_errors = Counter(
            "shipyard_upstream_errors",
            "Failures talking to an upstream, by replica and kind",
            ["replica", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "shipyard_retries",
            "Requests moved to another replica before any output (by reason)",
            ["reason"],
            registry=r,
        )
        self.replicas_ready = Gauge(
            "shipyard_replicas_ready",
            "Replicas ready to take traffic",
            registry=r,
        )
        self.deployment_replicas = Gauge(
            "shipyard_deployment_replicas",
            "Replicas of each deployment/version, by state (ready or not)",
            ["deployment", "version", "state"],
            registry=r,
        )
        self.deployment_weight = Gauge(
            "shipyard_deployment_weight",
            "Share of new requests each deployment gets (0..1, normalised over ready deployments)",
            ["deployment"],
            registry=r,
        )
