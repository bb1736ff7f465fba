"""Metric code against values computed by hand."""

from __future__ import annotations

import pytest

from shipyard.evaluate import classification_report, cosine, reply_report


def test_accuracy_and_macro_f1_by_hand() -> None:
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    r = classification_report(gold, pred)
    assert r["accuracy"] == pytest.approx(3 / 5)
    # a: tp1 fp1 fn1 -> P=.5 R=.5 F1=.5 ; b: tp2 fp1 fn0 -> P=2/3 R=1 F1=.8 ; c: tp0 fn1 -> F1=0
    assert r["per_label"]["a"]["f1"] == pytest.approx(0.5)
    assert r["per_label"]["b"]["f1"] == pytest.approx(0.8)
    assert r["per_label"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert r["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert r["confusion"] == {"a": {"a": 1, "b": 1}, "b": {"b": 2}, "c": {"a": 1}}


def test_macro_f1_with_a_predicted_class_absent_from_gold() -> None:
    r = classification_report(["a", "a"], ["a", "z"])
    # a: P=1 R=.5 F1=2/3 ; z: predicted once, never gold -> F1 0 and it counts in the average
    assert r["per_label"]["z"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_failed_requests_count_as_wrong_and_show_in_confusion() -> None:
    r = classification_report(["a", "b"], ["a", None])
    assert r["accuracy"] == 0.5 and r["n"] == 2
    assert r["confusion"]["b"] == {"<error>": 1}
    assert r["per_label"]["b"]["recall"] == 0.0


def test_cosine_and_reply_pass_rate() -> None:
    assert cosine([1, 0], [1, 0]) == pytest.approx(1.0)
    assert cosine([1, 0], [0, 1]) == pytest.approx(0.0)
    assert cosine([1, 1], [1, 0]) == pytest.approx(2**-0.5)
    r = reply_report([0.9, 0.85, 0.5, None])
    assert r["pass_rate_085"] == pytest.approx(2 / 4)  # the missing reply fails and stays in the denominator
    assert r["schema_valid_rate"] == pytest.approx(3 / 4)
    assert r["mean_cosine"] == pytest.approx((0.9 + 0.85 + 0.5) / 3)
    assert reply_report([])["n"] == 0
