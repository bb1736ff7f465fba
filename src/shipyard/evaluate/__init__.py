"""Offline evaluation through the gateway: task datasets, metrics, runs and comparisons."""

from shipyard.evaluate.metrics import PASS_THRESHOLD, classification_report, cosine, reply_report
from shipyard.evaluate.tasks import EvalRun, evaluate_intent, evaluate_reply
from shipyard.tasks.datasets import DatasetError, load_intent_dataset, load_reply_dataset

__all__ = [
    "PASS_THRESHOLD",
    "DatasetError",
    "EvalRun",
    "classification_report",
    "cosine",
    "evaluate_intent",
    "evaluate_reply",
    "load_intent_dataset",
    "load_reply_dataset",
    "reply_report",
]
