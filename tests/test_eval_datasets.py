from __future__ import annotations

import json
from pathlib import Path

import pytest

from shipyard.evaluate import DatasetError, load_intent_dataset, load_reply_dataset
from shipyard.tasks import load_labels

LINES = [
    json.dumps({"text": "lost my card", "label": "lost_card"}),
    "{not json",
    json.dumps({"text": "hi"}),
    "",
    json.dumps({"text": "x", "label": "no_such_label"}),
    json.dumps({"text": "where is it", "label": "order_status", "tags": ["typo"]}),
]


def test_malformed_lines_are_reported_with_line_numbers_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    data = load_intent_dataset(path, load_labels().labels)
    assert [e.text for e in data.examples] == ["lost my card", "where is it"]
    assert data.skipped == [
        "line 2: not JSON (Expecting property name enclosed in double quotes)",
        "line 3: label: Field required",
        "line 5: label 'no_such_label' is not in the label set",
    ]


def test_strict_mode_rejects_the_first_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(LINES))
    with pytest.raises(DatasetError, match="line 2: not JSON"):
        load_intent_dataset(path, load_labels().labels, strict=True)


def test_missing_or_empty_datasets(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read"):
        load_intent_dataset(tmp_path / "nope.jsonl", ["a"])
    (tmp_path / "bad.jsonl").write_text("{}\n")
    with pytest.raises(DatasetError, match="no usable examples"):
        load_reply_dataset(tmp_path / "bad.jsonl")


def test_reply_dataset_needs_a_customer_turn(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    ok = {"messages": [{"role": "user", "content": "my order is late"}], "reference": "sorry"}
    no_user = {"messages": [{"role": "assistant", "content": "hello"}], "reference": "sorry"}
    path.write_text(json.dumps(ok) + "\n" + json.dumps(no_user) + "\n")
    data = load_reply_dataset(path)
    assert len(data.examples) == 1 and data.skipped == ["line 2: no user message"]


def test_committed_datasets_are_valid_and_big_enough(repo_root: Path) -> None:
    labels = load_labels(repo_root / "data/intent/labels.yaml")
    assert len(labels.labels) >= 12
    test = load_intent_dataset(repo_root / "data/intent/test.jsonl", labels.labels, strict=True)
    train = load_intent_dataset(repo_root / "data/intent/train.jsonl", labels.labels, strict=True)
    assert len(test.examples) >= 300
    assert {e.text.lower() for e in test.examples}.isdisjoint({e.text.lower() for e in train.examples})
    counts = {label: sum(e.label == label for e in test.examples) for label in labels.labels}
    assert min(counts.values()) >= 18 and max(counts.values()) <= 25  # balanced
    tags = [t for e in test.examples for t in e.tags]
    assert tags.count("typo") >= 30 and tags.count("code_switch") >= 16
    assert sum(e.ambiguous for e in test.examples) >= 10
    replies = load_reply_dataset(repo_root / "data/reply/test.jsonl", strict=True)
    assert len(replies.examples) >= 60
    assert all(len(e.messages) >= 3 for e in replies.examples)
