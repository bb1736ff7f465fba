"""What the gateway itself costs per /v1/intent classification, on CPU, without an engine's noise.

shipyard's fake OpenAI server stands in for vLLM (it lists the default model's tokenizer folder as its root and
answers a one-token request with the first allowed token, at once); `shipyard serve --no-engine` in front of
it with the label set of benchmarks/intent_labels_distinct.yaml (every first token decides: one upstream call
per classification); `shipyard bench --scenario intent --rate R` against the gateway, which also samples the
gateway's CPU. Run it on two commits one after the other, A B A B, to compare gateway versions:

    .venv/bin/python benchmarks/intent_gateway_cpu.py --rate 300 --out reports/gateway/DIR/LABEL
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from shipyard.engine import free_port
from shipyard.engine.process import wait_until_ready
from shipyard.prepare.default_model import pull_default
from shipyard.tasks.vocab import Vocabulary
from shipyard.testing import FakeOpenAI

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-gateway-cpu"


def fake_engine(model_dir: Path) -> tuple[uvicorn.Server, str]:
    fake = FakeOpenAI("qwen", token_rate=1e6)
    fake.root = str(model_dir)
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    known = Vocabulary.from_folder(model_dir)
    fake.token_texts = {i: "" for i in vocab.values()}
    for text in {t for t in _label_prefixes()}:
        for token in known.ids_of(text.encode()):
            fake.token_texts[token] = text
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fake, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def _label_prefixes() -> list[str]:
    from shipyard.tasks.intent import load_labels

    labels = load_labels(ROOT / "benchmarks/intent_labels_distinct.yaml").labels
    return [label[:end] for label in labels for end in range(1, len(label) + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rate", default="300")
    parser.add_argument("--duration", default="10")
    parser.add_argument("--workers", default="1", help="gateway processes (shipyard serve --workers)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = pull_default(Path.home() / ".cache/shipyard/models").path
    server, engine_url = fake_engine(model_dir)
    port = free_port()
    env = {
        **os.environ,
        "SHIPYARD_API_KEYS": KEY,
        "SHIPYARD_ADMIN_KEYS": KEY + "-admin",
        "SHIPYARD_DATA_DIR": str(args.out / "data"),
        "SHIPYARD_INTENT_LABELS_FILE": str(ROOT / "benchmarks/intent_labels_distinct.yaml"),
    }
    log = open(args.out / "gateway.log", "ab")  # noqa: SIM115 - lives as long as the process
    command = [sys.executable, "-m", "shipyard.cli", "serve", "--no-engine", "--upstream", engine_url]
    command += ["--workers", args.workers]
    gateway = subprocess.Popen([*command, "--port", str(port)], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(gateway, url, 120, str(args.out / "gateway.log"))
        httpx.post(f"{url}/v1/intent", json={"text": "warm"}, headers={"Authorization": f"Bearer {KEY}"})
        time.sleep(1)  # the gateway reads the tokenizer after its first classification
        bench = [sys.executable, "-m", "shipyard.cli", "bench", "--url", url, "--api-key", KEY, "--out", str(args.out)]
        load = ["--scenario", "intent", "--rate", args.rate, "--duration", args.duration, "--warmup", "2"]
        subprocess.run([*bench, *load], check=True, capture_output=True)
        metrics = httpx.get(f"{url}/metrics").text
        (args.out / "gateway_metrics.txt").write_text(metrics)  # the gateway's own counts, GC pauses among them
    finally:
        gateway.terminate()
        gateway.wait(30)
        server.should_exit = True
    run = json.loads((args.out / "summary.json").read_text())["runs"][0]
    paths = [line for line in metrics.splitlines() if line.startswith("shipyard_intent_output_tokens_count")]
    paths += [line for line in metrics.splitlines() if line.startswith("shipyard_gc_pause_seconds_")]
    print(
        f"rate {run['rate']:g}: achieved {run['achieved_rate']:.1f}/s, errors {run['errors']}, "
        f"E2E p50 {run['e2e_ms']['p50']:.1f} ms p99 {run['e2e_ms']['p99']:.1f} ms, "
        f"gateway CPU {run['resources']['gateway_cpu_pct']['mean']:.1f}% of a core; {paths}"
    )


if __name__ == "__main__":
    main()
