"""Writing a benchmark run: summary.json, requests.jsonl, report.md and plots."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shipyard.bench.stream_load import LoadResult
from shipyard.evaluate import plots


def _fmt(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.1f}"


def write_bench(out: Path, results: list[LoadResult], meta: dict[str, Any]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    runs = [r.summary() for r in results]
    summary = {**meta, "runs": runs}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with (out / "requests.jsonl").open("w") as handle:
        for index, result in enumerate(results):
            label = f"rate={result.rate}" if result.rate is not None else f"concurrency={result.concurrency}"
            for record in result.records:
                row = {k: v for k, v in asdict(record).items() if k != "token_times"}
                row.update(
                    run=label,
                    run_index=index,
                    ok=record.ok,
                    ttft_ms=None if record.ttft_s is None else record.ttft_s * 1000,
                    e2e_ms=None if record.e2e_s is None else record.e2e_s * 1000,
                )
                handle.write(json.dumps(row) + "\n")
    names = [f"rate {r['rate']}" if "rate" in r else f"c={r['concurrency']}" for r in runs]
    plots.latency_cdf_png(
        {
            name: [rec.e2e_s * 1000 for rec in res.records if rec.ok and rec.e2e_s is not None]
            for name, res in zip(names, results, strict=True)
        },
        out / "latency_cdf.png",
        "end-to-end latency CDF",
    )
    plots.latency_throughput_png(
        [r["output_tok_per_s"] for r in runs],
        [r["ttft_ms"]["p99"] for r in runs],
        [r["e2e_ms"]["p99"] for r in runs],
        names,
        out / "latency_throughput.png",
    )
    lines = [
        f"# shipyard bench: {meta['scenario']} against {meta['url']}",
        "",
        f"- model `{meta['model']}`, {meta['max_tokens']} output tokens per request, date {meta['date']}",
        f"- command: `{meta['command']}`",
        "",
        "| load | requests | errors | TTFT p50 / p99 ms | TPOT p50 ms | E2E p50 / p99 ms | req/s | tok/s | goodput/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in zip(names, runs, strict=True):
        lines.append(
            f"| {name} | {r['requests']} | {r['errors']} | {_fmt(r['ttft_ms']['p50'])} / {_fmt(r['ttft_ms']['p99'])} | "
            f"{_fmt(r['tpot_ms']['p50'])} | {_fmt(r['e2e_ms']['p50'])} / {_fmt(r['e2e_ms']['p99'])} | "
            f"{r['request_per_s']:.2f} | {r['output_tok_per_s']:.1f} | {r['goodput']:.2f} |"
        )
    lines += ["", "![latency-throughput](latency_throughput.png)", "", "![cdf](latency_cdf.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return summary
