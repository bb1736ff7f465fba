"""Tables of the GPU campaign, computed from its committed raw files (never typed in by hand).

python benchmarks/campaign_report.py benchmarks/results/2026-11-21-h200 > benchmarks/results/2026-11-21-h200/README.md
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

from shipyard.stats import summarize

TARGET_ADDED_TTFT_P50_MS, TARGET_ADDED_TTFT_P99_MS, TARGET_RATIO, TARGET_INTENT_P99_MS = 2.0, 5.0, 0.98, 40.0


def load(root: Path, name: str) -> dict[str, Any]:
    return json.loads((root / name).read_text())  # type: ignore[no-any-return]


def run0(summary: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return summary["runs"][index]  # type: ignore[no-any-return]


def f(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def overhead(root: Path) -> tuple[list[str], dict[str, Any]]:
    legs = load(root, "gateway_overhead.json")["legs"]
    lines = [
        "| concurrency | TTFT p50 direct / gateway (added) ms | TTFT p99 direct / gateway (added) ms | "
        "output tok/s direct / gateway (ratio) | gateway CPU mean / peak % | errors |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    worst: dict[str, float] = {"added_p50": -1e9, "added_p99": -1e9, "ratio": 1e9}
    for level in (1, 16, 64, 256):
        d, g = run0(legs[f"direct-c{level}"]), run0(legs[f"gateway-c{level}"])
        a50, a99 = g["ttft_ms"]["p50"] - d["ttft_ms"]["p50"], g["ttft_ms"]["p99"] - d["ttft_ms"]["p99"]
        ratio = g["output_tok_per_s"] / d["output_tok_per_s"]
        cpu = g["resources"].get("gateway_cpu_pct", {"mean": float("nan"), "peak": float("nan")})
        lines.append(
            f"| {level} | {f(d['ttft_ms']['p50'])} / {f(g['ttft_ms']['p50'])} ({a50:+.1f}) | "
            f"{f(d['ttft_ms']['p99'])} / {f(g['ttft_ms']['p99'])} ({a99:+.1f}) | {f(d['output_tok_per_s'], 0)} / "
            f"{f(g['output_tok_per_s'], 0)} ({ratio:.3f}) | {f(cpu['mean'])} / {f(cpu['peak'])} | "
            f"{d['errors'] + g['errors']} |"
        )
        worst = {
            "added_p50": max(worst["added_p50"], a50),
            "added_p99": max(worst["added_p99"], a99),
            "ratio": min(worst["ratio"], ratio),
        }
    repeat = load(root, "repeat_c256.json")["legs"]
    lines += [
        "",
        "c=256 again, A/B/A/B with 20 s windows (the first pass's 10 s window holds only two waves of 256):",
        "",
        "| leg | TTFT p50 / p99 ms | E2E p50 ms | output tok/s | gateway CPU mean / peak % |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, summary in repeat.items():
        r = run0(summary)
        cpu = r["resources"].get("gateway_cpu_pct")
        cpu_text = f"{f(cpu['mean'])} / {f(cpu['peak'])}" if cpu else "—"
        lines.append(
            f"| {name} | {f(r['ttft_ms']['p50'])} / {f(r['ttft_ms']['p99'])} | {f(r['e2e_ms']['p50'])} | "
            f"{f(r['output_tok_per_s'], 0)} | {cpu_text} |"
        )
    tok = {k: run0(v)["output_tok_per_s"] for k, v in repeat.items()}
    repeat_ratio = (tok["gateway-c256-1"] + tok["gateway-c256-2"]) / (tok["direct-c256-1"] + tok["direct-c256-2"])
    lines += ["", f"Gateway / direct throughput over both c=256 repeats: **{repeat_ratio:.3f}**."]
    return lines, {**worst, "c256_repeat_ratio": repeat_ratio}


def validation(root: Path) -> tuple[list[str], dict[str, Any]]:
    data = load(root, "validation.json")
    vb, sb = data["vllm_bench_serve"], run0(data["shipyard_bench"])
    pairs = [
        ("median TTFT ms", vb["median_ttft_ms"], sb["ttft_ms"]["p50"]),
        ("median TPOT ms", vb["median_tpot_ms"], sb["tpot_ms"]["p50"]),
        ("median ITL ms", vb["median_itl_ms"], sb["itl_ms"]["p50"]),
        ("median E2E ms", vb["median_e2el_ms"], sb["e2e_ms"]["p50"]),
        ("output tok/s", vb["output_throughput"], sb["output_tok_per_s"]),
        ("requests/s", vb["request_throughput"], sb["request_per_s"]),
    ]
    lines = ["| metric | vllm bench serve | shipyard bench | difference |", "| --- | ---: | ---: | ---: |"]
    worst = 0.0
    for name, a, b in pairs:
        diff = (b - a) / a
        worst = max(worst, abs(diff))
        lines.append(f"| {name} | {f(a, 2)} | {f(b, 2)} | {diff * 100:+.1f}% |")
    return lines, {"max_abs_difference": worst}


def naive(root: Path) -> tuple[list[str], dict[str, Any]]:
    hf = {row["batch"]: row for row in load(root, "hf_baseline.json")["rows"]}
    legs = load(root, "gateway_overhead.json")["legs"]
    g1, g16 = run0(legs["gateway-c1"]), run0(legs["gateway-c16"])
    lines = [
        "| stack, 512 in / 128 out | concurrency | TTFT p50 ms | TPOT p50 ms | E2E p50 ms | output tok/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| HF transformers `generate`, batch 1 | 1 | {f(hf[1]['ttft_ms'])} | {f(hf[1]['tpot_ms'], 2)} | "
        f"{f(hf[1]['e2e_ms'])} | {f(hf[1]['output_tok_per_s'])} |",
        f"| shipyard (gateway + vLLM) | 1 | {f(g1['ttft_ms']['p50'])} | {f(g1['tpot_ms']['p50'], 2)} | "
        f"{f(g1['e2e_ms']['p50'])} | {f(g1['output_tok_per_s'])} |",
        f"| HF transformers `generate`, static batch of 16 | 16 | {f(hf[16]['ttft_ms'])} | "
        f"{f(hf[16]['tpot_ms'], 2)} | {f(hf[16]['e2e_ms'])} | {f(hf[16]['output_tok_per_s'])} |",
        f"| HF, 16 requests one after another (a naive server) | 16 | — | {f(hf[1]['tpot_ms'], 2)} | "
        f"{f(hf[1]['e2e_ms'] * 8.5)} (mean, queued) | {f(hf[1]['output_tok_per_s'])} |",
        f"| shipyard (gateway + vLLM) | 16 | {f(g16['ttft_ms']['p50'])} | {f(g16['tpot_ms']['p50'], 2)} | "
        f"{f(g16['e2e_ms']['p50'])} | {f(g16['output_tok_per_s'])} |",
    ]
    ratios = {
        "c1_throughput_x": g1["output_tok_per_s"] / hf[1]["output_tok_per_s"],
        "c1_latency_x": hf[1]["e2e_ms"] / g1["e2e_ms"]["p50"],
        "c16_throughput_x_vs_static_batch": g16["output_tok_per_s"] / hf[16]["output_tok_per_s"],
        "c16_latency_x_vs_static_batch": hf[16]["e2e_ms"] / g16["e2e_ms"]["p50"],
    }
    lines += [
        "",
        f"shipyard vs HF at concurrency 1: **{ratios['c1_throughput_x']:.1f}x** the throughput, "
        f"**{ratios['c1_latency_x']:.1f}x** lower end-to-end latency; at 16 against HF's best case (one static "
        f"batch of 16): **{ratios['c16_throughput_x_vs_static_batch']:.1f}x** the throughput, "
        f"**{ratios['c16_latency_x_vs_static_batch']:.1f}x** lower latency. (The queued row is arithmetic on the "
        "batch-1 measurement: the i-th of 16 requests waits for i-1 before it, mean 8.5 generations.)",
    ]
    return lines, ratios


def ablation(root: Path) -> tuple[list[str], dict[str, Any]]:
    data = load(root, "ablation.json")
    rows: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]] = []
    for name, config in data["configs"].items():
        random = config["runs"]["random"]
        rows.append((name, config["flags"], run0(config["runs"]["chat_c64"]), run0(random, 0), run0(random, 1)))
    latency = load(root, "latency_profile.json")
    rows.append(
        (
            "fp8 + 2048 (latency profile) ¹",
            latency["flags"],
            run0(latency["runs"]["chat_c64"]),
            run0(latency["runs"]["random"], 0),
            run0(latency["runs"]["random"], 1),
        )
    )
    lines = [
        "| config | flags | chat c=64: TTFT p50 / p99 ms | chat TPOT p50 ms | chat tok/s | random c=4: TTFT p50 ms "
        "| c=4 TPOT p50 ms | c=4 E2E p99 ms | random c=64: TTFT p50 / p99 ms | c=64 tok/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, flags, chat, r4, r64 in rows:
        flag_text = " ".join(f"`{k}={v}`" for k, v in flags.items()) or "vLLM defaults"
        lines.append(
            f"| {name} | {flag_text} | {f(chat['ttft_ms']['p50'])} / {f(chat['ttft_ms']['p99'])} | "
            f"{f(chat['tpot_ms']['p50'], 2)} | {f(chat['output_tok_per_s'], 0)} | {f(r4['ttft_ms']['p50'])} | "
            f"{f(r4['tpot_ms']['p50'], 2)} | {f(r4['e2e_ms']['p99'])} | {f(r64['ttft_ms']['p50'])} / "
            f"{f(r64['ttft_ms']['p99'])} | {f(r64['output_tok_per_s'], 0)} |"
        )
    return lines, {}


def intent(root: Path) -> tuple[list[str], dict[str, Any]]:
    bf16 = load(root, "intent_slo.json")["bench"]["runs"]
    fp8 = load(root, "latency_profile.json")["intent"]["runs"]
    tokens = load(root, "latency_profile.json")["gateway_counters"]["per_request"]
    lines = [
        "| rate req/s | bf16 defaults: E2E p50 / p99 ms | errors | GPU util mean % | latency profile (fp8 + 2048): "
        "E2E p50 / p99 ms | errors | target P99 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    p99_at_200 = {}
    for a, b in zip(bf16, fp8, strict=True):
        gpu = a["resources"].get("gpu0_util_pct", {}).get("mean", float("nan"))
        met = "met" if min(a["e2e_ms"]["p99"], b["e2e_ms"]["p99"]) <= TARGET_INTENT_P99_MS else "missed"
        lines.append(
            f"| {a['rate']:g} | {f(a['e2e_ms']['p50'])} / {f(a['e2e_ms']['p99'])} | {a['errors']} | {f(gpu)} | "
            f"{f(b['e2e_ms']['p50'])} / {f(b['e2e_ms']['p99'])} | {b['errors']} | "
            f"{'≤ 40 ms at 200 req/s: ' + met if a['rate'] == 200 else ''} |"
        )
        if a["rate"] == 200:
            p99_at_200 = {"bf16": a["e2e_ms"]["p99"], "fp8_2048": b["e2e_ms"]["p99"]}
    lines += [
        "",
        f"Output tokens per classification (the gateway's counters, latency-profile run): **{tokens:.1f}**, i.e. "
        "one prefill and 8 decode steps of a 7B model per answer.",
    ]
    return lines, {"p99_at_200": p99_at_200, "output_tokens_per_request": tokens}


def rollout(root: Path) -> tuple[list[str], dict[str, Any]]:
    bench = load(root, "rollout.json")["bench"]
    run, record = run0(bench), bench["rollout"]
    with gzip.open(root / "runs/rollout/requests.jsonl.gz", "rt") as handle:
        rows = [json.loads(line) for line in handle]
    posted = 10.0  # --rollout-at
    switch = posted + next(h["at_s"] for h in record["history"] if h["phase"] == "switching")
    windows = {
        "before the rollout (0-10 s)": (0.0, posted),
        "green starting beside blue (same GPU)": (posted, switch),
        "±2 s around the switch": (switch - 2, switch + 2),
        "after (switch + 5 s to end)": (switch + 5, run["window_s"]),
    }
    lines = ["| window | requests | failed | TTFT p50 / p99 ms | served by |", "| --- | ---: | ---: | ---: | --- |"]
    for name, (start, end) in windows.items():
        inside = [r for r in rows if start <= r["started"] < end]
        ok = [r for r in inside if r["ok"]]
        stats = summarize([r["ttft_ms"] for r in ok if r["ttft_ms"] is not None])
        served = sorted({r["version"] for r in ok})
        lines.append(
            f"| {name} | {len(inside)} | {len(inside) - len(ok)} | {f(stats['p50'])} / {f(stats['p99'])} | "
            f"{', '.join(served)} |"
        )
    facts = {
        "requests": run["requests"],
        "failed": run["errors"],
        "served_by": run["served_by"],
        "new_replica_start_s": record["durations_s"]["starting"],
        "warm_up_s": record["durations_s"]["warming"],
        "switch_s": record["facts"]["switch_s"],
        "drain_s": record["durations_s"]["draining"],
    }
    lines += [
        "",
        f"{facts['requests']} streams measured, **{facts['failed']} failed**; served by {facts['served_by']}. "
        f"Green started in {facts['new_replica_start_s']:.1f} s beside blue, warm-up {facts['warm_up_s']:.2f} s, "
        f"weights switched in **{facts['switch_s'] * 1000:.2f} ms**, blue drained its "
        f"{record['facts']['drained_in_flight']} in-flight streams in {facts['drain_s']:.2f} s.",
    ]
    return lines, facts


def main() -> None:
    root = Path(sys.argv[1])
    meta = load(root, "gateway_overhead.json")
    sections = [
        ("a. Gateway overhead (random 512 in / 128 out, streaming, closed loop, 10 s windows)", overhead),
        ("a'. shipyard bench vs `vllm bench serve` (same server, 320 requests, concurrency 16)", validation),
        ("b. Versus the naive stack (HF transformers `generate`)", naive),
        ("c. Tuning ablation (engine straight, 10 s windows)", ablation),
        ("d. Intent endpoint SLO (`/v1/intent` through the gateway, Poisson arrivals, 10 s)", intent),
        ("e. Blue-green on one GPU under 64 streams (two engines at 0.4 of the memory each)", rollout),
    ]
    out = [
        f"# GPU campaign — {meta['device']['gpu']} ({meta['date'][:10]})",
        "",
        f"Device: {meta['device']['gpu']}, {meta['device']['memory']}, driver {meta['device']['driver']}; "
        f"torch {meta['torch']}, vLLM {meta['vllm']}. Model: {meta['model']}. Every number below is computed by "
        "`benchmarks/campaign_report.py` from the JSON files in this folder; each run's own summary, report, plots "
        "and per-request records are under `runs/`, engine and gateway logs under `logs/`.",
        "",
    ]
    headlines: dict[str, Any] = {}
    for title, build in sections:
        lines, facts = build(root)
        headlines[build.__name__] = facts
        out += [f"## {title}", "", *lines, ""]
    out += [
        "¹ measured on a later machine of the same kind (H200) the same day; the other ablation rows share one "
        "machine.",
        "",
    ]
    print("\n".join(out))
    (root / "headlines.json").write_text(json.dumps(headlines, indent=1))


if __name__ == "__main__":
    main()
