"""Tables of the /v1/intent ceiling runs (benchmarks/intent_ceiling.py), from their raw files.

python3 benchmarks/intent_report.py benchmarks/results/2026-12-02-h200 > benchmarks/results/2026-12-02-h200/README.md
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


def main() -> None:
    folder = Path(sys.argv[1])
    files = sorted(folder.glob("*/intent_ceiling.json"))
    configs = [json.loads(f.read_text()) for f in files]
    first = configs[0]
    print("# /v1/intent on one H200: shortest decode, the P99 ceiling, gateway vs straight to vLLM\n")
    print(
        f"Device: {first['device']['gpu']} ({first['device']['memory']}, driver {first['device']['driver']}), "
        f"torch {first['torch']}, vLLM {first['vllm']}; {first['model']}; dates {first['date']} and after."
    )
    print("Command per configuration (one device call each, engine started fresh):\n")
    for c in configs:
        print(f"- `{c['command']}` — flags `{c['flags']}`, engine ready in {c['engine_start_s']:.0f} s")
    print(
        "\nLoad: `shipyard bench` open loop (Poisson), 5 s measured after 2 s warm-up per level, texts of "
        "data/intent/test.jsonl; `gateway` = `--scenario intent` through `shipyard serve`, `direct` = "
        "`--scenario intent-engine` (the same chat completion the gateway sends) straight to vLLM. Sweeps stop "
        "after the first level whose P99 passes 1 s. Legs ran one after the other in this order: gateway sweep, "
        "direct sweep, direct full decode, gateway find-max, gateway full decode.\n"
    )
    print("## Highest rate meeting each P99 bound (from the sweeps; no errors)\n")
    print("| config | target | P99 ≤ 82 ms | P99 ≤ 40 ms |")
    print("| --- | --- | ---: | ---: |")
    for c in configs:
        for target in ("gateway", "direct"):
            leg = c["legs"].get(f"{target}-sweep")
            if leg:
                r = runs(leg)
                print(f"| {c['config']} | {target} | {best_rate(r, 82)} | {best_rate(r, 40)} |")
    print("\n## Every level\n")
    print(
        "| config | leg | asked req/s | achieved req/s | send lag p99 ms | load-gen CPU | requests | errors | "
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
                    f"| {c['config']} | {name} | {r['rate']:g} | {r['achieved_rate']:.1f} | "
                    f"{r['send_lag_ms']['p99']:.1f} | {r['loadgen_cpu_cores']:.2f} | {r['requests']} | {r['errors']} | "
                    f"{r['e2e_ms']['p50']:.1f} | {r['e2e_ms']['p99']:.1f} | "
                    f"{'—' if gw is None else f'{gw:.0f}'} | {'—' if gpu is None else f'{gpu:.0f}'} |"
                )
    print("\n## Where the time goes (sampled every 0.25 s per leg: mean / peak)\n")
    print(
        "| config | leg | vLLM API server(s) CPU cores | vLLM engine core CPU cores | gateway CPU cores | "
        "running | waiting |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for c in configs:
        for name, s in c["sampled"].items():

            def cell(key: str, s: dict[str, Any] = s) -> str:
                return f"{s[key]['mean']:.2f} / {s[key]['max']:.2f}" if key in s else "—"

            print(
                f"| {c['config']} | {name} | {cell('vllm_api_server_cpu')} | {cell('vllm_engine_core_cpu')} | "
                f"{cell('gateway_cpu')} | {cell('num_requests_running')} | {cell('num_requests_waiting')} |"
            )


if __name__ == "__main__":
    main()
