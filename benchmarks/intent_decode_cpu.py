"""The decodes of /v1/intent side by side in one run on one real vLLM-CPU engine (default model).

Three gateways (`shipyard serve --no-engine`, `SHIPYARD_INTENT__DECODE=shortest|stop-strings|full`) in front of
the same engine; each is warmed up (3 classifications, 1 s: the shortest one reads the engine's tokenizer) and
its token histogram read after that, so the figures cover the measured requests only.
1. Sameness: every example of data/intent/test.jsonl with the packaged labels, and the same texts with a
   zero-shot label set that has a label which is a prefix of another (the case a short answer cannot decide),
   sent to every gateway one after the other (order rotating): predictions compared with full decoding one by
   one, latency of each call, output tokens per classification and the path that gave the label from each
   gateway's `shipyard_intent_output_tokens` histogram.
2. Load: `shipyard bench --scenario intent --rate R` against each gateway, A B C A B C, the engine's prefix cache
   emptied before each (the legs send the same texts: a later leg would find the earlier one's prompts cached).

    .venv/bin/python benchmarks/intent_decode_cpu.py --out reports/intent/2026-12-02-cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from shipyard.engine import EngineProcess, EngineSpec, free_port
from shipyard.engine.process import wait_until_ready
from shipyard.prepare.default_model import DEFAULT_MODEL_NAME, pull_default
from shipyard.stats import summarize
from shipyard.tasks.datasets import IntentExample, load_jsonl

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-intent-decode"
MODES = ("shortest", "stop-strings", "full")
ZERO_SHOT = ["card", "card_payment", "order", "delivery", "account", "money_transfer", "other"]


def start_gateway(work: Path, mode: str, engine_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "SHIPYARD_API_KEYS": KEY,
        "SHIPYARD_ADMIN_KEYS": f"{KEY}-admin-{mode}",
        "SHIPYARD_DATA_DIR": str(work / mode),
        "SHIPYARD_INTENT__DECODE": mode,
    }
    log = open(work / f"gateway-{mode}.log", "ab")  # noqa: SIM115 - lives as long as the process
    command = [sys.executable, "-m", "shipyard.cli", "serve", "--no-engine", "--upstream", engine_url]
    proc = subprocess.Popen([*command, "--port", str(port)], env=env, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(proc, url, 120, str(work / f"gateway-{mode}.log"))
    return proc, url


def intent_tokens(url: str) -> dict[str, dict[str, float]]:
    """``shipyard_intent_output_tokens`` of one gateway: {"decode/outcome": {"count", "sum", "per_request"}}."""
    rows: dict[str, dict[str, float]] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        for part in ("sum", "count"):
            if line.startswith(f"shipyard_intent_output_tokens_{part}{{"):
                labels = dict(item.split("=") for item in line.split("{", 1)[1].split("}", 1)[0].split(","))
                key = f"{labels['decode'].strip(chr(34))}/{labels['outcome'].strip(chr(34))}"
                rows.setdefault(key, {})[part] = float(line.rsplit(" ", 1)[1])
    for row in rows.values():
        row["per_request"] = row.get("sum", 0.0) / row["count"] if row.get("count") else 0.0
    return rows


def classify(http: httpx.Client, url: str, text: str, labels: list[str] | None) -> tuple[str, float]:
    body: dict[str, Any] = {"text": text, **({"labels": labels} if labels else {})}
    started = time.perf_counter()
    response = http.post(f"{url}/v1/intent", json=body)
    elapsed = (time.perf_counter() - started) * 1000
    response.raise_for_status()
    return str(response.json()["intent"]), elapsed


def sameness(urls: dict[str, str], examples: list[IntentExample], labels: list[str] | None) -> dict[str, Any]:
    predictions: dict[str, list[str]] = {mode: [] for mode in MODES}
    latency: dict[str, list[float]] = {mode: [] for mode in MODES}
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
        for i, example in enumerate(examples):
            for mode in MODES[i % len(MODES) :] + MODES[: i % len(MODES)]:
                intent, ms = classify(http, urls[mode], example.text, labels)
                predictions[mode].append(intent)
                latency[mode].append(ms)
    differing = [
        {"text": e.text, **{mode: predictions[mode][i] for mode in MODES}}
        for i, e in enumerate(examples)
        if len({predictions[mode][i] for mode in MODES}) > 1
    ]
    result: dict[str, Any] = {
        "labels": labels or "packaged",
        "examples": len(examples),
        "identical": len(examples) - len(differing),
        "differing": differing,
        "latency_ms": {mode: summarize(values) for mode, values in latency.items()},
    }
    if labels is None:
        result["accuracy"] = {
            mode: sum(p == e.label for p, e in zip(predictions[mode], examples, strict=True)) / len(examples)
            for mode in MODES
        }
    return result


def since(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The histogram rows of the requests between two readings."""
    rows: dict[str, dict[str, float]] = {}
    for key, row in after.items():
        count = row.get("count", 0.0) - before.get(key, {}).get("count", 0.0)
        total = row.get("sum", 0.0) - before.get(key, {}).get("sum", 0.0)
        if count:
            rows[key] = {"count": count, "sum": total, "per_request": total / count}
    return rows


