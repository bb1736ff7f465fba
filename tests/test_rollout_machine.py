"""Rollout decisions without processes: the state machine, gates, weights, deployment choice."""

from __future__ import annotations

from collections import Counter

import pytest

from shipyard.control.rollout import (
    Gate,
    IllegalTransition,
    Phase,
    Rollout,
    RolloutPlan,
    other_color,
    parse_gate,
    traffic_weights,
)
from shipyard.router import pick_deployment, session_draw


def plan(**kw: object) -> RolloutPlan:
    base: dict[str, object] = {"target": "/m", "version": "v2", "new_deployment": "green", "old_deployment": "blue"}
    return RolloutPlan(**{**base, **kw})  # type: ignore[arg-type]


def test_happy_path_and_durations() -> None:
    r = Rollout(plan())
    for phase in (Phase.STARTING, Phase.WARMING, Phase.SWITCHING, Phase.DRAINING, Phase.DONE):
        r.advance(phase)
    assert not r.active and list(r.durations()) == ["pending", "starting", "warming", "switching", "draining", "done"]
    assert r.to_dict()["history"][-1]["phase"] == "done"


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ([], Phase.SWITCHING),
        ([Phase.STARTING], Phase.DONE),
        ([Phase.STARTING, Phase.FAILED], Phase.STARTING),
        ([Phase.STARTING, Phase.WARMING, Phase.SWITCHING], Phase.ROLLED_BACK),
    ],
)
def test_illegal_transitions(path: list[Phase], illegal: Phase) -> None:
    r = Rollout(plan())
    for phase in path:
        r.advance(phase)
    with pytest.raises(IllegalTransition):
        r.advance(illegal)


def test_weights_follow_the_phase() -> None:
    r = Rollout(plan(canary_percent=10.0))
    assert traffic_weights(r) is None  # nothing changes before the new version is ready
    r.advance(Phase.STARTING)
    r.advance(Phase.WARMING)
    r.advance(Phase.CANARY)
    assert traffic_weights(r) == {"green": pytest.approx(0.1), "blue": pytest.approx(0.9)}
    r.advance(Phase.SWITCHING)
    assert traffic_weights(r) == {"green": 1.0, "blue": 0.0}
    r.advance(Phase.DRAINING)
    r.advance(Phase.ROLLED_BACK)
    assert traffic_weights(r) == {"blue": 1.0, "green": 0.0}
    assert traffic_weights(Rollout(plan(lora=True))) is None


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("intent:min_acc=0.8", Gate("intent", 0.8, 32)), ("intent:min_acc=0.5,n=10", Gate("intent", 0.5, 10))],
)
def test_parse_gate(spec: str, expected: Gate) -> None:
    assert parse_gate(spec) == expected


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("accuracy>0.8", "TASK:key=value"),
        ("reply:min_acc=0.8", "not supported"),
        ("intent:n=5", "min_acc"),
        ("intent:min_acc=high", "numbers"),
        ("intent:min_acc=1.5", "0 <= min_acc"),
        ("intent:foo=1", "unknown"),
    ],
)
def test_bad_gates(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_gate(spec)


def test_pick_deployment_splits_by_weight() -> None:
    weights = {"blue": 0.9, "green": 0.1}
    picks = Counter(pick_deployment(weights, ["blue", "green"], i / 1000) for i in range(1000))
    assert picks == {"blue": 900, "green": 100}
    # A canary that is down sends its share to the others; all-zero weights fall back to what is up.
    assert pick_deployment(weights, ["blue"], 0.99) == "blue"
    assert pick_deployment({"blue": 0.0, "green": 1.0}, ["blue"], 0.5) == "blue"
    assert pick_deployment(weights, [], 0.5) is None


def test_sessions_are_sticky_and_spread() -> None:
    assert session_draw("user-1") == session_draw("user-1")
    draws = [session_draw(f"user-{i}") for i in range(2000)]
    assert 0.45 < sum(d < 0.5 for d in draws) / 2000 < 0.55
    assert other_color("blue") == "green" and other_color("green") == "blue" and other_color(None) == "blue"
