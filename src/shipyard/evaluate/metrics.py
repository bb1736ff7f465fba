"""Task metrics: classification (accuracy, macro-F1, per label, confusion) and reply similarity."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

PASS_THRESHOLD = 0.85


def classification_report(gold: Sequence[str], predicted: Sequence[str | None]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-label precision/recall/F1/support and the confusion matrix.

    A failed request (prediction ``None``) counts as wrong. Macro-F1 averages over every label that occurs in
    the gold labels or the predictions (a predicted label with no gold example scores F1 = 0; a label
    that occurs in neither is left out, as scikit-learn does by default).
    """
    if len(gold) != len(predicted):
        raise ValueError("gold and predicted must have the same length")
    n = len(gold)
    correct = sum(g == p for g, p in zip(gold, predicted, strict=True))
    labels = sorted(set(gold) | {p for p in predicted if p is not None})
    pairs = Counter(zip(gold, predicted, strict=True))
    per_label: dict[str, dict[str, float]] = {}
    for label in labels:
        tp = pairs[(label, label)]
        fp = sum(c for (g, p), c in pairs.items() if p == label and g != label)
        fn = sum(c for (g, p), c in pairs.items() if g == label and p != label)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    confusion = {
        g: {p if p is not None else "<error>": c for (gg, p), c in pairs.items() if gg == g} for g in sorted(set(gold))
    }
    return {
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "macro_f1": sum(v["f1"] for v in per_label.values()) / len(per_label) if per_label else 0.0,
        "per_label": per_label,
        "confusion": confusion,
    }


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = (sum(x * x for x in a) ** 0.5) * (sum(y * y for y in b) ** 0.5)
    return dot / norm if norm else 0.0


def reply_report(cosines: Sequence[float | None], threshold: float = PASS_THRESHOLD) -> dict[str, Any]:
    """``None`` marks a reply that never came (error or invalid): it fails and lowers the valid rate."""
    n = len(cosines)
    valid = [c for c in cosines if c is not None]
    return {
        "n": n,
        "pass_rate_085": sum(c >= threshold for c in valid) / n if n else 0.0,
        "mean_cosine": sum(valid) / len(valid) if valid else 0.0,
        "schema_valid_rate": len(valid) / n if n else 0.0,
        "threshold": threshold,
    }