def warm_up(urls: dict[str, str]) -> dict[str, dict[str, dict[str, float]]]:
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
        for url in urls.values():
            for _ in range(3):
                classify(http, url, "warm-up", None)
    time.sleep(1)
    return {mode: intent_tokens(url) for mode, url in urls.items()}


def bench(url: str, out: Path, rate: str, duration: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "shipyard.cli", "bench", "--url", url, "--api-key", KEY, "--out", str(out)]
    args = ["--scenario", "intent", "--rate", rate, "--duration", duration, "--warmup", "3", "--seed", "7"]
    subprocess.run([*command, *args], check=True, capture_output=True, text=True)
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models-dir", type=Path, default=Path.home() / ".cache/shipyard/models")
    parser.add_argument("--rate", default="4")
    parser.add_argument("--duration", default="30")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="shipyard-intent-"))
    model_dir = pull_default(args.models_dir).path
    spec = EngineSpec.from_profile(
        "cpu", model=str(model_dir), served_model_name=DEFAULT_MODEL_NAME, max_model_len=2048
    )
    examples = load_jsonl(ROOT / "data/intent/test.jsonl", IntentExample).examples
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "model": f"{DEFAULT_MODEL_NAME} (embedded default), vLLM-CPU, profile cpu",
    }
    with EngineProcess(spec, work / "engine.log") as engine:
        engine.wait_ready(600)
        gateways = {mode: start_gateway(work, mode, engine.url) for mode in MODES}
        urls = {mode: url for mode, (_, url) in gateways.items()}
        try:
            before = warm_up(urls)
            result["packaged"] = sameness(urls, examples, None)
            result["zero_shot"] = sameness(urls, examples, ZERO_SHOT)
            result["output_tokens"] = {mode: since(before[mode], intent_tokens(url)) for mode, url in urls.items()}
            load: dict[str, Any] = {}
            for leg in (1, 2):
                for mode in MODES:  # A B C A B C, each from an empty prefix cache (the legs send the same texts)
                    httpx.post(f"{engine.url}/reset_prefix_cache", timeout=60).raise_for_status()
                    load[f"{mode}-{leg}"] = bench(urls[mode], work / f"bench-{mode}-{leg}", args.rate, args.duration)
            result["load"] = load
        finally:
            for proc, _ in gateways.values():
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(60)
    (args.out / "intent_decode.json").write_text(json.dumps(result, indent=2) + "\n")
    for key in ("packaged", "zero_shot"):
        part = result[key]
        print(f"{key}: {part['identical']}/{part['examples']} identical; p50/p99 ms", end=" ")
        print({m: (round(part["latency_ms"][m]["p50"], 1), round(part["latency_ms"][m]["p99"], 1)) for m in MODES})
    print(json.dumps(result["output_tokens"]))


if __name__ == "__main__":
    main()
