"""PNG plots for evaluation and bench reports (matplotlib, headless; imported on first use, so commands that
draw nothing do not pay its ~0.7 s import)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_png(confusion: Mapping[str, Mapping[str, int]], labels: Sequence[str], path: Path) -> None:
    plt = _pyplot()
    columns = list(labels) + (["<error>"] if any("<error>" in row for row in confusion.values()) else [])
    grid = [[confusion.get(g, {}).get(p, 0) for p in columns] for g in labels]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(columns), 1.0 + 0.45 * len(labels)))
    image = ax.imshow(grid, cmap="Blues")
    ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value:
                ax.text(
                    j,
                    i,
                    str(value),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if value > max(max(r) for r in grid) / 2 else "black",
                )
    fig.colorbar(image, ax=ax, fraction=0.03)
    ax.set_title("confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def histogram_png(values: Sequence[float], threshold: float, path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=20, range=(min([0.0, *values]), 1.0), color="#4878d0", edgecolor="white")
    ax.axvline(threshold, color="#d65f5f", linestyle="--", label=f"pass ≥ {threshold}")
    ax.set_xlabel("cosine similarity to the reference reply")
    ax.set_ylabel("replies")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latency_cdf_png(series: Mapping[str, Sequence[float]], path: Path, title: str = "latency CDF") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in series.items():
        ordered = sorted(values)
        if ordered:
            ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=name)
    ax.set_xlabel("end-to-end latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(series.values()):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bars_png(names: Sequence[str], metrics: Mapping[str, Sequence[float]], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.5), squeeze=False)
    for ax, (metric, values) in zip(axes[0], metrics.items(), strict=True):
        ax.bar(range(len(names)), values, color="#4878d0")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latency_throughput_png(
    throughput: Sequence[float],
    ttft_p99: Sequence[float],
    e2e_p99: Sequence[float],
    labels: Sequence[str],
    path: Path,
) -> None:
    """The latency–throughput curve of a sweep: one point per load level."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(throughput, e2e_p99, marker="o", label="E2E p99")
    ax.plot(throughput, ttft_p99, marker="s", label="TTFT p99")
    for x, y, label in zip(throughput, e2e_p99, labels, strict=True):
        ax.annotate(label, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("latency (ms)")
    ax.set_title("latency vs throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def timeline_png(
    points: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    *,
    ylabel: str,
    title: str,
    marks: Sequence[tuple[float, str]] = (),
    failures: Sequence[float] = (),
) -> None:
    """Per-request latency over time (one colour per series, e.g. per version that served it), vertical marks
    for events (a rollout's phases) and red crosses on the time axis for failed requests."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for name, (xs, ys) in points.items():
        ax.scatter(xs, ys, s=6, label=name, alpha=0.7)
    if failures:
        ax.scatter(failures, [0.0] * len(failures), marker="x", color="red", label="failed", zorder=3)
    for at, label in marks:
        ax.axvline(at, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(label, (at, ax.get_ylim()[1]), fontsize=7, rotation=90, va="top", ha="right")
    ax.set_xlabel("request start (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def series_png(samples: Sequence[Mapping[str, float]], path: Path, title: str = "resources") -> None:
    """Resource timeline: one panel per kind of series (CPU %, memory MiB, GPU %), ``t`` on the x axis."""
    plt = _pyplot()
    keys = sorted({k for s in samples for k in s if k != "t"})
    kinds = [("_pct", "percent"), ("_mib", "MiB")]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(8, 5), sharex=True)
    for ax, (suffix, unit) in zip(axes, kinds, strict=True):
        for key in (k for k in keys if k.endswith(suffix)):
            ax.plot([s["t"] for s in samples if key in s], [s[key] for s in samples if key in s], label=key)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_title(title)
    axes[-1].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
