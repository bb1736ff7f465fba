"""Tables of the /v1/intent ceiling runs (benchmarks/intent_ceiling.py) and of the side-by-side rounds
(benchmarks/intent_ab.py), from their raw files.

python3 benchmarks/intent_report.py benchmarks/results/DIR > benchmarks/results/DIR/README.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BOUNDS = (82.0, 40.0)


def runs(leg: Any) -> list[dict[str, Any]]:
    summaries = leg if isinstance(leg, list) else [leg]
    return [run for summary in summaries for run in summary["runs"]]


def best_rate(leg_runs: list[dict[str, Any]], bound: float) -> str:
    passing = [r["rate"] for r in leg_runs if not r["errors"] and r["e2e_ms"]["p99"] <= bound]
    return f"{max(passing):g} req/s" if passing else "none of the rates tried"


def find_max_cell(leg: Any) -> str:
    if not leg:
        return "not run"
    found = leg.get("find_max", {}).get("max_rate")
    tried = ", ".join(f"{r['rate']:g}" for r in leg["runs"])
    return f"{'none' if found is None else f'{found:g} req/s'} (tried {tried})"


def main() -> None:
    folder = Path(sys.argv[1])
    files = sorted(folder.glob("*/intent_ceiling.json"))
    configs = [{**json.loads(f.read_text()), "run": f.parent.name} for f in files]
    rounds = [{**json.loads(f.read_text()), "run": f.parent.name} for f in sorted(folder.glob("*/intent_ab.json"))]
    first = (configs or rounds)[0]
    print("# /v1/intent on one H200: the one-token decode, the P99 ceiling, gateway vs straight to vLLM\n")
    print(
        f"Device: {first['device']['gpu']} ({first['device']['memory']}, driver {first['device']['driver']}), "
        f"torch {first['torch']}, vLLM {first['vllm']}; {first['model']}. One device call per run, engine "
        "started fresh (the run's folder name is its label below):\n"
    )
    for c in [*configs, *rounds]:
        print(
            f"- **{c['run']}** ({c['date']}): `{c['command']}` — flags `{c['flags']}`, "
            f"labels {c.get('labels', 'packaged')}, engine ready in {c['engine_start_s']:.0f} s"
            + (f"; skipped for time: {', '.join(c['skipped'])}" if c.get("skipped") else "")
        )
    print(
        "\nLoad: `shipyard bench` open loop (Poisson), texts of data/intent/test.jsonl; `gateway…` = "
        "`--scenario intent` through `shipyard serve` (`intent.decode` shortest, the default), `direct` = "
        "`--scenario intent-engine` (the first chat completion the gateway sends: one token, "
        "`allowed_token_ids`) straight to vLLM.\n"
        if not configs
        else "\nLoad: `shipyard bench` open loop (Poisson), 5 s measured after 2 s warm-up per level, texts of "
        "data/intent/test.jsonl; `gateway` = `--scenario intent` through `shipyard serve` (`intent.decode` "
        "shortest, the default), `direct` = `--scenario intent-engine` (the first chat completion the gateway "
        "sends: one token, `allowed_token_ids`) straight to vLLM; `direct-stop-strings-200` / `direct-full-200` "
        "are the other decodes straight to vLLM in the same run. Sweeps stop after the first level whose P99 "
        "passes 1 s. Legs ran in this order: gateway sweep, direct sweep, the two other decodes, find-max 82 ms "
        "and 40 ms through the gateway (each from the sweep's best rate within its bound, else 50 req/s). "
        "`gateway-wN` = the gateway with N processes (`shipyard serve --workers N`), swept after the one-process "
        "gateway on the same engine; find-max then runs on the process count whose sweep went highest.\n"
    )
    if rounds:
        side_by_side(rounds)
    if not configs:
        return
    print("## Highest rate meeting each P99 bound (no errors)\n")
    print("| run | target | sweep: P99 ≤ 82 ms | sweep: P99 ≤ 40 ms | find-max 82 ms | find-max 40 ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for c in configs:
        searched = c.get("find_max_workers", 1)
        for name, leg in c["legs"].items():
            if not name.endswith("-sweep"):
                continue
            target = name.removesuffix("-sweep")
            r = runs(leg)
            workers = int(target.removeprefix("gateway-w")) if target.startswith("gateway-w") else 1
            fm = (
                (
                    find_max_cell(c["legs"].get("gateway-find-max-82")),
                    find_max_cell(c["legs"].get("gateway-find-max-40")),
                )
                if target.startswith("gateway") and workers == searched
                else ("—", "—")
            )
            print(f"| {c['run']} | {target} | {best_rate(r, 82)} | {best_rate(r, 40)} | {fm[0]} | {fm[1]} |")
    print("\n## How the gateway's classifications were decoded (its `shipyard_intent_output_tokens`, whole run)\n")
    print("| run | path that gave the label | classifications | output tokens each |")
    print("| --- | --- | ---: | ---: |")
    for c in configs:
        for key, row in sorted(c.get("gateway_intent_tokens", {}).items()):
            print(f"| {c['run']} | {key.split('/')[1]} | {row['count']:.0f} | {row['per_request']:.2f} |")
    print("\n## Every level\n")
    print(
        "| run | leg | asked req/s | achieved req/s | send lag p99 ms | load-gen CPU | requests | errors | "
        "E2E p50 ms | E2E p99 ms | gateway CPU % | GPU util % |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in configs:
        for name, leg in c["legs"].items():
            for r in runs(leg):
                res = r.get("resources", {})
                gw = res.get("gateway_cpu_pct", {}).get("mean")
                gpu = res.get("gpu0_util_pct", {}).get("mean")
                print(
                    f"| {c['run']} | {name} | {r['rate']:g} | {r['achieved_rate']:.1f} | "
                    f"{r['send_lag_ms']['p99']:.1f} | {r['loadgen_cpu_cores']:.2f} | {r['requests']} | {r['errors']} | "
                    f"{r['e2e_ms']['p50']:.1f} | {r['e2e_ms']['p99']:.1f} | "
                    f"{'—' if gw is None else f'{gw:.0f}'} | {'—' if gpu is None else f'{gpu:.0f}'} |"
                )
    print("\n## Where the time goes (sampled every 0.25 s per leg: mean / peak)\n")
    print(
        "| run | leg | vLLM API server(s) CPU cores | vLLM engine core CPU cores | gateway CPU cores | "
        "running | waiting |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for c in configs:
        for name, s in c["sampled"].items():

            def cell(key: str, s: dict[str, Any] = s) -> str:
                return f"{s[key]['mean']:.2f} / {s[key]['max']:.2f}" if key in s else "—"

            print(
                f"| {c['run']} | {name} | {cell('vllm_api_server_cpu')} | {cell('vllm_engine_core_cpu')} | "
                f"{cell('gateway_cpu')} | {cell('num_requests_running')} | {cell('num_requests_waiting')} |"
            )


def side_by_side(rounds: list[dict[str, Any]]) -> None:
    """benchmarks/intent_ab.py: every target once per rate and round, the order rotating; pooled over rounds."""
    print("## Side by side: straight to vLLM and through the gateway, interleaved in rounds\n")
    for c in rounds:
        engines = c.get("engines", 1)
        print(
            f"Run **{c['run']}**: {engines} engine{'s on the one GPU' if engines > 1 else ''}"
            f"{' (`gateway-wN-eM`: the gateway in front of the first M as replicas)' if engines > 1 else ''}; "
            f"{len(c['rounds'])} rounds; each round runs every target once per rate "
            f"(`shipyard bench`, open loop, {c['rounds'][0]['runs'][0]['run']['window_s']:g} s measured after 2 s "
            "warm-up), the order rotating from round to round. Pooled = P50/P99 over every request of every "
            "round.\n"
        )
        print("| target @ rate | requests | errors | pooled E2E p50 ms | pooled E2E p99 ms | p99 of each round (ms) |")
        print("| --- | ---: | ---: | ---: | ---: | --- |")
        for key, cell in c["pooled"].items():
            target, rate = key.split("@")
            each = [
                f"{e['run']['e2e_ms']['p99']:.1f}"
                for r in c["rounds"]
                for e in r["runs"]
                if e["target"] == target and f"{e['rate']:g}" == rate
            ]
            print(
                f"| {key} | {cell['requests']} | {cell['errors']} | {cell['p50_ms']:.1f} | {cell['p99_ms']:.1f} | "
                f"{' / '.join(each)} |"
            )
        print(
            "\n| round | order | target @ rate | achieved req/s | send lag p99 ms | E2E p50 ms | E2E p99 ms | "
            "gateway CPU % |"
        )
        print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for i, r in enumerate(c["rounds"], 1):
            for e in r["runs"]:
                run = e["run"]
                gw = run.get("resources", {}).get("gateway_cpu_pct", {}).get("mean")
                print(
                    f"| {i} | {', '.join(r['order'])} | {e['target']} @ {e['rate']:g} | {run['achieved_rate']:.1f} | "
                    f"{run['send_lag_ms']['p99']:.1f} | {run['e2e_ms']['p50']:.1f} | {run['e2e_ms']['p99']:.1f} | "
                    f"{'—' if gw is None else f'{gw:.0f}'} |"
                )
        print(
            "\n| target @ rate | vLLM API server CPU cores | vLLM engine core CPU cores | gateway CPU cores | running |"
        )
        print("| --- | ---: | ---: | ---: | ---: |")
        for leg, v in c["sampled"].items():
            print(
                f"| {leg} | {v['vllm_api_server_cpu']['mean']:.2f} / {v['vllm_api_server_cpu']['max']:.2f} | "
                f"{v['vllm_engine_core_cpu']['mean']:.2f} / {v['vllm_engine_core_cpu']['max']:.2f} | "
                f"{v['gateway_cpu']['mean']:.2f} / {v['gateway_cpu']['max']:.2f} | "
                f"{v['num_requests_running']['mean']:.2f} / {v['num_requests_running']['max']:.0f} |"
            )
        print("\n(mean / peak, sampled every 0.25 s over all rounds of a target and rate)\n")
        engine_split(c)


def engine_split(c: dict[str, Any]) -> None:
    """What vLLM's own histograms say of the same requests, averaged over the rounds: the client's mean E2E beside
    vLLM's (arrival in vLLM to the end), its queue and prefill times, engine steps and tokens per step."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for r in c["rounds"]:
        for e in r["runs"]:
            if e.get("vllm"):
                cells.setdefault(f"{e['target']}@{e['rate']:g}", []).append(e)
    if not cells:
        return
    print(
        "| target @ rate | client E2E mean ms | vLLM arrival→end mean ms | queued mean ms | prefill mean ms | "
        "engine steps/s | tokens per step | prompt tokens per request | prefix-cache hit rate | GPU busy % |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")

    def avg(entries: list[dict[str, Any]], key: str) -> str:
        values = [e["vllm"][key] for e in entries if e["vllm"].get(key) is not None]
        return f"{sum(values) / len(values):.2f}" if values else "—"

    def gpu_busy(entries: list[dict[str, Any]]) -> str:
        values = [e["run"].get("resources", {}).get("gpu0_util_pct", {}).get("mean") for e in entries]
        known = [v for v in values if v is not None]
        return f"{sum(known) / len(known):.0f}" if known else "—"

    for key, entries in cells.items():
        client = sum(e["run"]["e2e_ms"]["mean"] for e in entries) / len(entries)
        window = sum(e["run"]["window_s"] + 2 for e in entries)  # the engine counts the warm-up's steps too
        steps = sum(e["vllm"]["steps"] for e in entries) / window
        print(
            f"| {key} | {client:.1f} | {avg(entries, 'e2e_mean_ms')} | {avg(entries, 'queue_mean_ms')} | "
            f"{avg(entries, 'prefill_mean_ms')} | {steps:.0f} | {avg(entries, 'tokens_per_step')} | "
            f"{avg(entries, 'prompt_tokens_per_request')} | {avg(entries, 'prefix_hit_rate')} | {gpu_busy(entries)} |"
        )
    print(
        "\n(vLLM's `e2e_request_latency`, `request_queue_time`, `request_prefill_time` and `iteration_tokens_total` "
        "histograms and prefix-cache counters, read before and after each run over the engines the target uses; "
        "they include the 2 s warm-up; client E2E is `shipyard bench`'s over the measured window; GPU busy: NVML "
        "utilisation sampled by `shipyard bench`, mean)\n"
    )


if __name__ == "__main__":
    main()
