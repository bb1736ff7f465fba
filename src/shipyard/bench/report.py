"""Writing a benchmark run (summary.json, requests.jsonl, report.md, plots) and comparing two runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from shipyard import plots
from shipyard.bench.load import LoadResult


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def level_name(run: dict[str, Any]) -> str:
    return f"rate {run['rate']:g}" if "rate" in run else f"c={run['concurrency']}"


def _table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| load | requests | errors | TTFT p50 / p99 ms | TPOT p50 ms | ITL p99 ms | E2E p50 / p90 / p99 ms | req/s | "
        "tok/s | goodput/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        t, e = r["ttft_ms"], r["e2e_ms"]
        lines.append(
            f"| {level_name(r)} | {r['requests']} | {r['errors']} | {_fmt(t['p50'])} / {_fmt(t['p99'])} | "
            f"{_fmt(r['tpot_ms']['p50'], 2)} | {_fmt(r['itl_ms']['p99'], 2)} | {_fmt(e['p50'])} / {_fmt(e['p90'])} / "
            f"{_fmt(e['p99'])} | {r['request_per_s']:.2f} | {r['output_tok_per_s']:.1f} | {r['goodput']:.2f} |"
        )
    return lines


def write_bench(
    out: Path,
    results: list[LoadResult],
    meta: dict[str, Any],
    *,
    events: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a run's files; ``events`` (``{"at_s", "label"}``, on the load's clock) mark a rollout's phases on the
    timeline plot; ``extra`` goes into summary.json as is (find-max answer, the rollout's own record)."""
    out.mkdir(parents=True, exist_ok=True)
    runs = [r.summary() for r in results]
    summary = {**meta, **(extra or {}), "runs": runs}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with (out / "requests.jsonl").open("w") as handle:
        for index, result in enumerate(results):
            for record in result.records:
                handle.write(json.dumps({"run": result.label, "run_index": index, **record.row()}) + "\n")
    names = [level_name(r) for r in runs]
    plots.latency_cdf_png(
        {
            name: [rec.e2e_s * 1000 for rec in res.measured() if rec.ok and rec.e2e_s is not None]
            for name, res in zip(names, results, strict=True)
        },
        out / "latency_cdf.png",
        "end-to-end latency CDF",
    )
    images = ["latency_cdf.png"]
    if len(runs) > 1:
        plots.latency_throughput_png(
            [r["output_tok_per_s"] or r["request_per_s"] for r in runs],
            [r["ttft_ms"]["p99"] for r in runs],
            [r["e2e_ms"]["p99"] for r in runs],
            names,
            out / "latency_throughput.png",
        )
        images.insert(0, "latency_throughput.png")
    if events is not None:
        _timeline(results[-1], events, out / "timeline.png")
        images.append("timeline.png")
    samples = [s for r in results for s in r.timeline]
    if samples:
        plots.series_png(samples, out / "resources.png", "resources during the run")
        images.append("resources.png")
    lines = [
        f"# shipyard bench: {meta['scenario']} against {meta['url']}",
        "",
        f"- model `{meta['model']}`, date {meta['date']}",
        f"- command: `{meta['command']}`",
        *(f"- {key}: {value}" for key, value in (extra or {}).items() if not isinstance(value, dict | list)),
        "",
        *_table(runs),
        "",
        *_resource_lines(runs),
        *(f"![{Path(name).stem}]({name})\n" for name in images),
    ]
    (out / "report.md").write_text("\n".join(lines))
    return summary


def _resource_lines(runs: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in runs for k in r.get("resources", {})})
    if not keys:
        return []
    lines = ["| load | " + " | ".join(f"{k} mean / peak" for k in keys) + " |", "| --- |" + " ---: |" * len(keys)]
    for r in runs:  # a level shorter than the sampling interval has no sample: a dash, not a KeyError
        seen = r.get("resources", {})
        cells = [f"{_fmt(seen[k]['mean'])} / {_fmt(seen[k]['peak'])}" if k in seen else "—" for k in keys]
        lines.append(f"| {level_name(r)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _timeline(result: LoadResult, events: list[dict[str, Any]], path: Path) -> None:
    series: dict[str, tuple[list[float], list[float]]] = {}
    for record in result.records:
        if record.ok and record.ttft_s is not None:
            xs, ys = series.setdefault(record.version or "?", ([], []))
            xs.append(record.started)
            ys.append(record.ttft_s * 1000)
    plots.timeline_png(
        series,
        path,
        ylabel="TTFT (ms)",
        title="TTFT of each request around the rollout (colour: version that served it)",
        marks=[(e["at_s"], e["label"]) for e in events],
        failures=[r.started for r in result.records if not r.ok],
    )


COMPARED = (
    ("ttft_ms", "p50"),
    ("ttft_ms", "p99"),
    ("tpot_ms", "p50"),
    ("e2e_ms", "p50"),
    ("e2e_ms", "p99"),
    ("output_tok_per_s", None),
    ("request_per_s", None),
    ("goodput", None),
    ("errors", None),
)


def load_summary(run: Path) -> dict[str, Any]:
    """summary.json of a run folder (or the file itself); ValueError with a one-line reason otherwise."""
    path = run / "summary.json" if run.is_dir() else run
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path} is not a shipyard bench summary (no 'runs' list)")
    return data


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the load levels both runs measured: each metric of A and B and B's change relative to A."""
    levels_b = {level_name(r): r for r in b["runs"]}
    rows = []
    for run_a in a["runs"]:
        run_b = levels_b.get(level_name(run_a))
        if run_b is None:
            continue
        for key, stat in COMPARED:
            va = run_a[key][stat] if stat else run_a[key]
            vb = run_b[key][stat] if stat else run_b[key]
            change = None if not va or math.isnan(va) or math.isnan(vb) else (vb - va) / va
            rows.append(
                {
                    "load": level_name(run_a),
                    "metric": f"{key} {stat}" if stat else key,
                    "a": va,
                    "b": vb,
                    "change": change,
                }
            )
    return rows


def compare_markdown(a_name: str, b_name: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"| load | metric | A: {a_name} | B: {b_name} | B vs A |", "| --- | --- | ---: | ---: | ---: |"]
    for row in rows:
        change = "—" if row["change"] is None else f"{row['change'] * 100:+.1f}%"
        lines.append(f"| {row['load']} | {row['metric']} | {_fmt(row['a'], 2)} | {_fmt(row['b'], 2)} | {change} |")
    return "\n".join(lines)
