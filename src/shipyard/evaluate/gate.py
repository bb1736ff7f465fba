"""The rollout quality gate: intent accuracy of a new version on the first examples of a test set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from shipyard.control.checks import GateFailed
from shipyard.control.rollout import Gate
from shipyard.tasks.datasets import load_intent_dataset, project_data
from shipyard.tasks.intent import LabelSet, intent_body, parse_intent


class IntentGate:
    """A ``control.checks.QualityGate``: ``--gate intent:min_acc=0.8,n=32`` asks the new version to classify the
    first ``n`` examples of ``dataset`` with the served label set, straight at its engine (no user sees it)."""

    def __init__(self, dataset: Path | None, labels: LabelSet) -> None:
        """A relative ``dataset`` is looked up in the working directory, then in the checkout (``project_data``)."""
        self.dataset = project_data(str(dataset)) if dataset is not None and not dataset.is_absolute() else dataset
        self.labels = labels

    def unavailable(self) -> str | None:
        if self.dataset is None or not self.dataset.is_file():
            return f"the quality gate cannot run: gate dataset {self.dataset} is missing (settings: gate_dataset)"
        return None

    async def check(self, client: httpx.AsyncClient, url: str, model: str, gate: Gate) -> dict[str, Any]:
        missing = self.unavailable()
        if missing or self.dataset is None:
            raise GateFailed(missing or "no gate dataset")
        examples = load_intent_dataset(self.dataset, self.labels.labels).examples[: gate.n]
        correct = 0
        for example in examples:
            response = await client.post(
                f"{url}/v1/chat/completions", json=intent_body(model, self.labels, example.text), timeout=120
            )
            response.raise_for_status()
            correct += parse_intent(self.labels, response.json()) == example.label
        accuracy = correct / len(examples)
        facts = {"gate_accuracy": round(accuracy, 4), "gate_n": len(examples)}
        if accuracy < gate.min_accuracy:
            raise GateFailed(
                f"quality gate failed: intent accuracy {accuracy:.3f} < {gate.min_accuracy} "
                f"on {len(examples)} examples",
                facts,
            )
        return facts
