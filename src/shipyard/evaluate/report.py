"""Writing an evaluation run to a folder, and comparing several runs side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from shipyard import plots
from shipyard.evaluate.tasks import EvalRun


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_run(out: Path, run: EvalRun) -> list[Path]:
    """summary.json, predictions.jsonl, report.md and PNG plots; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    s = run.summary
    written = [out / "summary.json", out / "predictions.jsonl", out / "report.md"]
    written[0].write_text(json.dumps(s, indent=2, ensure_ascii=False))
    written[1].write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in run.predictions))
    latencies = [p["latency_ms"] for p in run.predictions if p["error"] is None]
    plots.latency_cdf_png({s.get("model") or "model": latencies}, out / "latency_cdf.png")
    written.append(out / "latency_cdf.png")
    lines = [
        f"# {s['task']} evaluation",
        "",
        f"- model: `{s.get('model')}` via {s['url']}",
        f"- dataset: `{s['dataset']}` ({s['n']} examples, {len(s['skipped_lines'])} malformed lines skipped)",
        f"- date: {s['date']}, wall time {s['wall_s']} s, {s['errors']} failed requests",
        "",
    ]
    lat = s["latency_ms"]
    if s["task"] == "intent":
        labels = list(s["per_label"])
        plots.confusion_png(s["confusion"], [lab for lab in labels if lab in s["confusion"]], out / "confusion.png")
        written.append(out / "confusion.png")
        lines += [
            "| accuracy | macro-F1 | accuracy (ambiguous: either label) | p50 ms | p90 ms | p99 ms |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {_fmt(s['accuracy'])} | {_fmt(s['macro_f1'])} | {_fmt(s['accuracy_lenient'])} | "
            f"{_fmt(lat['p50'], 1)} | {_fmt(lat['p90'], 1)} | {_fmt(lat['p99'], 1)} |",
            "",
        ]
        if s.get("accuracy_by_tag"):
            lines += ["| subset | accuracy |", "| --- | ---: |"]
            lines += [f"| {tag} | {_fmt(acc)} |" for tag, acc in s["accuracy_by_tag"].items()]
            lines.append("")
        if s.get("prefix_cache"):
            pc = s["prefix_cache"]
            lines += [
                f"Engine prefix cache during this run: {_fmt(pc['hit_rate'])} of "
                f"{int(pc['queries_tokens'])} prompt tokens were served from cache.",
                "",
            ]
        lines += ["| label | precision | recall | F1 | support |", "| --- | ---: | ---: | ---: | ---: |"]
        lines += [
            f"| {lab} | {_fmt(v['precision'])} | {_fmt(v['recall'])} | {_fmt(v['f1'])} | {v['support']} |"
            for lab, v in s["per_label"].items()
        ]
        lines += ["", "![confusion](confusion.png)", ""]
    else:
        cosines = [p["cosine"] for p in run.predictions if p["cosine"] is not None]
        plots.histogram_png(cosines, s["threshold"], out / "cosine_hist.png", "reply similarity to reference")
        written.append(out / "cosine_hist.png")
        lines += [
            "| pass rate (cos ≥ 0.85) | mean cosine | schema-valid rate | p50 ms | p90 ms | p99 ms |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {_fmt(s['pass_rate_085'])} | {_fmt(s['mean_cosine'])} | {_fmt(s['schema_valid_rate'])} | "
            f"{_fmt(lat['p50'], 1)} | {_fmt(lat['p90'], 1)} | {_fmt(lat['p99'], 1)} |",
            "",
            "![cosine](cosine_hist.png)",
            "",
        ]
    lines += ["![latency](latency_cdf.png)", ""]
    if s["error_samples"]:
        lines += ["Errors seen:", "", *[f"- {e}" for e in s["error_samples"]], ""]
    written[2].write_text("\n".join(lines))
    return written


def compare_runs(run_dirs: list[Path], out: Path) -> dict[str, Any]:
    """Side-by-side table (compare.md, compare.json) and plots of several runs' summary.json."""
    rows: list[dict[str, Any]] = []
    latencies: dict[str, list[float]] = {}
    for run_dir in run_dirs:
        summary_file = run_dir / "summary.json"
        if not summary_file.is_file():
            raise FileNotFoundError(f"{run_dir} has no summary.json (is it a `shipyard eval` output folder?)")
        s = json.loads(summary_file.read_text())
        name = run_dir.name
        rows.append(
            {
                "run": name,
                "task": s.get("task"),
                "model": s.get("model"),
                "n": s.get("n"),
                "accuracy": s.get("accuracy"),
                "macro_f1": s.get("macro_f1"),
                "pass_rate_085": s.get("pass_rate_085"),
                "mean_cosine": s.get("mean_cosine"),
                "p50_ms": s["latency_ms"]["p50"],
                "p99_ms": s["latency_ms"]["p99"],
                "errors": s.get("errors"),
            }
        )
        predictions = run_dir / "predictions.jsonl"
        if predictions.is_file():
            latencies[name] = [json.loads(line)["latency_ms"] for line in predictions.read_text().splitlines() if line]
    out.mkdir(parents=True, exist_ok=True)
    header = [
        "run",
        "task",
        "model",
        "n",
        "accuracy",
        "macro_f1",
        "pass_rate_085",
        "mean_cosine",
        "p50_ms",
        "p99_ms",
        "errors",
    ]
    table = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    table += ["| " + " | ".join(_fmt(r[h]) for h in header) + " |" for r in rows]
    (out / "compare.md").write_text(
        "# comparison\n\n" + "\n".join(table) + "\n\n![metrics](compare.png)\n\n![latency](compare_latency.png)\n"
    )
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    names = [r["run"] for r in rows]
    metrics = {
        m: [r[m] if isinstance(r[m], (int, float)) else 0.0 for r in rows]
        for m in ("accuracy", "macro_f1", "pass_rate_085", "p99_ms")
        if any(r[m] is not None for r in rows)
    }
    plots.bars_png(names, metrics, out / "compare.png", "model versions")
    plots.latency_cdf_png(latencies, out / "compare_latency.png")
    return {"rows": rows, "table": "\n".join(table)}
