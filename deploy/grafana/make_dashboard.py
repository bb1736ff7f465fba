"""Writes deploy/grafana/dashboards/shipyard.json (the committed file; a test checks it is this script's output
and that every metric a panel queries is exported by the gateway or by vLLM).

    python deploy/grafana/make_dashboard.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "shipyard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"

# (title, unit, [(PromQL, legend)], width, height); 24 columns per row
PANELS: list[tuple[str, str, list[tuple[str, str]], int]] = [
    (
        "Requests per second by route",
        "reqps",
        [(f"sum by (route) (rate(shipyard_requests_total[{RATE}]))", "{{route}}")],
        8,
    ),
    (
        "Error rate (5xx share; 4xx shown apart)",
        "percentunit",
        [
            (
                f'sum(rate(shipyard_requests_total{{status=~"5.."}}[{RATE}])) '
                f"/ clamp_min(sum(rate(shipyard_requests_total[{RATE}])), 1e-9)",
                "5xx",
            ),
            (
                f'sum(rate(shipyard_requests_total{{status=~"4.."}}[{RATE}])) '
                f"/ clamp_min(sum(rate(shipyard_requests_total[{RATE}])), 1e-9)",
                "4xx",
            ),
        ],
        8,
    ),
    (
        "Traffic share and ready replicas by deployment",
        "short",
        [
            ("shipyard_deployment_weight", "weight {{deployment}}"),
            (
                'sum by (deployment, version) (shipyard_deployment_replicas{state="ready"})',
                "ready {{deployment}} {{version}}",
            ),
        ],
        8,
    ),
    (
        "Time to first token P50 / P99 by deployment and version",
        "s",
        [
            (
                f"histogram_quantile({q}, sum by (le, deployment, version) "
                f"(rate(shipyard_time_to_first_token_seconds_bucket[{RATE}])))",
                f"p{int(q * 100)} {{{{deployment}}}} {{{{version}}}}",
            )
            for q in (0.5, 0.99)
        ],
        12,
    ),
    (
        "End-to-end latency P50 / P99 by deployment and version",
        "s",
        [
            (
                f"histogram_quantile({q}, sum by (le, deployment, version) "
                f"(rate(shipyard_request_latency_seconds_bucket[{RATE}])))",
                f"p{int(q * 100)} {{{{deployment}}}} {{{{version}}}}",
            )
            for q in (0.5, 0.99)
        ],
        12,
    ),
    (
        "Tokens per second",
        "short",
        [
            (f"sum(rate(shipyard_output_tokens_total[{RATE}]))", "output (gateway)"),
            (f"sum(rate(shipyard_prompt_tokens_total[{RATE}]))", "prompt (gateway)"),
            (f"sum by (instance) (rate(vllm:generation_tokens_total[{RATE}]))", "generated {{instance}} (engine)"),
        ],
        12,
    ),
    (
        "In flight and queued",
        "short",
        [
            ("sum by (route) (shipyard_requests_in_flight)", "gateway in flight {{route}}"),
            ("sum by (instance) (vllm:num_requests_running)", "engine running {{instance}}"),
            ("sum by (instance) (vllm:num_requests_waiting)", "engine queue {{instance}}"),
        ],
        12,
    ),
    (
        "KV-cache usage by engine",
        "percentunit",
        [("vllm:kv_cache_usage_perc", "{{instance}}")],
        8,
    ),
    (
        "Prefix-cache hit rate",
        "percentunit",
        [
            (
                f"sum by (instance) (rate(vllm:prefix_cache_hits_total[{RATE}])) "
                f"/ clamp_min(sum by (instance) (rate(vllm:prefix_cache_queries_total[{RATE}])), 1e-9)",
                "{{instance}}",
            )
        ],
        8,
    ),
    (
        "Upstream errors and retries",
        "short",
        [
            (f"sum by (replica, kind) (rate(shipyard_upstream_errors_total[{RATE}]))", "error {{replica}} {{kind}}"),
            (f"sum by (reason) (rate(shipyard_retries_total[{RATE}]))", "moved: {{reason}}"),
        ],
        8,
    ),
    (
        "Replicas: desired and by rotation (autoscale)",
        "short",
        [
            ("max by (model, deployment) (shipyard_autoscale_desired_replicas)", "desired {{model}} {{deployment}}"),
            ("max by (model, state) (shipyard_autoscale_replicas)", "{{model}} {{state}}"),
        ],
        12,
    ),
    (
        "Autoscale signals",
        "short",
        [("max by (model, signal) (shipyard_autoscale_signal)", "{{model}} {{signal}}")],
        12,
    ),
    (
        "Admission: admitted, queued, shed (req/s)",
        "reqps",
        [
            (f"sum by (model) (rate(shipyard_admission_admitted_total[{RATE}]))", "admitted {{model}}"),
            (f"sum by (model) (rate(shipyard_admission_queued_total[{RATE}]))", "queued {{model}}"),
            (f"sum by (model, reason) (rate(shipyard_admission_shed_total[{RATE}]))", "shed {{model}} {{reason}}"),
        ],
        12,
    ),
    (
        "Admission: queue wait P99, queue length, limits",
        "short",
        [
            (
                "histogram_quantile(0.99, sum by (le, model) "
                f"(rate(shipyard_admission_queue_wait_seconds_bucket[{RATE}])))",
                "wait P99 (s) {{model}}",
            ),
            ("sum by (model) (shipyard_admission_queue_length)", "waiting {{model}}"),
            ("max by (replica) (shipyard_replica_concurrency_limit)", "limit {{replica}}"),
        ],
        12,
    ),
]


def panel(
    index: int, x: int, y: int, title: str, unit: str, targets: list[tuple[str, str]], width: int
) -> dict[str, Any]:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": width, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit, "min": 0}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    panels, x, y = [], 0, 0
    for index, (title, unit, targets, width) in enumerate(PANELS):
        if x + width > 24:
            x, y = 0, y + 8
        panels.append(panel(index, x, y, title, unit, targets, width))
        x += width
    return {
        "uid": "shipyard-overview",
        "title": "shipyard — gateway and engines",
        "description": "Gateway metrics (shipyard_*) and vLLM engine metrics (vllm:*), by deployment and version.",
        "tags": ["shipyard", "vllm", "llm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=1) + "\n")
    print(f"wrote {OUT}")
