"""The HF-transformers service shipyard is compared with: an OpenAI-style ``/v1/completions`` server around
``model.generate``, batching the requests that wait (up to ``--max-batch``) the way the usual FastAPI + HF
service does when it batches at all. Prompts are token ids (``shipyard bench --endpoint completions``), so no
tokenizer is needed; with ``--dummy`` the model is built from its config with random weights on the GPU (real
speed and memory, meaningless text, as the vLLM side's ``--load-format dummy``).

    python3 benchmarks/hf_server.py --model /root/qwen2.5-7b --dummy --port 9000 &
    shipyard bench --url http://127.0.0.1:9000 --model hf --scenario random --endpoint completions --no-stream \\
        --input-tokens 512 --output-tokens 128 --rate 1,2,4 --find-max --slo e2e=5000 --out /root/out/hf
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


@dataclass
class Job:
    prompt: list[int]
    max_tokens: int
    done: threading.Event = field(default_factory=threading.Event)
    output: list[int] = field(default_factory=list)


class Generator:
    """One thread running ``generate`` on batches of whatever requests wait (static batching: a batch runs until
    its longest request is done; new requests wait for the next batch)."""

    def __init__(self, model: Any, max_batch: int, pad_id: int) -> None:
        self.model = model
        self.max_batch = max_batch
        self.pad_id = pad_id
        self.queue: list[Job] = []
        self.lock = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, job: Job) -> None:
        with self.lock:
            self.queue.append(job)
            self.lock.notify()

    def _run(self) -> None:
        import torch

        while True:
            with self.lock:
                while not self.queue:
                    self.lock.wait()
                batch, self.queue = self.queue[: self.max_batch], self.queue[self.max_batch :]
            longest = max(len(j.prompt) for j in batch)
            ids = torch.tensor([[self.pad_id] * (longest - len(j.prompt)) + j.prompt for j in batch], device="cuda")
            mask = torch.tensor([[0] * (longest - len(j.prompt)) + [1] * len(j.prompt) for j in batch], device="cuda")
            new = max(j.max_tokens for j in batch)
            with torch.inference_mode():
                out = self.model.generate(
                    ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                    pad_token_id=self.pad_id,
                )  # fmt: skip
            for row, job in zip(out.tolist(), batch, strict=True):
                job.output = row[longest : longest + job.max_tokens]
                job.done.set()


def build_app(generator: Generator, name: str, max_len: int) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "max_model_len": max_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        prompt = body["prompt"]
        if prompt and isinstance(prompt[0], list):
            prompt = prompt[0]
        job = Job(list(prompt), int(body.get("max_tokens") or 16))
        generator.submit(job)
        await asyncio.to_thread(job.done.wait)
        usage = {"prompt_tokens": len(job.prompt), "completion_tokens": len(job.output)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return JSONResponse(
            {
                "id": f"hf-{time.monotonic_ns()}",
                "object": "text_completion",
                "model": name,
                "choices": [{"index": 0, "text": " ".join(map(str, job.output)), "finish_reason": "length"}],
                "usage": usage,
            }
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--dummy", action="store_true", help="random weights from the config (no checkpoint read)")
    parser.add_argument("--name", default="hf")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.dummy:
        config = AutoConfig.from_pretrained(args.model)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map="cuda").eval()
    config = json.loads((args.model / "config.json").read_text())
    generator = Generator(model, args.max_batch, int(config.get("pad_token_id") or config.get("eos_token_id") or 0))
    app = build_app(generator, args.name, int(config.get("max_position_embeddings") or 4096))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
